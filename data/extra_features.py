"""Extra features the pipeline emits beside image and label (`config.data.features`).

Legend: R resolution, C channels.

A feature qualifies when it decodes to a fixed-shape numeric array:
- spatial maps (rank >= 2, same height and width as the image) are centre-cropped like the
  image and resized to RxR[xC]: label maps (integer dtype, e.g. masks, skeletons) by
  nearest neighbour at pixel centres and emitted as int32; continuous maps (float dtype, or
  named in CONTINUOUS_MAPS, e.g. depth) bilinearly and emitted as float32 (uint8 scaled to
  [0, 1]);
- other fixed-shape tensors (keypoints, flags, scalar class labels) pass through as int32,
  float32 or bool.
Strings (captions, questions, words) and variable-length sequences (per-object labels) are
refused with a ValueError: a tokenizer-based task will add them.
"""

import dataclasses

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from data import edges

CONTINUOUS_MAPS = ('depth', 'disparity')
# Computed from the resized image when the dataset has no feature of that name: name -> doc.
DERIVED = {'edges': 'Canny edges of the image (data.edges.canny(100, 200)), RxRx1 in {0, 1}'}
_TEXT_HINT = 'a tokenizer-based task will add them'


@dataclasses.dataclass(frozen=True)
class Extra:
  """How one extra feature is emitted: kind, per-example shape and dtype.

  kind: 'label_map', 'continuous_map', 'tensor' or 'edges' (derived from the image).
  """

  name: str
  kind: str
  shape: tuple[int, ...]
  dtype: np.dtype


def check_names(names, image_key: str, label_key: str) -> None:
  """Raises ValueError unless `names` is a tuple (or list) of distinct non-image/label names."""
  if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) and n for n in names):
    raise ValueError(f'data.features={names!r} must be a tuple of feature names, e.g. '
                     "('semantic_mask', 'depth'); () for none.")
  if len(set(names)) != len(names):
    raise ValueError(f'data.features={names!r} names a feature twice.')
  for key, value in (('image_key', image_key), ('label_key', label_key)):
    if value and value in names:
      raise ValueError(f'data.features={names!r} repeats data.{key}={value!r}, which is always '
                       'emitted.')


def _is_text(feature) -> bool:
  if isinstance(feature, tfds.features.Text):
    return True
  inner = getattr(feature, 'feature', None)
  return isinstance(feature, tfds.features.Sequence) and _is_text(inner)


def _plan_one(features, name: str, image_shape, resolution: int, dataset: str) -> Extra:
  if name not in features and name in DERIVED:
    return Extra(name, name, (resolution, resolution, 1), np.dtype(np.float32))
  if name not in features:
    raise ValueError(f'data.features names {name!r}, which is not a feature of {dataset!r}; '
                     f'features: {sorted(features)}; computed from any image: {sorted(DERIVED)}.')
  feature = features[name]
  if _is_text(feature):
    raise ValueError(f'data.features: {name!r} of {dataset!r} holds strings, which are not emitted '
                     f'as arrays yet; {_TEXT_HINT}.')
  shape = feature.shape
  ragged = isinstance(feature, tfds.features.Sequence) or not isinstance(shape, tuple)
  if ragged or None in shape[2:]:
    raise ValueError(f'data.features: {name!r} of {dataset!r} has variable length or nested '
                     f'structure, which is not emitted as arrays yet; {_TEXT_HINT}.')
  dtype = np.dtype(feature.np_dtype)
  if len(shape) >= 2 and tuple(shape[:2]) == tuple(image_shape[:2]):
    continuous = dtype.kind == 'f' or name in CONTINUOUS_MAPS
    out = (resolution, resolution, *shape[2:])
    return Extra(name, 'continuous_map' if continuous else 'label_map', out,
                 np.dtype(np.float32 if continuous else np.int32))
  if None in shape:
    raise ValueError(f'data.features: {name!r} of {dataset!r} has shape {shape}, which is neither '
                     'fixed nor the image\'s height and width.')
  kind = {'b': np.bool_, 'f': np.float32}.get(dtype.kind, np.int32)
  return Extra(name, 'tensor', tuple(shape), np.dtype(kind))


def plan(features: tfds.features.FeaturesDict, names: tuple[str, ...], *, image_key: str,
         resolution: int, dataset: str) -> list[Extra]:
  """How each named feature of a dataset is emitted; ValueError for names that cannot be."""
  image_shape = features[image_key].shape
  return [_plan_one(features, n, image_shape, resolution, dataset) for n in tuple(names)]


def _centre_square(a: np.ndarray) -> np.ndarray:
  h, w = a.shape[:2]
  s = min(h, w)
  return a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def _nearest(a_SxS: np.ndarray, resolution: int) -> np.ndarray:
  """Samples the source pixel under each output pixel's centre."""
  idx = ((np.arange(resolution) + 0.5) * (a_SxS.shape[0] / resolution)).astype(int)
  return a_SxS[idx][:, idx]


def _bilinear(a_SxS: np.ndarray, resolution: int) -> np.ndarray:
  chans = a_SxS.reshape(*a_SxS.shape[:2], -1).astype(np.float32)
  out = [np.asarray(PIL.Image.fromarray(chans[..., c], mode='F').resize(
      (resolution, resolution), PIL.Image.Resampling.BILINEAR)) for c in range(chans.shape[-1])]
  return np.stack(out, axis=-1).reshape(resolution, resolution, *a_SxS.shape[2:])


def extract(example: dict, extra: Extra, image_RxRxC: np.ndarray | None = None) -> np.ndarray:
  """The feature of a decoded example as an array of `extra.shape` and `extra.dtype`.

  Derived features ('edges') are computed from `image_RxRxC`, the image as the pipeline
  emits it (resized, values in [0, 255]).
  """
  if extra.kind == 'edges':
    return (edges.canny(np.round(image_RxRxC))[..., None] / 255).astype(np.float32)
  value = np.asarray(example[extra.name])
  if extra.kind == 'tensor':
    return value.astype(extra.dtype)
  resolution = extra.shape[0]
  square = _centre_square(value)
  if extra.kind == 'label_map':
    out = square if square.shape[0] == resolution else _nearest(square, resolution)
    return out.astype(np.int32)
  scale = np.float32(1 / 255) if value.dtype == np.uint8 else np.float32(1)
  if square.shape[0] != resolution:
    square = _bilinear(square, resolution)
  return square.astype(np.float32) * scale
