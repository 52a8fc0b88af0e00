"""A small ResNet-style image classifier (GroupNorm, no BatchNorm): logits and pooled features.

Legend: B batch, H/W height/width, C channels, F pooled feature width (widths[-1]; twice that
for pool='mean_max'), K classes. Activations are NHWC; inputs are images in [-1, 1].

stem conv [-> 2x2 max-pool] -> stages of pre-activation residual blocks (GroupNorm-SiLU-conv
twice, a 1x1 projection where the width changes), a 2x2 max-pool before each stage but the
first -> GroupNorm-SiLU -> global pool (the features FD-zoo compares) -> dense. Max-pool
downsampling and a global max pool find small objects anywhere in the image: on one-object
shapes they learn several times faster than strided convs and a mean pool; the mean pool
keeps a measure of area, which tells a circle from a hexagon of the same width.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.nn import layers

ACT_AXES = ('act_batch', None, None, 'act_emb')
POOLS = ('mean', 'max', 'mean_max')

PRESETS: dict[str, dict[str, Any]] = {
    # Test-sized: two stages, ~7k params.
    'tiny': dict(widths=(8, 16), blocks=1, stem_pool=True, pool='max', norm_num_groups=4),
    # Shapes at 32x32 or 64x64: three stages at 1/2, 1/4, 1/8 resolution, ~86k params.
    'shapes': dict(widths=(16, 32, 64), blocks=1, stem_pool=True, pool='mean_max',
                   norm_num_groups=8),
}


def preset(name: str) -> dict[str, Any]:
  """A fresh copy of the named preset's Classifier keyword arguments."""
  if name not in PRESETS:
    raise ValueError(f'unknown Classifier preset {name!r}; allowed: {sorted(PRESETS)}')
  return dict(PRESETS[name])


class ResBlock(nn.Module):
  """Pre-activation residual block (a 1x1 projection of the shortcut when the width changes)."""
  features: int
  num_groups: int
  dropout: float

  @nn.compact
  def __call__(self, x_BxHxWxC, train):
    def norm(name):
      return layers.GroupNorm(self.num_groups, name=name)
    h = nn.silu(norm('norm1')(x_BxHxWxC))
    shortcut = x_BxHxWxC
    if x_BxHxWxC.shape[-1] != self.features:
      shortcut = layers.conv(self.features, 1, name='shortcut')(h)
    h = layers.conv(self.features, 3, name='conv1')(h)
    h = nn.silu(norm('norm2')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = layers.conv(self.features, 3, name='conv2')(h)
    return nn.with_logical_constraint(shortcut + h, ACT_AXES)


class Classifier(nn.Module):
  """`__call__(x_BxHxWxC, train=False, features=False)` -> logits_BxK, or (logits, feats_BxF)."""
  num_classes: int = 8
  in_channels: int = 3
  widths: tuple[int, ...] = (16, 32, 64)
  blocks: int = 1  # Residual blocks per stage.
  stem_pool: bool = False  # True: 2x2 max-pool after the stem conv (a 4x cheaper first stage).
  pool: str = 'mean'  # Global pool over positions: 'mean', 'max' or both ('mean_max').
  norm_num_groups: int = 8
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x_BxHxWxC, train=False, features=False):
    if x_BxHxWxC.shape[-1] != self.in_channels:
      raise ValueError(f'Classifier: images have {x_BxHxWxC.shape[-1]} channels but '
                       f'model.in_channels={self.in_channels}')
    h = layers.conv(self.widths[0], 3, axes=(None, None, None, 'conv_out'), name='conv_in')(
        x_BxHxWxC.astype(jnp.float32))
    if self.stem_pool:
      h = nn.max_pool(h, (2, 2), (2, 2))
    for s, width in enumerate(self.widths):
      if s > 0:
        h = nn.max_pool(h, (2, 2), (2, 2))
      for b in range(self.blocks):
        h = ResBlock(width, self.norm_num_groups, self.dropout, name=f'stages_{s}/blocks_{b}')(
            h, train)
    h = nn.silu(layers.GroupNorm(self.norm_num_groups, name='norm_out')(h))
    pooled = {'mean': [h.mean(axis=(1, 2))], 'max': [h.max(axis=(1, 2))],
              'mean_max': [h.mean(axis=(1, 2)), h.max(axis=(1, 2))]}[self.pool]
    feats_BxF = jnp.concatenate(pooled, axis=-1)
    logits_BxK = layers.dense(self.num_classes, ('embed', None), name='head')(feats_BxF)
    return (logits_BxK, feats_BxF) if features else logits_BxK


FIELDS = tuple(f.name for f in dataclasses.fields(Classifier) if f.name not in ('parent', 'name'))


def check_config(model_kwargs: dict[str, Any], resolution: int | None) -> None:
  """Raises ValueError naming the offending `model.*` key for an invalid Classifier config."""
  unknown = sorted(set(model_kwargs) - set(FIELDS))
  if unknown:
    raise ValueError(f'unknown Classifier config keys {unknown}; allowed: {list(FIELDS)}')
  kw = {f: getattr(Classifier, f) for f in FIELDS} | dict(model_kwargs)
  for key, lo in (('num_classes', 2), ('in_channels', 1), ('blocks', 1), ('norm_num_groups', 1)):
    if kw[key] < lo:
      raise ValueError(f'model.{key}={kw[key]} must be >= {lo}')
  if kw['pool'] not in POOLS:
    raise ValueError(f"model.pool={kw['pool']!r} is not one of {list(POOLS)}")
  if not kw['widths'] or any(w % kw['norm_num_groups'] for w in kw['widths']):
    raise ValueError(f"model.widths={kw['widths']} must be non-empty and each divisible by "
                     f"model.norm_num_groups={kw['norm_num_groups']}")
  if not 0.0 <= kw['dropout'] < 1.0:
    raise ValueError(f"model.dropout={kw['dropout']} must be in [0, 1)")
  factor = 2 ** (len(kw['widths']) - 1 + kw['stem_pool'])
  if resolution is not None and resolution % factor:
    raise ValueError(f'resolution {resolution} must be divisible by {factor} (2 ** the max-pools: '
                     f"model.widths={kw['widths']}, model.stem_pool={kw['stem_pool']})")
