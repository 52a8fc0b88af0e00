"""Random-access records of TFDS splits, with read errors that name the record."""

from typing import Any

import numpy as np
import tensorflow_datasets as tfds


class Source:
  """Random-access records of one split; read errors name the dataset and its files."""

  def __init__(self, builder: tfds.core.DatasetBuilder, split: str):
    self._where = f'dataset {builder.info.full_name!r} split {split!r} in {builder.data_dir}'
    self._source = builder.as_data_source(split)

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: np.ndarray) -> list[dict[str, Any]]:
    """Decoded examples at `indices`, read in one batched call (one by one after a failure, to
    name the record that does not decode)."""
    try:
      return self._source.__getitems__([int(i) for i in indices])
    except Exception as e:
      for i in indices:
        try:
          self._source.__getitems__([int(i)])
        except Exception as record_error:
          raise RuntimeError(f'Failed reading {self.describe(i)}: {record_error}') from e
      raise RuntimeError(f'Failed reading records {list(indices)[:8]}... of {self._where}: {e}') from e

  def describe(self, index: int) -> str:
    return f'record {int(index)} of {self._where}'


class MixedSource:
  """Several sources as one: record `offsets[i] + j` is record j of source i."""

  def __init__(self, sources: list[Source]):
    self._sources = sources
    self.offsets = np.cumsum([0] + [len(s) for s in sources])

  def read(self, indices: np.ndarray) -> list[dict[str, Any]]:
    indices = np.asarray(indices)
    which = np.searchsorted(self.offsets, indices, side='right') - 1
    out: list[Any] = [None] * len(indices)
    for i, source in enumerate(self._sources):
      at = np.flatnonzero(which == i)
      if at.size:
        for pos, example in zip(at, source.read(indices[at] - self.offsets[i])):
          out[pos] = example
    return out
