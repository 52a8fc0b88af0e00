"""Text transformer: the CLIP and SigLIP text towers, with Hugging Face parameter names.

Legend: B batch, L tokens, M key positions, D width, A heads, K head width (D / A), F MLP
width, P pooled width (projection_dim or head_dim, or D without either).

Parameter paths mirror HF so a state dict converts mechanically (zoo/convert/transformers.py):
  embeddings/{token_embedding, position_embedding}/embedding,
  encoder/layers_i/{self_attn/{q_proj, k_proj, v_proj, out_proj}, layer_norm1, mlp/{fc1, fc2},
  layer_norm2}, final_layer_norm, then text_projection (CLIP: no bias; projection_dim > 0) or
  head (SigLIP `SiglipTextModel.head`: with bias; head_dim > 0).
Blocks are pre-LN: x + attn(LN1(x)), then x + mlp(LN2(x)). OpenAI CLIP uses QuickGELU
x * sigmoid(1.702 x), a causal mask and EOS pooling; SigLIP uses tanh-GELU, no causal mask,
last-token pooling and the `head`. The same encoder serves the ViT (zoo/models/vit.py): HF
names its vision layers identically.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.nn import layers
from zoo.nn import stack

ACT_AXES = ('act_batch', 'act_len', 'act_emb')
ACTS = ('quick_gelu', 'gelu', 'gelu_tanh')
POOLS = ('eos', 'argmax', 'last', 'mean')
# Embedding init: OpenAI CLIP (token std 0.02, position 0.01) or big_vision / SigLIP (both
# 1/sqrt(D), Flax's default embedding init).
EMBED_INITS = ('clip', 'siglip')
# The OpenAI CLIP text towers (HF openai/clip-vit-{base-patch32,large-patch14}).
_CLIP = dict(vocab_size=49408, max_len=77, depth=12, act='quick_gelu', causal=True,
             pool='argmax', eos_token_id=49407)
PRESETS: dict[str, dict[str, Any]] = {
    'clip-vit-b32-text': _CLIP | dict(width=512, num_heads=8, projection_dim=512),
    'clip-vit-l14-text': _CLIP | dict(width=768, num_heads=12, projection_dim=768),
    # HF google/siglip-base-patch16-224 (its text config: pad = EOS = 1, pool the last slot).
    'siglip-base-text': dict(vocab_size=32000, max_len=64, width=768, depth=12, num_heads=12,
                             act='gelu_tanh', causal=False, pool='last', eos_token_id=1,
                             projection_dim=0, head_dim=768, embed_init='siglip', norm_eps=1e-6),
    # CPU-sized, over data.text_tokenizers 'shapes' (113 words, [EOS] = 2).
    'tiny': dict(vocab_size=113, max_len=32, width=32, depth=2, num_heads=4, act='gelu',
                 causal=True, pool='eos', eos_token_id=2, projection_dim=32),
    'tiny-siglip': dict(vocab_size=113, max_len=32, width=32, depth=2, num_heads=4,
                        act='gelu_tanh', causal=False, pool='last', eos_token_id=2,
                        projection_dim=0, head_dim=32, embed_init='siglip', norm_eps=1e-6),
}


def preset(name: str) -> dict[str, Any]:
  """A fresh copy of the named preset's TextTransformer keyword arguments."""
  if name not in PRESETS:
    raise ValueError(f'unknown text preset {name!r}; allowed: {sorted(PRESETS)}')
  return dict(PRESETS[name])


def _init(init, axes):
  return nn.with_logical_partitioning(init, tuple(axes))


def _dense(features, axes, std, dtype, name, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_init(nn.initializers.normal(std), axes),
                  bias_init=_init(nn.initializers.zeros_init(), (axes[1],)), name=name)


def layer_norm(eps, name):
  """LayerNorm in float32 with a two-pass variance, as CLIP's fp16-safe LayerNorm."""
  return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


def _activation(name, x):
  if name == 'quick_gelu':
    return x * jax.nn.sigmoid(1.702 * x)
  return nn.gelu(x, approximate=name == 'gelu_tanh')


class SelfAttention(nn.Module):
  """HF `CLIPAttention`: separate q/k/v/out projections, logits and softmax in float32.

  `allowed_BxLxM` None attends everywhere. With `kv_BxMxD` the keys and values come from it
  instead of the queries' input: the SigLIP MAP head's probe attends to the image tokens.
  """
  num_heads: int
  depth: int
  dtype: Any

  @nn.compact
  def __call__(self, x_BxLxD, allowed_BxLxM=None, kv_BxMxD=None):
    kv_BxMxD = x_BxLxD if kv_BxMxD is None else kv_BxMxD
    batch, length, width = x_BxLxD.shape
    heads, head_dim = self.num_heads, width // self.num_heads
    # OpenAI init: attn std w^-1/2; residual projections w^-1/2 (2 depth)^-1/2.
    attn_std, proj_std = width ** -0.5, width ** -0.5 * (2 * self.depth) ** -0.5
    q, k, v = (_dense(width, ('embed', 'heads'), attn_std, self.dtype, f'{n}_proj')(inputs)
               .reshape(batch, inputs.shape[1], heads, head_dim)
               for n, inputs in zip('qkv', (x_BxLxD, kv_BxMxD, kv_BxMxD)))
    # A fully masked query row (e.g. a leading pad) becomes a uniform average, not NaN.
    out_BxLxAxK = layers.attention_heads(q, k, v, allowed_BxLxM, self.dtype)
    return _dense(width, ('heads', 'embed'), proj_std, self.dtype, 'out_proj')(
        out_BxLxAxK.reshape(batch, length, width))


class Mlp(nn.Module):
  """fc1 -> activation -> fc2."""
  mlp_dim: int
  act: str
  depth: int
  dtype: Any

  @nn.compact
  def __call__(self, x_BxLxD):
    width = x_BxLxD.shape[-1]
    h_BxLxF = _dense(self.mlp_dim, ('embed', 'mlp'), (2 * width) ** -0.5, self.dtype, 'fc1')(
        x_BxLxD)
    h_BxLxF = _activation(self.act, h_BxLxF.astype(jnp.float32)).astype(self.dtype)
    return _dense(width, ('mlp', 'embed'), width ** -0.5 * (2 * self.depth) ** -0.5,
                  self.dtype, 'fc2')(h_BxLxF)


class EncoderLayer(nn.Module):
  """HF `CLIPEncoderLayer`: pre-LN attention and MLP, each with a residual connection."""
  num_heads: int
  mlp_dim: int
  act: str
  depth: int
  norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_BxLxD, allowed_BxLxL=None):
    # The residual stream stays float32 under bf16 compute; only sublayer inputs are cast.
    h = layer_norm(self.norm_eps, 'layer_norm1')(x_BxLxD).astype(self.dtype)
    x_BxLxD = x_BxLxD + SelfAttention(self.num_heads, self.depth, self.dtype, name='self_attn')(
        h, allowed_BxLxL).astype(jnp.float32)
    h = layer_norm(self.norm_eps, 'layer_norm2')(x_BxLxD).astype(self.dtype)
    return x_BxLxD + Mlp(self.mlp_dim, self.act, self.depth, self.dtype, name='mlp')(h).astype(
        jnp.float32)


class Embeddings(nn.Module):
  """Token plus learned position embeddings (init: see EMBED_INITS)."""
  vocab_size: int
  max_len: int
  width: int
  embed_init: str = 'clip'

  @nn.compact
  def __call__(self, tokens_BxL):
    tok_std, pos_std = (0.02, 0.01) if self.embed_init == 'clip' else (self.width ** -0.5,) * 2
    tok = nn.Embed(self.vocab_size, self.width, param_dtype=jnp.float32,
                   embedding_init=_init(nn.initializers.normal(tok_std), ('vocab', 'embed')),
                   name='token_embedding')
    pos = nn.Embed(self.max_len, self.width, param_dtype=jnp.float32,
                   embedding_init=_init(nn.initializers.normal(pos_std), (None, 'embed')),
                   name='position_embedding')
    return tok(tokens_BxL) + pos(jnp.arange(tokens_BxL.shape[1]))[None]


class Encoder(nn.Module):
  """`depth` encoder layers named layers_i (HF `encoder.layers.i`)."""
  depth: int
  num_heads: int
  mlp_dim: int
  act: str
  norm_eps: float
  dtype: Any
  remat: bool

  @nn.compact
  def __call__(self, x_BxLxD, allowed_BxLxL=None):
    # remat recomputes each layer's activations in the backward pass; params keep their paths.
    names = [f'layers_{i}' for i in range(self.depth)]
    if stack.use_scan(self):  # One lax.scan over the layers' params (zoo/nn/stack.py).
      layer = EncoderLayer(self.num_heads, self.mlp_dim, self.act, self.depth, self.norm_eps,
                           self.dtype)
      return stack.scan(self, layer, names, x_BxLxD, allowed_BxLxL, axes=ACT_AXES,
                        remat=self.remat)
    layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
    for i in range(self.depth):
      x_BxLxD = layer_cls(self.num_heads, self.mlp_dim, self.act, self.depth, self.norm_eps,
                          self.dtype, name=names[i])(x_BxLxD, allowed_BxLxL)
      x_BxLxD = nn.with_logical_constraint(x_BxLxD, ACT_AXES)
    return x_BxLxD


def pool_index(pool, tokens_BxL, mask_BxL, eos_token_id):
  """The pooled position per row for 'eos' / 'argmax' / 'last' (padding never counts).

  'eos': the first real position holding eos_token_id (HF after PR #24773; 0 if none);
  'argmax': the real position of the largest id (OpenAI: EOT = 49407 is the largest);
  'last': the last real position.
  """
  pos_L = jnp.arange(tokens_BxL.shape[1])
  if pool == 'eos':
    return jnp.argmax((tokens_BxL == eos_token_id) & mask_BxL, axis=1)
  if pool == 'argmax':
    return jnp.argmax(jnp.where(mask_BxL, tokens_BxL, -1), axis=1)
  return jnp.max(jnp.where(mask_BxL, pos_L[None], 0), axis=1)


class TextTransformer(nn.Module):
  """Tokens BxL (+ mask, True = real) -> (features BxLxD after final_layer_norm, pooled BxP).

  `mlp_dim` 0 means 4 * width. `pool` picks the pooled token (see `pool_index`) or 'mean', the
  masked mean; pooled features are projected by `text_projection` (no bias) when
  projection_dim > 0, or by `head` (with bias, SigLIP) when head_dim > 0. The padding mask
  hides padded keys (combined with the causal mask when `causal`), so real positions and the
  pooled output do not depend on padded tokens. Params are float32; `dtype` is the compute
  dtype; outputs are float32. `train` is accepted for the task interface: neither CLIP's nor
  SigLIP's text tower has dropout.
  """
  vocab_size: int = 49408
  max_len: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 0
  act: str = 'quick_gelu'
  causal: bool = True
  pool: str = 'argmax'
  eos_token_id: int = 49407
  projection_dim: int = 512
  head_dim: int = 0
  embed_init: str = 'clip'
  norm_eps: float = 1e-5
  dtype: str = 'float32'
  remat: bool = False

  def _check_inputs(self, tokens_BxL, mask_BxL):
    check_config(_fields(self), resolution=None)
    if tokens_BxL.ndim != 2 or not 1 <= tokens_BxL.shape[1] <= self.max_len:
      raise ValueError(f'tokens must be BxL with 1 <= L <= model.max_len={self.max_len}, '
                       f'got shape {tuple(tokens_BxL.shape)}')
    if mask_BxL is not None and tuple(mask_BxL.shape) != tuple(tokens_BxL.shape):
      raise ValueError(f'mask_BxL shape {tuple(mask_BxL.shape)} != tokens shape '
                       f'{tuple(tokens_BxL.shape)}')

  def _pool(self, x_BxLxD, tokens_BxL, mask_BxL):
    if self.pool == 'mean':
      weights_BxL = mask_BxL.astype(jnp.float32)
      total_BxD = jnp.einsum('bl,bld->bd', weights_BxL, x_BxLxD)
      return total_BxD / jnp.maximum(weights_BxL.sum(1, keepdims=True), 1.0)
    index_B = pool_index(self.pool, tokens_BxL, mask_BxL, self.eos_token_id)
    return jnp.take_along_axis(x_BxLxD, index_B[:, None, None], axis=1)[:, 0]

  @nn.compact
  def __call__(self, tokens_BxL, mask_BxL=None, *, train=False):
    del train
    tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
    self._check_inputs(tokens_BxL, mask_BxL)
    dtype, length = layers.to_dtype(self.dtype), tokens_BxL.shape[1]
    if mask_BxL is None:
      mask_BxL = jnp.ones(tokens_BxL.shape, bool)
    mask_BxL = jnp.asarray(mask_BxL, bool)
    allowed_BxLxL = jnp.broadcast_to(mask_BxL[:, None, :], mask_BxL.shape + (length,))
    if self.causal:
      allowed_BxLxL = allowed_BxLxL & jnp.tril(jnp.ones((length, length), bool))[None]

    x_BxLxD = Embeddings(self.vocab_size, self.max_len, self.width, self.embed_init,
                         name='embeddings')(tokens_BxL)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ACT_AXES)
    x_BxLxD = Encoder(self.depth, self.num_heads, self.mlp_dim or 4 * self.width, self.act,
                      self.norm_eps, dtype, self.remat, name='encoder')(x_BxLxD, allowed_BxLxL)
    x_BxLxD = layer_norm(self.norm_eps, 'final_layer_norm')(x_BxLxD)
    pooled_BxP = self._pool(x_BxLxD, tokens_BxL, mask_BxL)
    if self.projection_dim:
      pooled_BxP = _dense(self.projection_dim, ('embed', None), self.width ** -0.5, dtype,
                          'text_projection', use_bias=False)(pooled_BxP).astype(jnp.float32)
    if self.head_dim:
      pooled_BxP = nn.Dense(self.head_dim, dtype=dtype, param_dtype=jnp.float32,
                            kernel_init=_init(nn.initializers.lecun_normal(), ('embed', None)),
                            bias_init=_init(nn.initializers.zeros_init(), (None,)),
                            name='head')(pooled_BxP).astype(jnp.float32)
    return nn.with_logical_constraint(x_BxLxD, ACT_AXES), pooled_BxP


FIELDS = tuple(f.name for f in dataclasses.fields(TextTransformer)
               if f.name not in ('parent', 'name'))


def _fields(module: TextTransformer) -> dict[str, Any]:
  return {f: getattr(module, f) for f in FIELDS}


def _check_values(kw, where):
  for key in ('vocab_size', 'max_len', 'width', 'depth', 'num_heads'):
    if kw[key] < 1:
      raise ValueError(f'{where}.{key}={kw[key]} must be >= 1')
  for key in ('mlp_dim', 'projection_dim', 'head_dim'):
    if kw[key] < 0:
      raise ValueError(f'{where}.{key}={kw[key]} must be >= 0 (0 = '
                       f"{'4 * width' if key == 'mlp_dim' else 'none'})")
  if kw['projection_dim'] and kw['head_dim']:
    raise ValueError(f"{where}.projection_dim={kw['projection_dim']} and {where}.head_dim="
                     f"{kw['head_dim']}: set at most one (CLIP projects, SigLIP has a head)")
  if kw['width'] % kw['num_heads']:
    raise ValueError(f"{where}.width={kw['width']} must be divisible by "
                     f"{where}.num_heads={kw['num_heads']}")
  if kw['norm_eps'] <= 0:
    raise ValueError(f"{where}.norm_eps={kw['norm_eps']} must be > 0")


def _check_choices(kw, where):
  for key, allowed in (('act', ACTS), ('pool', POOLS), ('embed_init', EMBED_INITS),
                       ('dtype', tuple(layers.DTYPES))):
    if kw[key] not in allowed:
      raise ValueError(f'{where}.{key}={kw[key]!r}; allowed: {list(allowed)}')
  if kw['pool'] == 'eos' and not 0 <= kw['eos_token_id'] < kw['vocab_size']:
    raise ValueError(f"{where}.eos_token_id={kw['eos_token_id']} must be a token id in "
                     f"[0, {where}.vocab_size={kw['vocab_size']}) for pool={kw['pool']!r}")


def pooled_width(model_kwargs: dict[str, Any]) -> int:
  """The width P of the pooled output: projection_dim, head_dim or width."""
  kw = {f: getattr(TextTransformer, f) for f in FIELDS} | dict(model_kwargs)
  return kw['projection_dim'] or kw['head_dim'] or kw['width']


def check_config(model_kwargs: dict[str, Any], resolution: int | None, *,
                 where: str = 'model') -> None:
  """Raises ValueError naming the offending `model.*` key; `resolution` is unused (text).

  `where` names the section in messages, e.g. 'model.text' for a dual encoder's text tower.
  """
  del resolution
  unknown = sorted(set(model_kwargs) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown text config keys {unknown} in {where}; allowed: {list(FIELDS)}')
  kw = {f: getattr(TextTransformer, f) for f in FIELDS} | dict(model_kwargs)
  _check_choices(kw, where)
  _check_values(kw, where)
