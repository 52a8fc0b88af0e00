"""Diffusion Transformer (DiT, Peebles & Xie 2023) with adaLN-Zero conditioning.

Legend: B batch, H/W image height/width, C input channels, O output channels, G patch-grid side
(input_size // patch_size), N tokens (G*G), P patch side, D hidden size, A heads, K head width,
F sinusoidal timestep width (256). Activations are NHWC at the edges, BxNxD inside.

Parameter paths follow the facebookresearch/DiT `models.py` names (`a.0.b` -> `a_0/b`):
  x_embedder/proj, t_embedder/{mlp_0, mlp_2}, y_embedder/embedding_table,
  blocks_i/{attn/qkv, attn/proj, mlp/fc1, mlp/fc2, adaLN_modulation_1},
  final_layer/{adaLN_modulation_1, linear};
text conditioning adds context_embedder, pooled_embedder/{linear_1, linear_2} and
blocks_i/cross_attn/{q_linear, kv_linear, proj} (PixArt-alpha names). zoo.convert.dit reads
original and diffusers `DiTTransformer2DModel` checkpoints. diffusers embeds timesteps with
`downscale_freq_shift=1`, the original with 0: set `freq_shift` to match the checkpoint.

With `learn_sigma` the output has 2*C channels: [..., :C] is the ε prediction and [..., C:]
the iDDPM variance interpolation v. The diffusion task must take the first C channels as ε.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from zoo.nn import dit_layers as dl
from zoo.nn import layers
from zoo.nn import stack

FREQ_DIM = 256
LN_EPS = dl.LN_EPS
ACT_AXES = ('act_batch', 'act_len', 'act_emb')
IMAGE_AXES = ('act_batch', None, None, None)

SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}

PRESETS: dict[str, dict[str, Any]] = {
    f'DiT-{size}/{patch}': {'depth': depth, 'hidden_size': hidden, 'num_heads': heads,
                            'patch_size': patch}
    for size, (depth, hidden, heads) in SIZES.items() for patch in (2, 4, 8)
}
# Test-sized: 8x8 latents, 16 tokens, two blocks of width 32, 51,168 params.
PRESETS['tiny'] = {'input_size': 8, 'patch_size': 2, 'in_channels': 4, 'hidden_size': 32,
                   'depth': 2, 'num_heads': 4, 'num_classes': 10}
# Test-sized text-to-image: tiny plus 32-wide token and pooled text inputs, no labels.
PRESETS['tiny-t2i'] = PRESETS['tiny'] | {'num_classes': 0, 'context_dim': 32, 'pooled_dim': 32}


def preset(name: str) -> dict[str, Any]:
  """A fresh copy of the named preset's DiT keyword arguments."""
  if name not in PRESETS:
    raise ValueError(f'unknown DiT preset {name!r}; allowed: {sorted(PRESETS)}')
  return dict(PRESETS[name])


def _modulate(x_BxNxD, shift_BxD, scale_BxD):
  return x_BxNxD * (1 + scale_BxD[:, None, :]) + shift_BxD[:, None, :]


@functools.lru_cache(maxsize=16)
def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
  """Fixed MAE 2-D sin-cos positions, (grid*grid)xdim float32, rows in row-major patch order.

  The first dim/2 columns encode the column (w) index, the last dim/2 the row (h) index, each
  as [sin, cos] with frequencies 10000**(-i / (dim/4)); computed in float64 like the reference.
  """
  omega_Q = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows_N, cols_N = (a.reshape(-1) for a in np.meshgrid(np.arange(grid), np.arange(grid),
                                                       indexing='ij'))

  def one_axis(pos_N):
    out_NxQ = np.outer(pos_N.astype(np.float64), omega_Q)
    return np.concatenate([np.sin(out_NxQ), np.cos(out_NxQ)], axis=1)

  return np.concatenate([one_axis(cols_N), one_axis(rows_N)], axis=1).astype(np.float32)


class DiTBlock(nn.Module):
  """x + gate * f(modulate(LN(x))) for f = attention, then MLP; shift/scale/gate from c.

  With `cross_attention`, x + cross_attn(LN(x), ctx) sits between the two (PixArt-alpha),
  unmodulated and ungated; its LayerNorm has no affine parameters because it feeds only the
  q projection, which absorbs any per-channel scale and shift.
  """
  num_heads: int
  mlp_ratio: float
  dtype: Any
  norm_eps: float = LN_EPS
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x_BxNxD, c_BxD, ctx_BxLxD=None, mask_BxL=None):
    hidden = x_BxNxD.shape[-1]
    mod_Bx6D = dl.dense(6 * hidden, ('embed', 'mlp'), dl.ZEROS, self.dtype, 'adaLN_modulation_1')(
        nn.silu(c_BxD))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        m.astype(jnp.float32) for m in jnp.split(mod_Bx6D, 6, axis=-1))
    h = _modulate(dl.layer_norm(x_BxNxD, self.norm_eps), shift_msa, scale_msa).astype(self.dtype)
    x_BxNxD = x_BxNxD + gate_msa[:, None, :] * dl.SelfAttention(
        self.num_heads, self.dtype, name='attn')(h)
    if self.cross_attention:
      h = dl.layer_norm(x_BxNxD, self.norm_eps).astype(self.dtype)
      x_BxNxD = x_BxNxD + dl.CrossAttention(self.num_heads, self.dtype, name='cross_attn')(
          h, ctx_BxLxD, mask_BxL).astype(jnp.float32)
    h = _modulate(dl.layer_norm(x_BxNxD, self.norm_eps), shift_mlp, scale_mlp).astype(self.dtype)
    x_BxNxD = x_BxNxD + gate_mlp[:, None, :] * dl.Mlp(
        int(hidden * self.mlp_ratio), self.dtype, name='mlp')(h)
    return x_BxNxD


class FinalLayer(nn.Module):
  """modulate(LN(x)) with a 2*D adaLN, then a zero-initialised linear to P*P*O per token."""
  out_features: int
  dtype: Any
  norm_eps: float = LN_EPS

  @nn.compact
  def __call__(self, x_BxNxD, c_BxD):
    mod_Bx2D = dl.dense(2 * x_BxNxD.shape[-1], ('embed', 'mlp'), dl.ZEROS, self.dtype,
                        'adaLN_modulation_1')(nn.silu(c_BxD))
    shift_BxD, scale_BxD = jnp.split(mod_Bx2D.astype(jnp.float32), 2, axis=-1)
    h = _modulate(dl.layer_norm(x_BxNxD, self.norm_eps), shift_BxD, scale_BxD).astype(self.dtype)
    return dl.dense(self.out_features, ('embed', None), dl.ZEROS, self.dtype, 'linear')(h)


class TimestepEmbedder(nn.Module):
  """256-d cos-first sinusoid -> mlp_0 -> SiLU -> mlp_2 (weights N(0, 0.02))."""
  hidden_size: int
  freq_shift: float
  dtype: Any

  @nn.compact
  def __call__(self, t_B):
    emb_BxF = layers.timestep_embedding(t_B, FREQ_DIM, flip_sin_to_cos=True,
                                        freq_shift=self.freq_shift)
    h = dl.dense(self.hidden_size, (None, 'mlp'), dl.NORMAL_002, self.dtype, 'mlp_0')(emb_BxF)
    return dl.dense(self.hidden_size, ('mlp', 'embed'), dl.NORMAL_002, self.dtype, 'mlp_2')(
        nn.silu(h))


class PatchEmbed(nn.Module):
  """timm `PatchEmbed`: a PxP stride-P conv `proj`, initialised like the linear it is."""
  hidden_size: int
  patch_size: int
  dtype: Any

  @nn.compact
  def __call__(self, x_BxHxWxC):
    p = self.patch_size
    # xavier over the flattened (P*P*C, D) matrix, as DiT's initialize_weights.
    kernel_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform',
                                                   in_axis=(0, 1, 2), out_axis=3)
    return nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                   param_dtype=jnp.float32,
                   kernel_init=dl.with_axes(kernel_init, (None, None, None, 'embed')),
                   bias_init=dl.with_axes(dl.ZEROS, ('embed',)), name='proj')(x_BxHxWxC)


class LabelEmbedder(nn.Module):
  """`embedding_table` of num_classes + 1 rows (the last is the null class), N(0, 0.02)."""
  num_classes: int
  hidden_size: int
  dtype: Any

  @nn.compact
  def __call__(self, labels_B):
    return nn.Embed(self.num_classes + 1, self.hidden_size, dtype=self.dtype,
                    param_dtype=jnp.float32,
                    embedding_init=dl.with_axes(dl.NORMAL_002, (None, 'embed')),
                    name='embedding_table')(jnp.asarray(labels_B, jnp.int32))


class PooledEmbedder(nn.Module):
  """SD3 `text_embedder`: linear_1 -> SiLU -> linear_2 (weights N(0, 0.02), like t_embedder)."""
  hidden_size: int
  dtype: Any

  @nn.compact
  def __call__(self, pooled_BxE):
    h = dl.dense(self.hidden_size, (None, 'mlp'), dl.NORMAL_002, self.dtype, 'linear_1')(pooled_BxE)
    return dl.dense(self.hidden_size, ('mlp', 'embed'), dl.NORMAL_002, self.dtype, 'linear_2')(
        nn.silu(h))


class DiT(nn.Module):
  """Class-conditional DiT over NHWC latents: patchify, adaLN-Zero blocks, unpatchify.

  `num_classes` > 0 adds a label table of num_classes + 1 rows; row `num_classes` is the null
  class, used when `labels_B` is None (classifier-free guidance; the task does label dropout).
  `num_classes` = 0 is unconditional. `freq_shift` is the timestep-embedding denominator shift:
  0 = original DiT, 1 = diffusers `DiTTransformer2DModel`. `norm_eps` is every LayerNorm's
  epsilon; `remat` recomputes each block in the backward pass (same values, less memory).

  Text conditioning (either, both or neither):
  - `context_dim` > 0: `context_BxLxD` (B x L x context_dim token features) is projected once to
    hidden_size by the `context_embedder` Linear and read by a cross-attention sub-layer in
    every block (see DiTBlock); `context_mask_BxL` (True = real token; default all True) hides
    padding.
  - `pooled_dim` > 0: `pooled_BxD` (B x pooled_dim) goes through `pooled_embedder` and is added
    to c = t_emb + y_emb, so it steers every adaLN.
  Params are float32; `dtype` is the compute dtype; the output is float32. At init the output
  is exactly zero (adaLN-Zero; the cross-attention output projections are zero too).
  """
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  learn_sigma: bool = True
  freq_shift: float = 0.0
  norm_eps: float = LN_EPS
  remat: bool = False
  context_dim: int = 0
  pooled_dim: int = 0
  dtype: str = 'float32'

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  def _condition(self, t_B, labels_B, pooled_BxE, batch, dtype):
    """c = t_emb + y_emb (+ pooled_emb), BxD."""
    t_B = jnp.broadcast_to(jnp.asarray(t_B, jnp.float32), (batch,))
    c_BxD = TimestepEmbedder(self.hidden_size, self.freq_shift, dtype, name='t_embedder')(t_B)
    if self.num_classes > 0:
      if labels_B is None:
        labels_B = jnp.full((batch,), self.num_classes, jnp.int32)
      c_BxD = c_BxD + LabelEmbedder(self.num_classes, self.hidden_size, dtype,
                                    name='y_embedder')(labels_B)
    elif labels_B is not None:
      raise ValueError('labels_B given but model.num_classes=0; set model.num_classes > 0')
    if self.pooled_dim > 0:
      c_BxD = c_BxD + PooledEmbedder(self.hidden_size, dtype, name='pooled_embedder')(
          jnp.asarray(pooled_BxE, jnp.float32))
    return nn.with_logical_constraint(c_BxD, ('act_batch', 'act_emb'))

  def _check_inputs(self, x_BxHxWxC, context_BxLxD, context_mask_BxL, pooled_BxD):
    check_config(_fields(self), resolution=None)
    batch = x_BxHxWxC.shape[0]
    _check_optional('context_BxLxD', context_BxLxD, 'context_dim', self.context_dim, batch)
    _check_optional('pooled_BxD', pooled_BxD, 'pooled_dim', self.pooled_dim, batch)
    if context_mask_BxL is not None:
      if context_BxLxD is None:
        raise ValueError('context_mask_BxL given without context_BxLxD')
      if tuple(context_mask_BxL.shape) != tuple(context_BxLxD.shape[:2]):
        raise ValueError(f'context_mask_BxL has shape {tuple(context_mask_BxL.shape)} but '
                         f'context_BxLxD is {tuple(context_BxLxD.shape)}; want (B, L)')
    want = (self.input_size, self.input_size, self.in_channels)
    if tuple(x_BxHxWxC.shape[1:]) != want:
      raise ValueError(f'input is {tuple(x_BxHxWxC.shape[1:])} (HxWxC) but the model expects '
                       f'{want} (model.input_size, model.input_size, model.in_channels)')

  def _unpatchify(self, x_BxNxPPO):
    batch, grid, p = x_BxNxPPO.shape[0], self.input_size // self.patch_size, self.patch_size
    x = x_BxNxPPO.reshape(batch, grid, grid, p, p, self.out_channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(
        batch, grid * p, grid * p, self.out_channels)

  def _context(self, context_BxLxD, context_mask_BxL, dtype):
    """(context_embedder(ctx) BxLxD, bool mask BxL), or (None, None) without text tokens."""
    if self.context_dim == 0:
      return None, None
    ctx_BxLxD = dl.dense(self.hidden_size, (None, 'embed'), dl.XAVIER, dtype, 'context_embedder')(
        jnp.asarray(context_BxLxD).astype(dtype))
    if context_mask_BxL is None:
      return ctx_BxLxD, jnp.ones(ctx_BxLxD.shape[:2], bool)
    return ctx_BxLxD, jnp.asarray(context_mask_BxL).astype(bool)

  def _tokens(self, x_BxHxWxC, dtype):
    """Patch embeddings plus the fixed positions, BxNxD float32."""
    x = nn.with_logical_constraint(x_BxHxWxC, IMAGE_AXES)
    h = PatchEmbed(self.hidden_size, self.patch_size, dtype, name='x_embedder')(x)
    pos_NxD = sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size)
    # The residual stream stays float32 under bf16 compute; only block inputs are cast.
    return h.reshape(x.shape[0], -1, self.hidden_size).astype(jnp.float32) + pos_NxD[None]

  def _block(self, i, dtype):
    # remat recomputes each block's activations in the backward pass; params keep their paths.
    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    return block_cls(self.num_heads, self.mlp_ratio, dtype, self.norm_eps, self.context_dim > 0,
                     name=f'blocks_{i}')

  def _blocks(self, h, c_BxD, ctx_BxLxD, mask_BxL, control, dtype):
    """The depth blocks, each followed by its control residual (if any); one `lax.scan` over
    the blocks' params once they exist (zoo/nn/stack.py: 2.4x faster a train step on CPU)."""
    interval = _check_control(control, h.shape, self.depth)
    residuals = [control[i // interval] for i in range(self.depth)] if control else None
    if stack.use_scan(self):
      block = DiTBlock(self.num_heads, self.mlp_ratio, dtype, self.norm_eps,
                       self.context_dim > 0)
      return stack.scan(self, block, [f'blocks_{i}' for i in range(self.depth)], h, c_BxD,
                        ctx_BxLxD, mask_BxL, residuals=residuals, axes=ACT_AXES,
                        remat=self.remat)
    for i in range(self.depth):
      h = self._block(i, dtype)(h, c_BxD, ctx_BxLxD, mask_BxL)
      if residuals:
        h = h + residuals[i].astype(h.dtype)
      h = nn.with_logical_constraint(h, ACT_AXES)
    return h

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, *, labels_B=None, context_BxLxD=None,
               context_mask_BxL=None, pooled_BxD=None, control=None, train=False):
    """Predicts a BxHxWxO float32 map (O = 2C with learn_sigma) from noisy latents and t_B.

    t_B may be a scalar or a length-B vector, integer or continuous. An input the config does
    not use, or one it needs but is not given, raises ValueError. `train` is accepted for the
    task interface; DiT has no dropout. `control` (K BxNxD residuals of a DiT ControlNet,
    zoo/models/controlnet.py) adds residual i // ceil(depth / K) after block i, as diffusers'
    SD3 `block_controlnet_hidden_states`.
    """
    del train
    self._check_inputs(x_BxHxWxC, context_BxLxD, context_mask_BxL, pooled_BxD)
    dtype, batch, p = layers.to_dtype(self.dtype), x_BxHxWxC.shape[0], self.patch_size
    h = self._tokens(x_BxHxWxC, dtype)
    c_BxD = self._condition(t_B, labels_B, pooled_BxD, batch, dtype)
    ctx_BxLxD, mask_BxL = self._context(context_BxLxD, context_mask_BxL, dtype)
    h = self._blocks(h, c_BxD, ctx_BxLxD, mask_BxL, control, dtype)
    out = FinalLayer(p * p * self.out_channels, dtype, self.norm_eps, name='final_layer')(
        h, c_BxD)
    out = self._unpatchify(out.astype(jnp.float32))
    return nn.with_logical_constraint(out, IMAGE_AXES)


def _check_control(control, tokens_shape, depth):
  """Blocks per control residual (SD3's ceil(depth / K)); ValueError for residuals that misfit."""
  if not control:
    return 1
  shapes = {tuple(r.shape) for r in control}
  if shapes != {tuple(tokens_shape)} or len(control) > depth:
    raise ValueError(f'{len(control)} control residuals of shapes {sorted(shapes)} do not fit this '
                     f'DiT: it takes at most depth={depth} of shape {tuple(tokens_shape)}')
  return -(-depth // len(control))


FIELDS = tuple(f.name for f in dataclasses.fields(DiT) if f.name not in ('parent', 'name'))
MODEL = DiT


def _fields(module: DiT) -> dict[str, Any]:
  return {f: getattr(module, f) for f in FIELDS}


def _check_optional(arg, value, key, dim, batch):
  """A `dim`-wide conditioning input must be given iff model.`key` > 0, shaped (B, ..., dim)."""
  if value is None and dim > 0:
    raise ValueError(f'{arg} is missing but model.{key}={dim} > 0 needs it')
  if value is not None and dim == 0:
    raise ValueError(f'{arg} given but model.{key}=0; set model.{key} to its width to use it')
  if value is not None:
    want_ndim = 3 if arg == 'context_BxLxD' else 2
    shape = tuple(value.shape)
    if len(shape) != want_ndim or shape[0] != batch or shape[-1] != dim:
      raise ValueError(f'{arg} has shape {shape}; want {want_ndim} axes, batch {batch} and '
                       f'width model.{key}={dim}')


def _check_positive(kw):
  for key in ('input_size', 'patch_size', 'in_channels', 'hidden_size', 'depth', 'num_heads'):
    if kw[key] < 1:
      raise ValueError(f'model.{key}={kw[key]} must be >= 1')
  if kw['num_classes'] < 0:
    raise ValueError(f"model.num_classes={kw['num_classes']} must be >= 0 (0 = unconditional)")
  if kw['mlp_ratio'] <= 0 or int(kw['hidden_size'] * kw['mlp_ratio']) < 1:
    raise ValueError(f"model.mlp_ratio={kw['mlp_ratio']} must be > 0 and give an MLP width >= 1")
  for key in ('context_dim', 'pooled_dim'):
    if kw[key] < 0:
      raise ValueError(f'model.{key}={kw[key]} must be >= 0 (0 = no such input)')
  if not kw['norm_eps'] > 0:
    raise ValueError(f"model.norm_eps={kw['norm_eps']} must be > 0 (LayerNorm epsilon)")
  if not 0 <= kw['freq_shift'] < FREQ_DIM // 2:
    raise ValueError(f"model.freq_shift={kw['freq_shift']} must be in [0, {FREQ_DIM // 2}); "
                     '0 = original DiT, 1 = diffusers')


def _check_shapes(kw, resolution):
  if kw['input_size'] % kw['patch_size']:
    raise ValueError(f"model.input_size={kw['input_size']} must be divisible by "
                     f"model.patch_size={kw['patch_size']}")
  if kw['hidden_size'] % kw['num_heads']:
    raise ValueError(f"model.hidden_size={kw['hidden_size']} must be divisible by "
                     f"model.num_heads={kw['num_heads']}")
  if kw['hidden_size'] % 4:
    raise ValueError(f"model.hidden_size={kw['hidden_size']} must be divisible by 4 "
                     '(2-D sin-cos positions use sin and cos per axis)')
  if resolution is not None and resolution != kw['input_size']:
    raise ValueError(f'resolution={resolution} must equal model.input_size={kw["input_size"]} '
                     '(DiT positions are fixed to one grid)')


def check_config(model_kwargs: dict[str, Any], resolution: int | None) -> None:
  """Raises ValueError naming the offending `model.*` key for an invalid DiT configuration.

  Unknown keys are rejected; missing keys take the DiT defaults. `resolution` (None to skip)
  is the data resolution the model sees and must equal `input_size`.
  """
  unknown = sorted(set(model_kwargs) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown DiT config keys {unknown}; allowed: {list(FIELDS)}')
  kw = {f: getattr(DiT, f) for f in FIELDS} | dict(model_kwargs)
  if kw['dtype'] not in layers.DTYPES:
    raise ValueError(f"model.dtype={kw['dtype']!r}; allowed: {sorted(layers.DTYPES)}")
  _check_positive(kw)
  _check_shapes(kw, resolution)
