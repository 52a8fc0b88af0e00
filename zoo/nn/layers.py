"""Shared building blocks: timestep embeddings, annotated Conv/Dense, GroupNorm, spatial attention.

Legend: B batch, H/W height/width, C channels, N query positions (H*W), L context length,
D context width, M key positions, K head width, A attention heads.

Every parameter created here carries logical axis names from the zoo vocabulary
(`embed, mlp, heads, kv, vocab, conv_in, conv_out`), except norm scales/biases, which stay
replicated. Names follow diffusers' Flax models so PyTorch checkpoints convert mechanically.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
CONV_KERNEL_AXES = (None, None, 'conv_in', 'conv_out')


def to_dtype(name: str) -> Dtype:
  """Maps a config dtype string ('float32' or 'bfloat16') to a jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f'dtype={name!r} is not supported; allowed: {sorted(DTYPES)}')
  return DTYPES[name]


def param_count(params) -> int:
  """Number of scalars in a (boxed or plain) parameter pytree."""
  return sum(int(math.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def timestep_embedding(
    t_B,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
  """Sinusoidal embedding of (possibly continuous) timesteps, as diffusers `get_timestep_embedding`.

  Frequencies are exp(-ln(max_period) * i / (half - freq_shift)) for i < half = dim // 2;
  the output is [sin, cos] or, with `flip_sin_to_cos`, [cos, sin]; an odd `dim` gets a zero
  column at the end. Always float32: low-precision sin/cos of t ~ 1000 loses all phase.
  """
  half = dim // 2
  exponent_H = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args_BxH = jnp.asarray(t_B, jnp.float32)[:, None] * jnp.exp(exponent_H)[None, :]
  sin_BxH, cos_BxH = jnp.sin(args_BxH), jnp.cos(args_BxH)
  parts = [cos_BxH, sin_BxH] if flip_sin_to_cos else [sin_BxH, cos_BxH]
  if dim % 2:
    parts.append(jnp.zeros((args_BxH.shape[0], 1), jnp.float32))
  return jnp.concatenate(parts, axis=-1)


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    strides: int = 1,
    padding: Any = 'SAME',
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    axes: Sequence[str | None] = CONV_KERNEL_AXES,
    name: str | None = None,
) -> nn.Conv:
  """A square 2-D `nn.Conv` whose HWIO kernel is named `axes` and whose bias is `(axes[3],)`.

  Pass None for an image-facing channel axis (3 RGB channels never divide a mesh axis).
  """
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=padding,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), tuple(axes)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[3],)),
      name=name,
  )


def dense(
    features: int,
    axes: Sequence[str | None],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
  """An `nn.Dense` whose (in, out) kernel is named `axes` and whose bias is named `(axes[1],)`."""
  in_axis, out_axis = axes
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
      name=name,
  )


class GroupNorm(nn.Module):
  """GroupNorm over the channel (last) axis, computed in float32 and returned in `dtype`.

  Statistics pool every axis between batch and channels (H, W or L) within a group, as
  torch.nn.GroupNorm does on NCHW. Params `scale`/`bias` are unannotated (replicated).
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(
          f'GroupNorm: channels={channels} is not divisible by num_groups={self.num_groups}')
    x_BxNxGxS = x.astype(jnp.float32).reshape(
        x.shape[0], -1, self.num_groups, channels // self.num_groups)
    mean = jnp.mean(x_BxNxGxS, axis=(1, 3), keepdims=True)
    # Two-pass variance: E[x^2]-E[x]^2 cancels catastrophically for large-mean activations.
    var = jnp.mean(jnp.square(x_BxNxGxS - mean), axis=(1, 3), keepdims=True)
    y = ((x_BxNxGxS - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    bshape = (1,) * (x.ndim - 1) + (channels,)
    scale = self.param('scale', nn.initializers.ones_init(), (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (channels,), self.param_dtype)
    y = y * scale.astype(jnp.float32).reshape(bshape) + bias.astype(jnp.float32).reshape(bshape)
    return y.astype(self.dtype)


class Attention(nn.Module):
  """Residual multi-head attention over spatial positions (diffusers `Attention`, U-Net flavour).

  x (BxHxWxC or BxNxC) -> group_norm -> to_q/to_k/to_v -> softmax(q k^T / sqrt(K)) v
  -> to_out_0 -> + x. `head_dim` is channels per head (0 = one head of width C), so
  heads = C // head_dim, as UNet2DModel's `attention_head_dim`.

  Context (BxLxD), only when `context_dim` > 0:
  - joint (default): keys/values are [add_k_proj(ctx), to_k(x)], i.e. self- and cross-attention
    in one softmax (diffusers `AttnAddedKVProcessor`);
  - `only_cross_attention`: keys/values are to_k(ctx), to_v(ctx) (diffusers `Attention` called
    with `encoder_hidden_states`).
  `context_mask_BxL` (True = attend) hides padded context tokens. In joint mode every query still
  sees its own positions, so a fully masked context is harmless; in cross-only mode a fully
  masked row degrades to a uniform average.
  """
  head_dim: int = 0
  num_groups: int = 32
  epsilon: float = 1e-5
  context_dim: int = 0
  only_cross_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, features, axes, name):
    return dense(features, axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _keys_values(self, h_BxNxC, context_BxLxD, context_mask_BxL):
    """Projected keys/values BxMxC and the key mask BxM (None when everything is visible)."""
    channels = h_BxNxC.shape[-1]
    if context_BxLxD is None:
      return (self._dense(channels, ('embed', 'heads'), 'to_k')(h_BxNxC),
              self._dense(channels, ('embed', 'heads'), 'to_v')(h_BxNxC), None)
    ctx = context_BxLxD.astype(self.dtype)
    if self.only_cross_attention:
      return (self._dense(channels, ('embed', 'heads'), 'to_k')(ctx),
              self._dense(channels, ('embed', 'heads'), 'to_v')(ctx), context_mask_BxL)
    k_BxMxC = jnp.concatenate([
        self._dense(channels, ('embed', 'heads'), 'add_k_proj')(ctx),
        self._dense(channels, ('embed', 'heads'), 'to_k')(h_BxNxC)], axis=1)
    v_BxMxC = jnp.concatenate([
        self._dense(channels, ('embed', 'heads'), 'add_v_proj')(ctx),
        self._dense(channels, ('embed', 'heads'), 'to_v')(h_BxNxC)], axis=1)
    mask_BxM = None
    if context_mask_BxL is not None:
      mask_BxM = jnp.concatenate(
          [context_mask_BxL.astype(bool), jnp.ones(h_BxNxC.shape[:2], bool)], axis=1)
    return k_BxMxC, v_BxMxC, mask_BxM

  @nn.compact
  def __call__(self, x, context_BxLxD=None, context_mask_BxL=None):
    if (context_BxLxD is not None) != (self.context_dim > 0):
      raise ValueError(
          f'Attention: context_dim={self.context_dim} but context is '
          f'{"missing" if context_BxLxD is None else "given"}; pass a context iff context_dim > 0')
    if context_BxLxD is not None and context_BxLxD.shape[-1] != self.context_dim:
      raise ValueError(
          f'Attention: context width {context_BxLxD.shape[-1]} != context_dim={self.context_dim}')
    channels = x.shape[-1]
    head_dim = self.head_dim or channels
    if channels % head_dim:
      raise ValueError(f'Attention: channels={channels} not divisible by head_dim={head_dim}')
    heads = channels // head_dim
    batch = x.shape[0]

    h_BxNxC = GroupNorm(self.num_groups, self.epsilon, self.dtype, self.param_dtype,
                        name='group_norm')(x.reshape(batch, -1, channels))
    q_BxNxC = self._dense(channels, ('embed', 'heads'), 'to_q')(h_BxNxC)
    k_BxMxC, v_BxMxC, mask_BxM = self._keys_values(h_BxNxC, context_BxLxD, context_mask_BxL)

    q_BxNxAxK = q_BxNxC.reshape(batch, -1, heads, head_dim)
    k_BxMxAxK = k_BxMxC.reshape(batch, -1, heads, head_dim)
    v_BxMxAxK = v_BxMxC.reshape(batch, -1, heads, head_dim)
    # Logits and softmax in float32 (diffusers upcast_softmax=True): bf16 logits saturate.
    logits_BxAxNxM = jnp.einsum('bnak,bmak->banm', q_BxNxAxK, k_BxMxAxK,
                                preferred_element_type=jnp.float32) * (head_dim ** -0.5)
    if mask_BxM is not None:
      logits_BxAxNxM = jnp.where(mask_BxM[:, None, None, :], logits_BxAxNxM,
                                 jnp.finfo(jnp.float32).min)
    probs_BxAxNxM = jax.nn.softmax(logits_BxAxNxM, axis=-1).astype(self.dtype)
    out_BxNxAxK = jnp.einsum('banm,bmak->bnak', probs_BxAxNxM, v_BxMxAxK)
    out_BxNxC = self._dense(channels, ('heads', 'embed'), 'to_out_0')(
        out_BxNxAxK.reshape(batch, -1, channels))
    return out_BxNxC.reshape(x.shape).astype(self.dtype) + x.astype(self.dtype)
