"""TFDS builder `zoo_latents`: a dataset's examples with each image's VAE posterior, encoded once.

Legend: N examples, h/w latent size, Z latent channels.

Latent diffusion with a frozen VAE spends much of each step re-encoding images it has seen
before. This builder runs the encoder once over the chosen splits of a source dataset and
stores, beside the kept source features (image, captions, label, ...), the feature
`moments` = concat(mean, logvar) (h x w x 2Z float32): the un-scaled posterior, so training
still draws a fresh z = mean + exp(logvar / 2) ε every step (as diffusers' training scripts
cache `latent_dist`), and `pipeline.preprocess` reads the rest unchanged. Record i of a split
is record i of the source split.

The VAE it came from is recorded in `vae.json` next to the records (the VAE run, its model
config, a fingerprint of its params): a latent-diffusion run that reads these latents checks
it against the VAE it loads (`read_provenance`).

The builder is not registered: the pipeline reads it as `tfds:zoo_latents` from the
directory it was written to (`config.data.data_dir`).
"""

import io
import json
import os
from typing import Any, Callable, Iterable

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from zoo import files

NAME = 'zoo_latents'
VERSION = '1.0.0'
MOMENTS = 'moments'
PROVENANCE = 'vae.json'


def _copy(feature: tfds.features.FeatureConnector) -> tfds.features.FeatureConnector:
  return tfds.features.FeatureConnector.from_json(feature.to_json())


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes `keep` features of `source` plus `moments` from `encode`.

  `encode(examples)` gets a list of source examples, `image_key` decoded to uint8 and every
  other image feature still PNG/JPEG bytes, and returns their moments, N x h x w x 2Z
  float32, with `moments_shape` = (h, w, 2Z). Kept images are copied as their encoded bytes.
  """

  VERSION = tfds.core.Version(VERSION)
  name = NAME

  def __init__(self, *, source: tfds.core.DatasetBuilder, image_key: str, keep: Iterable[str],
               encode: Callable[[list[dict[str, Any]]], np.ndarray],
               moments_shape: tuple[int, int, int], splits: Iterable[str], batch_size: int = 64,
               **kwargs):
    self._source, self._keep, self._encode = source, tuple(keep), encode
    self._image_key = image_key
    self._moments_shape, self._splits = tuple(moments_shape), tuple(splits)
    self._batch_size = batch_size
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = self._source.info.features
    kept = {key: _copy(features[key]) for key in self._keep}
    kept[MOMENTS] = tfds.features.Tensor(shape=self._moments_shape, dtype=np.float32)
    return tfds.core.DatasetInfo(
        builder=self, description=f'{self._source.info.full_name} with VAE posteriors',
        features=tfds.features.FeaturesDict(kept), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in self._splits}

  def _generate_examples(self, split: str):
    # Encoded images stay bytes: unkept ones are never decoded, kept ones never re-encoded.
    images = [k for k, f in self._source.info.features.items()
              if isinstance(f, tfds.features.Image)]
    source = self._source.as_data_source(
        split, decoders={k: tfds.decode.SkipDecoding() for k in images})
    for start in range(0, len(source), self._batch_size):
      indices = list(range(start, min(start + self._batch_size, len(source))))
      examples = source.__getitems__(indices)
      decoded = [ex | {self._image_key: _decode_image(ex[self._image_key])} for ex in examples]
      moments_Nxhxwx2Z = np.asarray(self._encode(decoded), np.float32)
      if moments_Nxhxwx2Z.shape != (len(indices), *self._moments_shape):
        raise ValueError(f'encode returned {moments_Nxhxwx2Z.shape}, expected '
                         f'{(len(indices), *self._moments_shape)}')
      for i, example, moments in zip(indices, examples, moments_Nxhxwx2Z):
        yield i, {key: example[key] for key in self._keep} | {MOMENTS: moments}


def _decode_image(encoded: bytes) -> np.ndarray:
  with PIL.Image.open(io.BytesIO(encoded)) as image:
    return np.asarray(image)


def write(out_dir: str, provenance: dict[str, Any], **builder_kw) -> tfds.core.DatasetBuilder:
  """Builds the dataset into `out_dir` (array_record) and records `provenance` beside it."""
  builder = Builder(data_dir=out_dir, **builder_kw)
  if builder.is_prepared():
    raise FileExistsError(f'{builder.data_dir} already holds latents: choose another --out')
  builder.download_and_prepare(file_format='array_record')
  with files.atomic_open(os.path.join(builder.data_dir, PROVENANCE)) as f:
    json.dump(provenance, f, indent=2, sort_keys=True)
  return builder


def read_provenance(data_dir: str) -> dict[str, Any]:
  """The `vae.json` of the latents written into `data_dir`."""
  path = os.path.join(os.path.expanduser(data_dir), NAME, VERSION, PROVENANCE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: write latents with `zoo latents --config ... '
                            f'--out {data_dir}` first')
  with open(path) as f:
    return json.load(f)
