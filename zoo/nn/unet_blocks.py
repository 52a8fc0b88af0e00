"""U-Net building blocks shared by the diffusion U-Net and the VAE (diffusers names).

Legend: B batch, H/W height/width, C channels, T time-embedding width, L context length,
D context width. Activations are NHWC.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.nn import layers


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-conv twice with the projected time embedding (if any) added in between."""
  out_channels: int
  num_groups: int
  eps: float
  dropout: float
  dtype: Any
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC, temb_BxT, train):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layers.GroupNorm(self.num_groups, self.eps, name=name, **kw)
    h = layers.conv(self.out_channels, 3, name='conv1', **kw)(
        nn.silu(norm('norm1')(x_BxHxWxC)))
    if temb_BxT is not None:  # None: no time_emb_proj at all (the VAE's ResnetBlock2D).
      t_BxC = layers.dense(self.out_channels, ('embed', 'conv_out'), name='time_emb_proj', **kw)(
          nn.silu(temb_BxT))
      h = h + t_BxC[:, None, None, :]
    h = nn.silu(norm('norm2')(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = layers.conv(self.out_channels, 3, name='conv2', **kw)(h)
    skip = x_BxHxWxC.astype(self.dtype)
    if x_BxHxWxC.shape[-1] != self.out_channels:
      skip = layers.conv(self.out_channels, 1, padding='VALID', name='conv_shortcut', **kw)(skip)
    return skip + h


class Downsample(nn.Module):
  """3x3 stride-2 conv; padding 1 is symmetric, padding 0 pads (0, 1) like TF 'SAME' (DDPM)."""
  channels: int
  padding: int
  dtype: Any
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return layers.conv(self.channels, 3, strides=2, padding=pad, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='conv')(x_BxHxWxC)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv."""
  channels: int
  dtype: Any
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC):
    x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)
    return layers.conv(self.channels, 3, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='conv')(x)


class TimestepEmbedding(nn.Module):
  """linear_1 -> SiLU -> linear_2 (diffusers `TimestepEmbedding`)."""
  features: int
  dtype: Any
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, emb_BxF):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.dense(self.features, ('embed', 'mlp'), name='linear_1', **kw)(emb_BxF)
    return layers.dense(self.features, ('mlp', 'embed'), name='linear_2', **kw)(nn.silu(h))


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """Settings shared by every block of one UNet (hashable, so it can be a module field)."""
  num_groups: int
  eps: float
  dropout: float
  head_dim: int
  context_dim: int
  downsample_padding: int
  dtype: Any
  heads: int = 8  # Cross-attention (Transformer2D) heads.
  transformer_layers: int = 1
  use_linear_projection: bool = False
  remat: bool = False

  def resnet(self, out_channels, name):
    """A ResnetBlock with these settings (rematerialised in the backward pass with `remat`)."""
    # static_argnums counts `self`: argument 3 is the Python bool `train`.
    cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock
    return cls(out_channels, self.num_groups, self.eps, self.dropout, self.dtype, name=name)

  def attention(self, name):
    """A U-Net Attention block with these settings."""
    cls = nn.remat(layers.Attention) if self.remat else layers.Attention
    return cls(head_dim=self.head_dim, num_groups=self.num_groups, epsilon=self.eps,
               context_dim=self.context_dim, dtype=self.dtype, name=name)

  def transformer(self, name):
    """A cross-attention `Transformer2DModel` block with these settings."""
    return layers.Transformer2D(self.heads, self.transformer_layers, self.num_groups,
                                self.use_linear_projection, self.remat, self.dtype, name=name)

  def attend(self, kind, name, h, context, context_mask):
    """h through the block's attention: kind 'attn' (UNet2DModel), 'cross' or None (identity)."""
    if kind == 'attn':
      return self.attention(name)(h, context, context_mask)
    if kind == 'cross':
      return self.transformer(name)(h, context, context_mask)
    return h


def _kind(attention: bool, cross_attention: bool):
  return 'cross' if cross_attention else 'attn' if attention else None


class DownBlock(nn.Module):
  """`DownBlock2D` / `AttnDownBlock2D` / `CrossAttnDownBlock2D`: resnets (+ attentions), downsample.

  The downsampler is optional (not on the last level).

  Returns the output and the activations it contributes to the skip stack.
  """
  out_channels: int
  num_layers: int
  attention: bool
  downsample: bool
  s: BlockSettings
  cross_attention: bool = False

  @nn.compact
  def __call__(self, h, temb, context, train, context_mask=None):
    skips, kind = [], _kind(self.attention, self.cross_attention)
    for j in range(self.num_layers):
      h = self.s.resnet(self.out_channels, f'resnets_{j}')(h, temb, train)
      h = self.s.attend(kind, f'attentions_{j}', h, context, context_mask)
      skips.append(h)
    if self.downsample:
      h = Downsample(self.out_channels, self.s.downsample_padding, self.s.dtype,
                     name='downsamplers_0')(h)
      skips.append(h)
    return h, skips


class UpBlock(nn.Module):
  """`UpBlock2D` / `AttnUpBlock2D` / `CrossAttnUpBlock2D`: skip concat, resnet (+ attention).

  Per layer: concatenate a skip, resnet, attention (if any); then an optional upsampler.

  `skips` None concatenates nothing (the VAE decoder's `UpDecoderBlock2D`).
  """
  out_channels: int
  num_layers: int
  attention: bool
  upsample: bool
  s: BlockSettings
  cross_attention: bool = False

  @nn.compact
  def __call__(self, h, skips, temb, context, train, context_mask=None):
    kind = _kind(self.attention, self.cross_attention)
    for j in range(self.num_layers):
      if skips is not None:
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = self.s.resnet(self.out_channels, f'resnets_{j}')(h, temb, train)
      h = self.s.attend(kind, f'attentions_{j}', h, context, context_mask)
    if self.upsample:
      h = Upsample(self.out_channels, self.s.dtype, name='upsamplers_0')(h)
    return h


class MidBlock(nn.Module):
  """`UNetMidBlock2D` / `UNetMidBlock2DCrossAttn`: resnets_0, then `layers` times an optional
  attentions_i and resnets_{i+1} (diffusers' num_layers)."""
  channels: int
  attention: bool
  s: BlockSettings
  cross_attention: bool = False
  layers: int = 1

  @nn.compact
  def __call__(self, h, temb, context, train, context_mask=None):
    h = self.s.resnet(self.channels, 'resnets_0')(h, temb, train)
    for i in range(self.layers):
      h = self.s.attend(_kind(self.attention, self.cross_attention), f'attentions_{i}', h,
                        context, context_mask)
      h = self.s.resnet(self.channels, f'resnets_{i + 1}')(h, temb, train)
    return h


def check_resolution(size: int, num_levels: int, model: str, what: str = 'resolution'):
  """ValueError unless `size` survives the num_levels - 1 halvings of a U-Net-shaped model."""
  factor = 2 ** (num_levels - 1)
  if size % factor:
    raise ValueError(f'{what}={size} must be divisible by 2**(len(block_out_channels)-1)='
                     f'{factor} for a {num_levels}-level {model}')
