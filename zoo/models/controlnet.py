"""ControlNet (Zhang et al. 2023) for the U-Net and for DiT: structural control of a frozen base.

Legend: B batch, H/W denoiser input height/width, C its channels, F hint factor
(2**(len(conditioning_embedding_out_channels) - 1)), K condition channels, N tokens, D width.

`ControlNet` is diffusers' `ControlNetModel`: a trainable copy of the base U-Net's conv_in, time
and class embeddings, down blocks and mid block (same parameter names, so `from_base` copies them
over), a hint encoder `controlnet_cond_embedding` (3x3 convs, stride 2 between widths, a
zero-initialised conv_out) whose output is added after conv_in, and zero-initialised 1x1 convs
`controlnet_down_blocks_i` / `controlnet_mid_block` on every skip and on the mid output. It
returns `Residuals` that the base `UNet` adds to its skips and mid block (`control=`); at init
they are exactly zero, so the base's output is unchanged. Several controls combine by summing
their (scaled) residuals (`combine`, diffusers' `MultiControlNetModel`). A diffusers
ControlNetModel state dict converts by the U-Net's rules (zoo.convert.diffusers).

`DiTControlNet` follows diffusers' `SD3ControlNetModel`: a trainable copy of the base DiT's
embedders and first `control_layers` blocks, the condition patch-embedded by a zero-initialised
`pos_embed_input` and added to the tokens, and a zero-initialised linear `controlnet_blocks_i`
after each copied block; the base adds residual i // ceil(depth / K) after block i.
"""

import typing
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.models import dit
from zoo.models import unet
from zoo.nn import dit_layers as dl
from zoo.nn import layers

HINT_AXES = ('act_batch', None, None, None)


class Residuals(typing.NamedTuple):
  """What a ControlNet adds to a U-Net: one map per skip (`down`) and one for the mid block."""
  down: tuple
  mid: jax.Array


def _zero_conv(features, kernel_size, dtype, name):
  return nn.Conv(features, (kernel_size, kernel_size), padding='SAME', dtype=dtype,
                 param_dtype=jnp.float32,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.zeros_init(), (None, None, 'conv_in', 'conv_out')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                        ('conv_out',)),
                 name=name)


class ConditioningEmbedding(nn.Module):
  """diffusers `ControlNetConditioningEmbedding`: the hint (HFxWFxK) -> HxWx`out_channels`."""
  channels: tuple
  out_channels: int
  dtype: Any

  @nn.compact
  def __call__(self, hint_BxHFxWFxK):
    kw = dict(dtype=self.dtype, axes=(None, None, None, None))
    h = nn.silu(layers.conv(self.channels[0], 3, name='conv_in', **kw)(hint_BxHFxWFxK))
    for i, (c_in, c_out) in enumerate(zip(self.channels[:-1], self.channels[1:])):
      h = nn.silu(layers.conv(c_in, 3, name=f'blocks_{2 * i}', **kw)(h))
      # torch's padding=1 at stride 2 is symmetric; 'SAME' would pad (0, 1).
      h = nn.silu(layers.conv(c_out, 3, strides=2, padding=((1, 1), (1, 1)),
                              name=f'blocks_{2 * i + 1}', **kw)(h))
    return _zero_conv(self.out_channels, 3, self.dtype, 'conv_out')(h)


class ControlNet(unet.UNet):
  """diffusers `ControlNetModel` over the base `UNet` it copies (every UNet field, same values).

  `conditioning_channels` K of the hint; `conditioning_embedding_out_channels` the hint
  encoder's widths: the hint is F = 2**(len - 1) times the denoiser input's size (SD's
  (16, 32, 96, 256): 512² pixels for 64² latents; a pixel-space base uses one width, F = 1).
  """
  conditioning_channels: int = 3
  conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)

  @property
  def hint_factor(self) -> int:
    return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, hint_BxHFxWFxK, *, labels_B=None, context_BxLxD=None,
               context_mask_BxL=None, pooled_BxD=None, conditioning_scale=1.0, train=False):
    """`Residuals` for the base UNet, each multiplied by `conditioning_scale` (float32)."""
    self._check_inputs(x_BxHxWxC, context_BxLxD, context_mask_BxL, pooled_BxD)
    check_hint(hint_BxHFxWFxK, x_BxHxWxC.shape, self.hint_factor, self.conditioning_channels)
    s = self._settings()
    temb = self._embed(t_B, labels_B, x_BxHxWxC.shape[0])
    hint = ConditioningEmbedding(tuple(self.conditioning_embedding_out_channels),
                                 self.block_out_channels[0], s.dtype,
                                 name='controlnet_cond_embedding')(
                                     nn.with_logical_constraint(hint_BxHFxWFxK, HINT_AXES))
    h, skips = self._encoder(x_BxHxWxC, temb, (context_BxLxD, context_mask_BxL), train, hint)
    scale = jnp.asarray(conditioning_scale, jnp.float32)
    down = tuple(
        _zero_conv(r.shape[-1], 1, s.dtype, f'controlnet_down_blocks_{i}')(r).astype(
            jnp.float32) * scale for i, r in enumerate(skips))
    mid = _zero_conv(h.shape[-1], 1, s.dtype, 'controlnet_mid_block')(h).astype(jnp.float32)
    return Residuals(down, mid * scale)


class DiTControlNet(dit.DiT):
  """A control branch for the base `DiT` it copies (every DiT field, same values).

  `control_layers` K: how many of the base's first blocks are copied (and residuals returned);
  the hint is the denoiser input's size with `conditioning_channels` channels.
  """
  control_layers: int = 2
  conditioning_channels: int = 3

  @nn.compact
  def __call__(self, x_BxHxWxC, t_B, hint_BxHxWxK, *, labels_B=None, context_BxLxD=None,
               context_mask_BxL=None, pooled_BxD=None, conditioning_scale=1.0, train=False):
    """K residuals BxNxD float32, each multiplied by `conditioning_scale`."""
    del train
    self._check_inputs(x_BxHxWxC, context_BxLxD, context_mask_BxL, pooled_BxD)
    check_hint(hint_BxHxWxK, x_BxHxWxC.shape, 1, self.conditioning_channels)
    dtype, batch = layers.to_dtype(self.dtype), x_BxHxWxC.shape[0]
    h = self._tokens(x_BxHxWxC, dtype)
    hint = nn.Conv(self.hidden_size, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                   padding='VALID', dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=dl.with_axes(dl.ZEROS, (None, None, None, 'embed')),
                   bias_init=dl.with_axes(dl.ZEROS, ('embed',)), name='pos_embed_input')(
                       nn.with_logical_constraint(hint_BxHxWxK, HINT_AXES))
    h = h + hint.reshape(h.shape).astype(jnp.float32)
    c_BxD = self._condition(t_B, labels_B, pooled_BxD, batch, dtype)
    ctx_BxLxD, mask_BxL = self._context(context_BxLxD, context_mask_BxL, dtype)
    scale, out = jnp.asarray(conditioning_scale, jnp.float32), []
    for i in range(self.control_layers):
      h = nn.with_logical_constraint(self._block(i, dtype)(h, c_BxD, ctx_BxLxD, mask_BxL),
                                     dit.ACT_AXES)
      r = dl.dense(self.hidden_size, (None, 'embed'), dl.ZEROS, dtype, f'controlnet_blocks_{i}')(
          h.astype(dtype))
      out.append(r.astype(jnp.float32) * scale)
    return tuple(out)


def check_hint(hint, x_shape, factor, channels):
  """ValueError unless the hint is B x (H*factor) x (W*factor) x channels."""
  b, h, w = x_shape[:3]
  want = (b, h * factor, w * factor, channels)
  if tuple(hint.shape) != want:
    raise ValueError(f'the control hint is {tuple(hint.shape)} but this ControlNet needs {want} '
                     f'(batch, {factor}x the denoiser input {h}x{w}, model.conditioning_channels)')


def combine(residuals):
  """The sum of several ControlNets' (already scaled) residuals: diffusers' MultiControlNet."""
  residuals = list(residuals)
  if not residuals:
    raise ValueError('combine needs at least one set of control residuals')
  return jax.tree.map(lambda *r: sum(r[1:], r[0]), *residuals)


def from_base(control_params, base_params):
  """ControlNet params whose copied parts (every top-level entry the base also has) are the
  base's: the ControlNet paper's "trainable copy". Control-only parts keep their init.

  The copies are new buffers, so the train step may donate both trees.
  """
  shared = {k for k in control_params if k in base_params}
  if not shared:
    raise ValueError(f'the base params share no entry with the ControlNet (base has '
                     f'{sorted(base_params)}): a checkpoint of another model?')
  for k in sorted(shared):
    want = jax.tree.map(jnp.shape, control_params[k])
    got = jax.tree.map(jnp.shape, base_params[k])
    if want != got:
      raise ValueError(f'base params {k!r} do not fit the ControlNet copy: {got} vs {want}')
  return {k: jax.tree.map(jnp.copy, base_params[k]) if k in shared else v
          for k, v in control_params.items()}


def base_fields(model_kwargs, name):
  """The base model's kwargs inside a ControlNet's (the control-only fields dropped)."""
  own = {'controlnet': unet.FIELDS, 'dit_controlnet': dit.FIELDS}[name]
  return {k: v for k, v in model_kwargs.items() if k in own}


def _check_control_fields(kw, name):
  if kw.get('conditioning_channels', 3) < 1:
    raise ValueError(f"model.conditioning_channels={kw['conditioning_channels']} must be >= 1")
  if name == 'controlnet':
    chans = tuple(kw.get('conditioning_embedding_out_channels', (16, 32, 96, 256)))
    if not chans or min(chans) < 1:
      raise ValueError(f'model.conditioning_embedding_out_channels={chans} must be a non-empty '
                       'tuple of positive widths')
  else:
    depth = kw.get('depth', dit.DiT.depth)
    k = kw.get('control_layers', 2)
    if not 1 <= k <= depth:
      raise ValueError(f'model.control_layers={k} must lie in [1, model.depth={depth}]')


def check_config_unet(model_kwargs, resolution):
  """`unet.check_config` on the copied fields plus the ControlNet's own (unknown keys refused)."""
  _check_unknown(model_kwargs, ControlNet)
  _check_control_fields(model_kwargs, 'controlnet')
  unet.check_config(base_fields(model_kwargs, 'controlnet'), resolution)


def check_config_dit(model_kwargs, resolution):
  """`dit.check_config` on the copied fields plus the DiT ControlNet's own."""
  _check_unknown(model_kwargs, DiTControlNet)
  _check_control_fields(model_kwargs, 'dit_controlnet')
  dit.check_config(base_fields(model_kwargs, 'dit_controlnet'), resolution)


def _check_unknown(model_kwargs, cls):
  allowed = [f for f in cls.__dataclass_fields__ if f not in ('parent', 'name')]
  unknown = sorted(set(model_kwargs) - set(allowed))
  if unknown:
    raise ValueError(f'unknown {cls.__name__} config keys {unknown}; allowed: {allowed}')

