"""TFDS builder `digits`: scikit-learn's bundled 8x8 handwritten digits, upsampled.

1,797 grayscale digits (values 0..16) ship inside scikit-learn, so building needs no
download. Each config upsamples the 0..255-scaled 8x8 image with PIL bicubic to its
resolution. The train/test split is a fixed seeded permutation (1,500 / 297).

Build it with `python -m data.build digits` (the `tfds build` CLI imports TensorFlow).
"""

import dataclasses
import io

from etils import epath
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

NUM_TRAIN = 1500
_SPLIT_SEED = 0


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  """A digits variant at one square resolution."""

  resolution: int = 32


def to_uint8_image(digit_8x8: np.ndarray, resolution: int) -> np.ndarray:
  """Scales a 0..16 8x8 digit to 0..255 and resizes it to resolution x resolution x 1."""
  img_8x8 = np.round(np.asarray(digit_8x8, np.float64) * (255.0 / 16.0)).astype(np.uint8)
  pil = PIL.Image.fromarray(img_8x8, mode='L')
  if resolution != 8:
    pil = pil.resize((resolution, resolution), PIL.Image.Resampling.BICUBIC)
  return np.asarray(pil, np.uint8)[..., None]


def _png_bytes(img_HxWx1: np.ndarray) -> bytes:
  # tfds.features.Image encodes numpy arrays with TensorFlow; handing it PNG bytes
  # encoded by PIL keeps the build TensorFlow-free.
  buf = io.BytesIO()
  PIL.Image.fromarray(img_HxWx1[..., 0], mode='L').save(buf, format='png')
  return buf.getvalue()


def split_indices() -> dict[str, np.ndarray]:
  """Indices into `load_digits()` for each split, from a fixed seeded permutation."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  n = len(load_digits().target)
  perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
  return {'train': np.sort(perm[:NUM_TRAIN]), 'test': np.sort(perm[NUM_TRAIN:])}


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for the scikit-learn digits."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      DigitsConfig(name='res16', description='16x16 grayscale.', resolution=16),
      DigitsConfig(name='res32', description='32x32 grayscale.', resolution=32),
  ]
  DEFAULT_CONFIG_NAME = 'res32'

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup touches the `importlib_resources` backport, which the pinned
    # environment lacks; for a builder in a plain package it would return this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(r, r, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    r = self.builder_config.resolution
    for i in indices:
      img = to_uint8_image(digits.images[i], r)
      yield int(i), {'image': _png_bytes(img), 'label': int(digits.target[i])}
