"""The VLM's language-side layers: rotary positions, causal self-attention with a key/value
cache, pre-LN decoder layers, Flamingo's gated cross-attention and Perceiver resampler.

Legend as zoo/models/vlm.py: B batch, L text tokens, S slots, C cache slots, N visual tokens,
R resampler latents, D width, A heads, K head width.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.models import text
from zoo.nn import layers

ACT_AXES = text.ACT_AXES


def rotary(x_BxLxAxK, positions_BxL, base=10000.0):
  """Rotary position embedding (Su et al. 2021), the rotate-half layout of GPT-NeoX / Llama."""
  half = x_BxLxAxK.shape[-1] // 2
  freqs_H = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BxLx1xH = positions_BxL.astype(jnp.float32)[:, :, None, None] * freqs_H[None, None, None]
  sin, cos = jnp.sin(angles_BxLx1xH), jnp.cos(angles_BxLx1xH)
  x1, x2 = x_BxLxAxK[..., :half].astype(jnp.float32), x_BxLxAxK[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxAxK.dtype)


def allowed_slots(query_slots_L, key_mask_BxC, prefix_B):
  """BxLxC: key slot c is real and causal (c <= the query's slot) or inside the prefix."""
  key_slots_C = jnp.arange(key_mask_BxC.shape[1])
  causal_LxC = key_slots_C[None, :] <= query_slots_L[:, None]
  prefix_BxC = key_slots_C[None, :] < prefix_B[:, None]
  return key_mask_BxC[:, None, :] & (causal_LxC[None] | prefix_BxC[:, None, :])


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention with rotary positions and an optional key/value cache."""
  num_heads: int
  depth: int
  rope: bool
  cache_slots: int
  dtype: Any

  def _cached(self, k, v, key_mask_BxL):
    """Writes this call's keys at the cache index; returns all slots and the query slots."""
    batch, length, heads, head_dim = k.shape
    shape = (batch, self.cache_slots, heads, head_dim)
    ck = self.variable('cache', 'key', jnp.zeros, shape, k.dtype)
    cv = self.variable('cache', 'value', jnp.zeros, shape, v.dtype)
    cm = self.variable('cache', 'mask', jnp.zeros, (batch, self.cache_slots), bool)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    i = index.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0))
    cm.value = jax.lax.dynamic_update_slice(cm.value, key_mask_BxL, (0, i))
    index.value = i + length
    return ck.value, cv.value, cm.value, i + jnp.arange(length)

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, key_mask_BxL, prefix_B, decode=False):
    batch, length, width = x_BxLxD.shape
    heads = self.num_heads
    attn_std, proj_std = width ** -0.5, width ** -0.5 * (2 * self.depth) ** -0.5
    q, k, v = (text._dense(width, ('embed', 'heads'), attn_std, self.dtype, f'{n}_proj')(
        x_BxLxD).reshape(batch, length, heads, width // heads) for n in 'qkv')
    if self.rope:
      q, k = rotary(q, positions_BxL), rotary(k, positions_BxL)
    if decode:
      k, v, key_mask, query_slots_L = self._cached(k, v, key_mask_BxL)
    else:
      key_mask, query_slots_L = key_mask_BxL, jnp.arange(length)
    allowed_BxLxC = allowed_slots(query_slots_L, key_mask, prefix_B)
    out = layers.attention_heads(q, k, v, allowed_BxLxC, self.dtype)
    return text._dense(width, ('heads', 'embed'), proj_std, self.dtype, 'out_proj')(
        out.reshape(batch, length, width))


class DecoderLayer(nn.Module):
  """Pre-LN: x + attn(LN1(x)), then x + mlp(LN2(x)); the residual stream stays float32."""
  num_heads: int
  mlp_dim: int
  depth: int
  rope: bool
  cache_slots: int
  norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, key_mask_BxL, prefix_B, decode=False):
    h = text.layer_norm(self.norm_eps, 'layer_norm1')(x_BxLxD).astype(self.dtype)
    x_BxLxD = x_BxLxD + CausalSelfAttention(
        self.num_heads, self.depth, self.rope, self.cache_slots, self.dtype, name='self_attn')(
            h, positions_BxL, key_mask_BxL, prefix_B, decode).astype(jnp.float32)
    h = text.layer_norm(self.norm_eps, 'layer_norm2')(x_BxLxD).astype(self.dtype)
    return x_BxLxD + text.Mlp(self.mlp_dim, 'gelu', self.depth, self.dtype, name='mlp')(h).astype(
        jnp.float32)


class GatedCrossAttention(nn.Module):
  """Flamingo's GATED XATTN-DENSE: x + tanh(a) xattn(LN(x), visual), x + tanh(b) ffw(LN(x)).

  Both gates start at 0, so the block is the identity at initialisation, exactly.
  """
  num_heads: int
  mlp_dim: int
  depth: int
  norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxLxD, visual_BxNxD):
    gate = lambda name: jnp.tanh(self.param(name, nn.initializers.zeros_init(), (), jnp.float32))
    h = text.layer_norm(self.norm_eps, 'layer_norm1')(x_BxLxD).astype(self.dtype)
    attn = text.SelfAttention(self.num_heads, self.depth, self.dtype, name='cross_attn')(
        h, None, visual_BxNxD.astype(self.dtype))
    x_BxLxD = x_BxLxD + gate('attn_gate') * attn.astype(jnp.float32)
    h = text.layer_norm(self.norm_eps, 'layer_norm2')(x_BxLxD).astype(self.dtype)
    ffw = text.Mlp(self.mlp_dim, 'gelu', self.depth, self.dtype, name='mlp')(h)
    return x_BxLxD + gate('mlp_gate') * ffw.astype(jnp.float32)


class LanguageGroup(nn.Module):
  """The unit the language stack scans over (zoo/nn/stack.py): a gated cross-attention block
  (mid fusion) then `size` decoder layers, whose params `stack.scan` gathers from the VLM's
  xattn_k / layers_i."""
  fields: tuple  # DecoderLayer's.
  cross: bool
  size: int

  @nn.compact
  def __call__(self, x_BxSxD, visual_BxMxD, positions_BxL, mask_BxL, prefix_B):
    num_heads, mlp_dim, depth, _, _, norm_eps, dtype = self.fields
    if self.cross:
      x_BxSxD = GatedCrossAttention(num_heads, mlp_dim, depth, norm_eps, dtype, name='xattn')(
          x_BxSxD, visual_BxMxD)
    for j in range(self.size):
      x_BxSxD = DecoderLayer(*self.fields, name=f'layer_{j}')(x_BxSxD, positions_BxL, mask_BxL,
                                                              prefix_B)
      x_BxSxD = nn.with_logical_constraint(x_BxSxD, ACT_AXES)
    return x_BxSxD


class PerceiverResampler(nn.Module):
  """R learned latents attend to [visual tokens, latents] (Flamingo's resampler), `depth` times."""
  latents: int
  depth: int
  num_heads: int
  norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, visual_BxNxD):
    batch, _, width = visual_BxNxD.shape
    lat_RxD = self.param('latents', nn.initializers.normal(width ** -0.5),
                         (self.latents, width), jnp.float32)
    x_BxRxD = jnp.broadcast_to(lat_RxD[None], (batch, self.latents, width))
    visual = text.layer_norm(self.norm_eps, 'visual_norm')(visual_BxNxD)
    for i in range(self.depth):
      h = text.layer_norm(self.norm_eps, f'layers_{i}_norm1')(x_BxRxD)
      kv = jnp.concatenate([visual, h], axis=1).astype(self.dtype)
      x_BxRxD = x_BxRxD + text.SelfAttention(self.num_heads, self.depth, self.dtype,
                                             name=f'layers_{i}_attn')(
          h.astype(self.dtype), None, kv).astype(jnp.float32)
      h = text.layer_norm(self.norm_eps, f'layers_{i}_norm2')(x_BxRxD).astype(self.dtype)
      x_BxRxD = x_BxRxD + text.Mlp(4 * width, 'gelu', self.depth, self.dtype,
                                   name=f'layers_{i}_mlp')(h).astype(jnp.float32)
    return text.layer_norm(self.norm_eps, 'final_norm')(x_BxRxD)
