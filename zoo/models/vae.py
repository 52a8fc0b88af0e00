"""Stable Diffusion's KL autoencoder (diffusers `AutoencoderKL`) with diffusers parameter names.

Legend: B batch, H/W image height/width, C channels, h/w latent height/width (H / f with
f = 2**(levels - 1)), Z latent channels. Activations are NHWC.

Parameter paths follow diffusers' Flax naming (`encoder/down_blocks_0/resnets_0/conv1`,
`encoder/mid_block/attentions_0/to_q`, `decoder/up_blocks_0/upsamplers_0/conv`, `quant_conv`,
...), so a PyTorch `AutoencoderKL` state dict converts as the U-Net's does: `x.0` -> `x_0`,
conv OIHW -> HWIO, linear W -> W.T, norm `weight` -> `scale`.

Latent convention (NUMERICS.md 4.1): `encode`/`decode` work on un-scaled latents; the
diffusion model sees z = (E(x) - shift_factor) * scaling_factor (`to_latent`), and
`from_latent` inverts it before `decode`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.models import unet
from zoo.nn import layers
from zoo.nn import unet_blocks as blocks

ACT_AXES = unet.ACT_AXES
IMAGE_AXES = unet.IMAGE_AXES
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
NORM_EPS = 1e-6

PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized: two levels (f=2), ~0.6M params.
    'tiny': dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    # SD1.x / SD2.x (f=8): CompVis v1-inference.yaml; 83,653,863 params.
    'sd': dict(),
    # SDXL: the same architecture with a different latent scale.
    'sdxl': dict(scaling_factor=0.13025),
    # SD3 / Flux: 16 latent channels, no quant convs, shifted latents.
    'sd3': dict(latent_channels=16, use_quant_conv=False, scaling_factor=1.5305,
                shift_factor=0.0609),
    'flux': dict(latent_channels=16, use_quant_conv=False, scaling_factor=0.3611,
                 shift_factor=0.1159),
}


def preset(name: str) -> dict[str, Any]:
  """A fresh copy of the named preset's AutoencoderKL keyword arguments."""
  if name not in PRESETS:
    raise ValueError(f'unknown VAE preset {name!r}; allowed: {sorted(PRESETS)}')
  return dict(PRESETS[name])


def sample_posterior(mean, logvar, rng=None) -> jax.Array:
  """mean + exp(logvar / 2) * eps with eps ~ N(0, I); the mode (mean) when `rng` is None."""
  if rng is None:
    return mean
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * eps


def to_latent(mean, logvar, rng=None, scaling: float = 0.18215, shift: float = 0.0):
  """The diffusion-space latent (sample - shift) * scaling; `rng` None uses the posterior mean."""
  return (sample_posterior(mean, logvar, rng) - shift) * scaling


def from_latent(z, scaling: float = 0.18215, shift: float = 0.0):
  """Inverse of `to_latent`: the un-scaled latent z / scaling + shift that `decode` expects."""
  return z / scaling + shift


def _settings(num_groups: int, dtype) -> blocks.BlockSettings:
  """U-Net block settings that reproduce diffusers' VAE blocks (one head, no time embedding)."""
  return blocks.BlockSettings(num_groups=num_groups, eps=NORM_EPS, dropout=0.0, head_dim=0,
                            context_dim=0, downsample_padding=0, dtype=dtype)


def _norm_act(num_groups, dtype, h):
  return nn.silu(layers.GroupNorm(num_groups, NORM_EPS, dtype, name='conv_norm_out')(h))


class Encoder(nn.Module):
  """conv_in, `DownEncoderBlock2D`s (stride-2 pad (0, 1) downsampling), mid-block, conv_out."""
  block_out_channels: tuple
  layers_per_block: int
  out_channels: int
  num_groups: int
  mid_block_attention: bool
  dtype: Any

  @nn.compact
  def __call__(self, x_BxHxWxC):
    s, levels = _settings(self.num_groups, self.dtype), len(self.block_out_channels)
    h = layers.conv(self.block_out_channels[0], 3, dtype=self.dtype,
                    axes=(None, None, None, 'conv_out'), name='conv_in')(x_BxHxWxC)
    for i, ch in enumerate(self.block_out_channels):
      h, _ = blocks.DownBlock(ch, self.layers_per_block, False, i < levels - 1, s,
                            name=f'down_blocks_{i}')(h, None, None, False)
      h = nn.with_logical_constraint(h, ACT_AXES)
    h = blocks.MidBlock(self.block_out_channels[-1], self.mid_block_attention, s,
                      name='mid_block')(h, None, None, False)
    h = _norm_act(self.num_groups, self.dtype, h)
    return layers.conv(self.out_channels, 3, dtype=self.dtype,
                       axes=(None, None, 'conv_in', None), name='conv_out')(h)


class Decoder(nn.Module):
  """conv_in, mid-block, `UpDecoderBlock2D`s (layers_per_block + 1 resnets), conv_out."""
  block_out_channels: tuple
  layers_per_block: int
  out_channels: int
  num_groups: int
  mid_block_attention: bool
  dtype: Any

  @nn.compact
  def __call__(self, z_BxhxwxZ):
    s, levels = _settings(self.num_groups, self.dtype), len(self.block_out_channels)
    h = layers.conv(self.block_out_channels[-1], 3, dtype=self.dtype,
                    axes=(None, None, None, 'conv_out'), name='conv_in')(z_BxhxwxZ)
    h = blocks.MidBlock(self.block_out_channels[-1], self.mid_block_attention, s,
                      name='mid_block')(h, None, None, False)
    for i, ch in enumerate(self.block_out_channels[::-1]):
      h = blocks.UpBlock(ch, self.layers_per_block + 1, False, i < levels - 1, s,
                       name=f'up_blocks_{i}')(h, None, None, None, False)
      h = nn.with_logical_constraint(h, ACT_AXES)
    h = _norm_act(self.num_groups, self.dtype, h)
    return layers.conv(self.out_channels, 3, dtype=self.dtype,
                       axes=(None, None, 'conv_in', None), name='conv_out')(h)


class AutoencoderKL(nn.Module):
  """diffusers `AutoencoderKL`: a diagonal-Gaussian encoder and a deterministic decoder.

  `mid_block_attention` is diffusers' `mid_block_add_attention` (encoder and decoder).
  `use_quant_conv` covers both `quant_conv` and `post_quant_conv` (diffusers' `use_quant_conv`
  and `use_post_quant_conv`). Outputs are float32 whatever the compute `dtype`.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  mid_block_attention: bool = True
  use_quant_conv: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  dtype: str = 'float32'

  def setup(self):
    check_config(_fields(self), resolution=None)
    dtype, channels = layers.to_dtype(self.dtype), tuple(self.block_out_channels)
    self.encoder = Encoder(channels, self.layers_per_block, 2 * self.latent_channels,
                           self.norm_num_groups, self.mid_block_attention, dtype)
    self.decoder = Decoder(channels, self.layers_per_block, self.out_channels,
                           self.norm_num_groups, self.mid_block_attention, dtype)
    if self.use_quant_conv:
      image_axes = (None, None, None, None)
      self.quant_conv = layers.conv(2 * self.latent_channels, 1, padding='VALID', dtype=dtype,
                                    axes=image_axes)
      self.post_quant_conv = layers.conv(self.latent_channels, 1, padding='VALID', dtype=dtype,
                                         axes=image_axes)

  def encode(self, x_BxHxWxC):
    """(mean, logvar), each Bxhxwx`latent_channels` float32, of the un-scaled posterior.

    logvar is clipped to [-30, 20] as diffusers' `DiagonalGaussianDistribution`.
    """
    self._check_image(x_BxHxWxC)
    h = self.encoder(nn.with_logical_constraint(x_BxHxWxC, IMAGE_AXES))
    if self.use_quant_conv:
      h = self.quant_conv(h)
    moments = h.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z_BxhxwxZ):
    """A float32 BxHxWx`out_channels` image from an un-scaled latent (see `from_latent`)."""
    if z_BxhxwxZ.shape[-1] != self.latent_channels:
      raise ValueError(f'latent has {z_BxhxwxZ.shape[-1]} channels but '
                       f'model.latent_channels={self.latent_channels}')
    z = z_BxhxwxZ.astype(layers.to_dtype(self.dtype))
    if self.use_quant_conv:
      z = self.post_quant_conv(z)
    out = self.decoder(z).astype(jnp.float32)
    return nn.with_logical_constraint(out, IMAGE_AXES)

  def __call__(self, x_BxHxWxC, *, rng=None, train=False):
    """(reconstruction, mean, logvar); decodes a posterior sample when `rng` is given, else
    the mean. `train` is accepted for the task interface; the VAE has no dropout."""
    del train
    mean, logvar = self.encode(x_BxHxWxC)
    return self.decode(sample_posterior(mean, logvar, rng)), mean, logvar

  def _check_image(self, x_BxHxWxC):
    if x_BxHxWxC.shape[-1] != self.in_channels:
      raise ValueError(
          f'input has {x_BxHxWxC.shape[-1]} channels but model.in_channels={self.in_channels}')
    for axis, size in (('height', x_BxHxWxC.shape[1]), ('width', x_BxHxWxC.shape[2])):
      blocks.check_resolution(size, len(self.block_out_channels), 'VAE', f'input {axis}')


MODEL = AutoencoderKL
FIELDS = tuple(f.name for f in dataclasses.fields(AutoencoderKL)
               if f.name not in ('parent', 'name'))


def _fields(module: AutoencoderKL) -> dict[str, Any]:
  return {f: getattr(module, f) for f in FIELDS}


def check_config(model_kwargs: dict[str, Any], resolution: int | None) -> None:
  """Raises ValueError naming the offending `model.*` key for an invalid VAE configuration.

  Unknown keys are rejected; missing keys take the AutoencoderKL defaults. `resolution`
  (None to skip) must be divisible by 2**(levels - 1).
  """
  unknown = sorted(set(model_kwargs) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown VAE config keys {unknown}; allowed: {list(FIELDS)}')
  kw = {f: getattr(AutoencoderKL, f) for f in FIELDS} | dict(model_kwargs)
  if len(kw['block_out_channels']) < 1:
    raise ValueError('model.block_out_channels must be non-empty')
  groups = kw['norm_num_groups']
  for ch in kw['block_out_channels']:
    if groups <= 0 or ch % groups:
      raise ValueError(f'model.block_out_channels entry {ch} is not divisible by '
                       f'model.norm_num_groups={groups}')
  for key in ('layers_per_block', 'in_channels', 'out_channels', 'latent_channels'):
    if kw[key] < 1:
      raise ValueError(f'model.{key}={kw[key]} must be >= 1')
  if kw['dtype'] not in layers.DTYPES:
    raise ValueError(f"model.dtype={kw['dtype']!r}; allowed: {sorted(layers.DTYPES)}")
  if not kw['scaling_factor'] > 0:
    raise ValueError(f"model.scaling_factor={kw['scaling_factor']} must be > 0")
  if resolution is not None:
    blocks.check_resolution(resolution, len(kw['block_out_channels']), 'VAE')
