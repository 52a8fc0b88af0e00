"""Time-conditioned U-Net: diffusers `UNet2DModel` and `UNet2DConditionModel` (SD) architectures.

Legend: B batch, H/W height/width, C channels, T time-embedding width (4 * block_out_channels[0]),
L context length, D context width. Activations are NHWC.

Parameter paths follow diffusers' Flax naming (`down_blocks_0/resnets_0/conv1`,
`mid_block/attentions_0/to_q`, `up_blocks_2/upsamplers_0/conv`, ...), so a PyTorch
`UNet2DModel` state dict converts by renaming `x.0` -> `x_0`, transposing kernels
(conv OIHW -> HWIO, linear W -> W.T) and renaming norm `weight` -> `scale`,
embedding `weight` -> `embedding`. Cross-attention blocks (`CrossAttnDownBlock2D`,
`CrossAttnUpBlock2D`, `UNetMidBlock2DCrossAttn`) hold diffusers `Transformer2DModel`s under the
same names (`down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k`, `.../ff/net_0/proj`),
so a `UNet2DConditionModel` state dict converts by the same rules.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.nn import layers
from zoo.nn import unet_blocks as blocks

DOWN_BLOCK_TYPES = ('DownBlock2D', 'AttnDownBlock2D', 'CrossAttnDownBlock2D')
UP_BLOCK_TYPES = ('UpBlock2D', 'AttnUpBlock2D', 'CrossAttnUpBlock2D')
MID_BLOCK_TYPES = ('UNetMidBlock2D', 'UNetMidBlock2DCrossAttn')
ACT_AXES = ('act_batch', None, None, 'act_emb')
# Image-side tensors (3 or 4 channels) are never channel-sharded.
IMAGE_AXES = ('act_batch', None, None, None)

PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized: two levels, attention (3 heads) on the lower one, ~118k params.
    'tiny': dict(
        block_out_channels=(16, 24), layers_per_block=1,
        down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
        up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
        attention_head_dim=8, norm_num_groups=8),
    # Class-conditional 1-channel digits at 16x16 or 32x32; attention at 1/2 resolution.
    'digits': dict(
        in_channels=1, out_channels=1, block_out_channels=(32, 64, 96), layers_per_block=2,
        down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
        attention_head_dim=32, norm_num_groups=8, num_classes=10),
    # google/ddpm-cifar10-32: attention_head_dim null -> one head; TF-style (0, 1) downsample
    # padding; DDPM sin-first embedding with denominator half - 1.
    'ddpm-cifar10': dict(
        block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
        attention_head_dim=0, norm_num_groups=32, norm_eps=1e-6,
        flip_sin_to_cos=False, freq_shift=1.0, downsample_padding=0),
    # Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 unet/config.json; its
    # `attention_head_dim: 8` is the head count). 859,520,964 params, as diffusers.
    'sd15': dict(
        in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
        up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
        mid_block_type='UNetMidBlock2DCrossAttn', num_attention_heads=8, context_dim=768,
        norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0.0),
    # Test-sized text-to-image: 4-channel 8x8 latents (or in_channels=3 at 32x32), context
    # width 32, cross-attention (4 heads of 8) on the lower level and in the mid block; 253k.
    'tiny-t2i': dict(
        in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
        mid_block_type='UNetMidBlock2DCrossAttn', num_attention_heads=4, context_dim=32,
        norm_num_groups=8),
}


def preset(name: str) -> dict[str, Any]:
  """A fresh copy of the named preset's UNet keyword arguments."""
  if name not in PRESETS:
    raise ValueError(f'unknown UNet preset {name!r}; allowed: {sorted(PRESETS)}')
  return dict(PRESETS[name])


class UNet(nn.Module):
  """Diffusers `UNet2DModel` / `UNet2DConditionModel` (time, optional class and text conditioning).

  `attention_head_dim` is channels per head as in UNet2DModel (heads = C // it); 0 or None
  means one head spanning all channels (the HF `null`). `downsample_padding` 1 = symmetric,
  0 = TF-style (0, 1) as in the google/ddpm-* checkpoints. `num_classes` > 0 adds a
  `class_embedding` table of num_classes + 1 rows; row `num_classes` is the null class used
  when labels are omitted (classifier-free guidance). `context_dim` > 0 makes every attention
  block also attend to `context_BxLxD` (joint self+cross, diffusers added-KV style).

  Cross-attention blocks (`CrossAttn*` block types, `mid_block_type='UNetMidBlock2DCrossAttn'`)
  are SD's `Transformer2DModel`s attending to `context_BxLxD` (width `context_dim`, diffusers'
  `cross_attention_dim`) with `num_attention_heads` heads (SD1's config calls this
  `attention_head_dim`), `transformer_layers_per_block` transformer blocks each and a 1x1-conv
  (or, with `use_linear_projection`, linear) proj_in/proj_out. `context_mask_BxL` (True = real
  token; diffusers' `encoder_attention_mask`) hides padded context tokens from every attention.
  `mid_block_layers` is diffusers' mid-block `num_layers`: resnets_0, then that many (attention,
  resnet) pairs; UNet2DModel has 1, a UNet2DConditionModel or ControlNetModel with
  mid_block_type='UNetMidBlock2D' has 0 (one resnet, no attention).
  `remat` recomputes each resnet/attention/transformer block in the backward pass (same values,
  less activation memory). Output is float32 whatever the compute `dtype`.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple = (128, 256, 256, 256)
  layers_per_block: int = 2
  down_block_types: tuple = ('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D')
  up_block_types: tuple = ('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D')
  mid_block_attention: bool = True
  mid_block_type: str = 'UNetMidBlock2D'
  mid_block_layers: int = 1
  attention_head_dim: int | None = 8
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  dropout: float = 0.0
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  num_classes: int = 0
  context_dim: int = 0
  num_attention_heads: int = 8
  transformer_layers_per_block: int = 1
  use_linear_projection: bool = False
  remat: bool = False
  dtype: str = 'float32'

  def _settings(self):
    return blocks.BlockSettings(self.norm_num_groups, self.norm_eps, self.dropout,
                         self.attention_head_dim or 0, self.context_dim,
                         self.downsample_padding, layers.to_dtype(self.dtype),
                         self.num_attention_heads, self.transformer_layers_per_block,
                         self.use_linear_projection, self.remat)

  def _embed(self, t_B, labels_B, batch):
    """Time (+ class) embedding BxT."""
    c0, dtype = self.block_out_channels[0], layers.to_dtype(self.dtype)
    t_B = jnp.broadcast_to(jnp.asarray(t_B, jnp.float32), (batch,))
    emb_BxC = layers.timestep_embedding(
        t_B, c0, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
    temb_BxT = blocks.TimestepEmbedding(4 * c0, dtype, name='time_embedding')(emb_BxC)
    if self.num_classes > 0:
      if labels_B is None:
        labels_B = jnp.full((batch,), self.num_classes, jnp.int32)
      table = nn.Embed(
          self.num_classes + 1, 4 * c0, dtype=dtype, param_dtype=jnp.float32,
          embedding_init=nn.with_logical_partitioning(
              nn.initializers.normal(1.0), (None, 'embed')),
          name='class_embedding')
      temb_BxT = temb_BxT + table(jnp.asarray(labels_B, jnp.int32))
    elif labels_B is not None:
      raise ValueError('labels_B given but model.num_classes=0; set model.num_classes > 0')
    return nn.with_logical_constraint(temb_BxT, ('act_batch', 'act_emb'))

  def _check_inputs(self, x_BxHxWxC, context_BxLxD, context_mask_BxL, pooled_BxD):
    check_config(_fields(self), resolution=None)
    if pooled_BxD is not None:
      raise ValueError('UNet has no pooled-text path: pooled_BxD must be None')
    for axis, size in (('height', x_BxHxWxC.shape[1]), ('width', x_BxHxWxC.shape[2])):
      blocks.check_resolution(size, len(self.block_out_channels), 'UNet', f'input {axis}')
    if x_BxHxWxC.shape[-1] != self.in_channels:
      raise ValueError(
          f'input has {x_BxHxWxC.shape[-1]} channels but model.in_channels={self.in_channels}')
    if (context_BxLxD is not None) != (self.context_dim > 0):
      raise ValueError(f'model.context_dim={self.context_dim}: pass context_BxLxD iff it is > 0 '
                       f'(got {"None" if context_BxLxD is None else "a context"})')
    if context_BxLxD is not None and context_BxLxD.shape[-1] != self.context_dim:
      raise ValueError(f'context_BxLxD has width {context_BxLxD.shape[-1]} but '
                       f'model.context_dim={self.context_dim}')
    if context_mask_BxL is not None and (
        context_BxLxD is None or tuple(context_mask_BxL.shape) != context_BxLxD.shape[:2]):
      raise ValueError(f'context_mask_BxL must be None or shaped like context_BxLxD[:2]; got '
                       f'{tuple(context_mask_BxL.shape)} with context '
                       f'{None if context_BxLxD is None else context_BxLxD.shape}')

  def _encoder(self, x_BxHxWxC, temb, ctx, train, hint=None):
    """conv_in (plus a ControlNet's embedded hint), the down blocks and the mid block.

    Returns (mid-block output, skips): the skips are what the up blocks concatenate, in order.
    """
    s, levels = self._settings(), len(self.block_out_channels)
    h = nn.with_logical_constraint(x_BxHxWxC, IMAGE_AXES)
    h = layers.conv(self.block_out_channels[0], 3, dtype=s.dtype,
                    axes=(None, None, None, 'conv_out'), name='conv_in')(h)
    if hint is not None:
      h = h + hint.astype(h.dtype)
    skips = [h]
    for i, (kind, ch) in enumerate(zip(self.down_block_types, self.block_out_channels)):
      h, new_skips = blocks.DownBlock(ch, self.layers_per_block, kind == 'AttnDownBlock2D',
                               i < levels - 1, s, kind == 'CrossAttnDownBlock2D',
                               name=f'down_blocks_{i}')(h, temb, ctx[0], train, ctx[1])
      skips += new_skips
      h = nn.with_logical_constraint(h, ACT_AXES)
    mid_cross = self.mid_block_type == 'UNetMidBlock2DCrossAttn'
    h = blocks.MidBlock(self.block_out_channels[-1], self.mid_block_attention and not mid_cross, s,
                        mid_cross, self.mid_block_layers, name='mid_block')(
                            h, temb, ctx[0], train, ctx[1])
    return h, skips

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, *, labels_B=None, context_BxLxD=None,
               context_mask_BxL=None, pooled_BxD=None, control=None, train=False):
    """Predicts a BxHxWx`out_channels` float32 map from a noisy input and timesteps t_B.

    t_B may be a scalar or a length-B vector, integer or continuous. Dropout draws from the
    'dropout' rng only when `train` is True. `control` (a `Residuals` of one or more
    ControlNets, zoo/models/controlnet.py) is added to the skips and to the mid-block output,
    as diffusers' `down_block_additional_residuals` / `mid_block_additional_residual`.
    """
    self._check_inputs(x_BxHxWxC, context_BxLxD, context_mask_BxL, pooled_BxD)
    ctx = (context_BxLxD, context_mask_BxL)
    s, levels = self._settings(), len(self.block_out_channels)
    temb = self._embed(t_B, labels_B, x_BxHxWxC.shape[0])
    h, skips = self._encoder(x_BxHxWxC, temb, ctx, train)
    if control is not None:
      skips, h = _add_control(skips, h, control)
    for i, (kind, ch) in enumerate(zip(self.up_block_types, self.block_out_channels[::-1])):
      h = blocks.UpBlock(ch, self.layers_per_block + 1, kind == 'AttnUpBlock2D', i < levels - 1, s,
                  kind == 'CrossAttnUpBlock2D', name=f'up_blocks_{i}')(
                      h, skips, temb, ctx[0], train, ctx[1])
      h = nn.with_logical_constraint(h, ACT_AXES)
    h = nn.silu(layers.GroupNorm(self.norm_num_groups, self.norm_eps, s.dtype,
                                 name='conv_norm_out')(h))
    out = layers.conv(self.out_channels, 3, dtype=s.dtype, axes=(None, None, 'conv_in', None),
                      name='conv_out')(h)
    return nn.with_logical_constraint(out.astype(jnp.float32), IMAGE_AXES)


def _add_control(skips, h, control):
  """(skips + control.down, h + control.mid), shapes checked."""
  down, mid = control
  got = [tuple(r.shape) for r in down]
  want = [tuple(r.shape) for r in skips]
  if got != want or tuple(mid.shape) != tuple(h.shape):
    raise ValueError(f'control residuals {got} + mid {tuple(mid.shape)} do not fit this UNet: it '
                     f'has skips {want} and mid {tuple(h.shape)} (a ControlNet of another base?)')
  return [s + r.astype(s.dtype) for s, r in zip(skips, down)], h + mid.astype(h.dtype)


FIELDS = tuple(f.name for f in dataclasses.fields(UNet) if f.name not in ('parent', 'name'))


def _fields(module: UNet) -> dict[str, Any]:
  return {f: getattr(module, f) for f in FIELDS}


def _check_choices(kw):
  for key, allowed in (('down_block_types', DOWN_BLOCK_TYPES), ('up_block_types', UP_BLOCK_TYPES)):
    bad = [b for b in kw[key] if b not in allowed]
    if bad:
      raise ValueError(f'model.{key} has unknown block types {bad}; allowed: {list(allowed)}')
  if kw['mid_block_type'] not in MID_BLOCK_TYPES:
    raise ValueError(f"model.mid_block_type={kw['mid_block_type']!r}; "
                     f'allowed: {list(MID_BLOCK_TYPES)}')
  if kw['dtype'] not in layers.DTYPES:
    raise ValueError(f"model.dtype={kw['dtype']!r}; allowed: {sorted(layers.DTYPES)}")
  if kw['downsample_padding'] not in (0, 1):
    raise ValueError(f"model.downsample_padding={kw['downsample_padding']}; allowed: [0, 1]")


def _check_widths(kw):
  groups, head_dim = kw['norm_num_groups'], kw['attention_head_dim'] or 0
  for ch in kw['block_out_channels']:
    if groups <= 0 or ch % groups:
      raise ValueError(f'model.block_out_channels entry {ch} is not divisible by '
                       f"model.norm_num_groups={kw['norm_num_groups']}")
  attn_channels = [ch for ch, b in zip(kw['block_out_channels'], kw['down_block_types'])
                   if b.startswith('Attn')]
  attn_channels += [ch for ch, b in zip(kw['block_out_channels'][::-1], kw['up_block_types'])
                    if b.startswith('Attn')]
  if kw['mid_block_attention'] and kw['mid_block_type'] == 'UNetMidBlock2D' and kw[
      'mid_block_layers']:
    attn_channels.append(kw['block_out_channels'][-1])
  for ch in attn_channels:
    if head_dim < 0 or (head_dim and ch % head_dim):
      raise ValueError(f'model.attention_head_dim={head_dim} must divide attention block '
                       f'width {ch} (0 or None = one head)')


def _cross_attention_widths(kw):
  """Channel widths of the cross-attention (Transformer2D) blocks."""
  chans = kw['block_out_channels']
  widths = [ch for ch, b in zip(chans, kw['down_block_types']) if b.startswith('CrossAttn')]
  widths += [ch for ch, b in zip(chans[::-1], kw['up_block_types']) if b.startswith('CrossAttn')]
  if kw['mid_block_type'] == 'UNetMidBlock2DCrossAttn' and kw['mid_block_layers']:
    widths.append(chans[-1])
  return widths


def _check_cross_attention(kw):
  widths = _cross_attention_widths(kw)
  for key in ('num_attention_heads', 'transformer_layers_per_block'):
    if kw[key] < 1:
      raise ValueError(f'model.{key}={kw[key]} must be >= 1')
  if widths and kw['context_dim'] <= 0:
    raise ValueError('cross-attention blocks (CrossAttn* block types or mid_block_type='
                     f"'UNetMidBlock2DCrossAttn') need model.context_dim > 0, got "
                     f"{kw['context_dim']}")
  for ch in widths:
    if ch % kw['num_attention_heads']:
      raise ValueError(f"model.num_attention_heads={kw['num_attention_heads']} must divide "
                       f'cross-attention block width {ch}')
  if kw['mid_block_layers'] < 0 or (kw['mid_block_layers'] == 0 and (
      kw['mid_block_attention'] or kw['mid_block_type'] != 'UNetMidBlock2D')):
    raise ValueError(f"model.mid_block_layers={kw['mid_block_layers']} must be >= 1, or 0 with "
                     "mid_block_type='UNetMidBlock2D' and mid_block_attention=False (one resnet)")
  if kw['mid_block_type'] == 'UNetMidBlock2DCrossAttn' and not kw['mid_block_attention']:
    raise ValueError("model.mid_block_attention=False contradicts mid_block_type="
                     "'UNetMidBlock2DCrossAttn' (it always has attention); use 'UNetMidBlock2D'")


def check_config(model_kwargs: dict[str, Any], resolution: int | None) -> None:
  """Raises ValueError naming the offending `model.*` key for an invalid UNet configuration.

  Unknown keys are rejected; missing keys take the UNet defaults. `resolution` (None to skip)
  must be divisible by 2**(levels - 1).
  """
  unknown = sorted(set(model_kwargs) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown UNet config keys {unknown}; allowed: {list(FIELDS)}')
  kw = {f: getattr(UNet, f) for f in FIELDS} | dict(model_kwargs)
  levels = len(kw['block_out_channels'])
  if levels < 1:
    raise ValueError('model.block_out_channels must be non-empty')
  for key in ('down_block_types', 'up_block_types'):
    if len(kw[key]) != levels:
      raise ValueError(f'model.{key} has {len(kw[key])} entries but model.block_out_channels '
                       f'has {levels}; they must match')
  _check_choices(kw)
  _check_widths(kw)
  _check_cross_attention(kw)
  for key, lo in (('layers_per_block', 1), ('in_channels', 1), ('out_channels', 1),
                  ('num_classes', 0), ('context_dim', 0)):
    if kw[key] < lo:
      raise ValueError(f'model.{key}={kw[key]} must be >= {lo}')
  if not 0.0 <= kw['dropout'] < 1.0:
    raise ValueError(f"model.dropout={kw['dropout']} must be in [0, 1)")
  if resolution is not None:
    blocks.check_resolution(resolution, levels, 'UNet')
