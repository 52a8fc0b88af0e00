"""Control hints: the structural conditions a ControlNet reads, as images in [0, 1].

Legend: B batch, R resolution, K hint channels.

Each control names the data feature it is computed from (`config.data.features` must list it)
and turns a batch of that feature into a BxRxRxK float32 hint, the same picture a user would
save as a PNG and pass to `zoo sample --control NAME:PATH.png`:

  depth  1 channel: 1 - depth, so nearer is brighter (the MiDaS convention ControlNet uses)
  seg    3 channels: the semantic mask colour-coded, one colour per class (`palette`)
  pose   3 channels: the skeleton map colour-coded, one colour per limb (OpenPose-style)
  edges  1 channel: Canny edges of the image (computed on the fly from any image)
"""

import colorsys
import typing

import jax.numpy as jnp
import numpy as np

from data.shapes import grammar
from data.shapes import pose


class Control(typing.NamedTuple):
  feature: str  # The data feature it is computed from.
  channels: int
  classes: int  # Label maps: how many non-zero labels the palette colours; 0 = continuous.


CONTROLS = {
    'depth': Control('depth', 1, 0),
    'seg': Control('semantic_mask', 3, len(grammar.SEMANTIC_CLASSES) - 1),
    'pose': Control('skeleton', 3, len(pose.LIMBS)),
    'edges': Control('edges', 1, 0),
}


def palette(n: int) -> np.ndarray:
  """(n+1)x3 uint8: black for label 0, then n well-spread hues (golden-ratio steps)."""
  hues = [colorsys.hsv_to_rgb((0.61803 * k) % 1.0, 0.75, 0.95) for k in range(n)]
  return np.concatenate([[[0, 0, 0]], np.round(np.array(hues) * 255)]).astype(np.uint8)


def get(name: str) -> Control:
  """The named control; ValueError naming the allowed ones."""
  if name not in CONTROLS:
    raise ValueError(f'unknown control {name!r}; allowed: {sorted(CONTROLS)}')
  return CONTROLS[name]


def hint(name: str, feature_BxRxR):
  """The BxRxRxK float32 hint in [0, 1] of a batch of the control's feature (numpy or jax)."""
  control = get(name)
  x = jnp.asarray(feature_BxRxR)
  if control.classes:
    colours = jnp.asarray(palette(control.classes), jnp.float32) / 255.0
    return colours[jnp.clip(x.astype(jnp.int32), 0, control.classes)]
  x = x.astype(jnp.float32)
  x = x if x.ndim == 4 else x[..., None]
  return 1.0 - x if name == 'depth' else x


def to_uint8(hint_RxRxK) -> np.ndarray:
  """A hint as the uint8 RxRx3 picture users save (1-channel hints repeated to grey)."""
  h = np.asarray(hint_RxRxK, np.float32)
  h = np.repeat(h, 3, axis=-1) if h.shape[-1] == 1 else h
  return np.round(np.clip(h, 0.0, 1.0) * 255).astype(np.uint8)


def check(name: str, hint_HxWxK, resolution: int):
  """A user's hint as float32 RxRxK; ValueError for a wrong size or channel count."""
  h = np.asarray(hint_HxWxK, np.float32)
  want = (resolution, resolution, get(name).channels)
  if h.shape != want:
    raise ValueError(f'the {name!r} control image is {h.shape} (HxWxC) but this model needs '
                     f'{want}: {resolution}x{resolution} with {want[-1]} channel(s)')
  return h
