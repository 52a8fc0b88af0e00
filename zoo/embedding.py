"""Embedding a dataset split or image files with a dual encoder, across devices and processes.

Legend: N items, E embedding width, G global batch, L per-process rows.

`embed` runs a jitted function over global batches: every process loads only the rows of each
global batch that its devices hold, and the outputs are gathered to every process, so the
zero-shot and retrieval evaluators and `zoo index` compute the single-process result under any
number of processes. `SplitReader` reads examples of a split; `captions_of` their captions.
"""

import math
import os

import jax
import numpy as np
import PIL.Image

from data import pipeline
from zoo import config as zoo_config
from zoo import sharding

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')


# ---------------------------------------------------------------------------------------------
# Embedding in global batches, each process loading its own rows.

def local_rows(batch_sharding, size):
  """[start, stop) of the rows of a `size`-row global batch that this process's devices hold."""
  slices = [s[0] for s in batch_sharding.addressable_devices_indices_map((size,)).values()]
  return min(s.start or 0 for s in slices), max(size if s.stop is None else s.stop for s in slices)


def global_batch_size(mesh, batch_size):
  """`batch_size` rounded up so that every device on the batch axes gets as many rows."""
  shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.axis_names)
  return -(-batch_size // shards) * shards


def embed(fn, params, load, num, batch_size, mesh):
  """fn(params, batch) over items 0..num-1 in global batches; numpy outputs on every process.

  `load(indices_L)` returns a dict of numpy arrays with the rows of those items. The last
  batch wraps around to item 0 (so every call has the same shape and compiles once); the
  outputs (a pytree of arrays with a leading batch axis) are gathered and cut to `num` rows.
  """
  if num < 1:
    raise ValueError(f'nothing to embed (num={num})')
  size = global_batch_size(mesh, batch_size)
  batch_sh = sharding.batch_sharding(mesh)
  start, stop = local_rows(batch_sh, size)
  outs = []
  for first in range(0, num, size):
    indices_G = np.arange(first, first + size) % num
    local = load(indices_G[start:stop])
    batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        batch_sh, x, (size, *x.shape[1:])), local)
    outs.append(sharding.host_gather(fn(params, batch)))
  return jax.tree.map(lambda *xs: np.concatenate(xs)[:num], *outs)


def text_batches(tokenizer, max_len, texts):
  """A `load` for `embed` over a list of texts: {'tokens', 'tokens_mask'} of the rows asked."""
  def load(indices_L):
    ids_LxT, mask_LxT = tokenizer.encode([texts[i] for i in indices_L], max_len)
    return {'tokens': ids_LxT, 'tokens_mask': mask_LxT}
  return load


def encode_texts(task, params, texts, batch_size, mesh):
  """NxE L2-normalised text embeddings (numpy) of a list of strings."""
  def fn(p, batch):
    return task.predict['encode_text'](p, batch['tokens'], batch['tokens_mask'])
  return embed(fn, params, text_batches(task.tokenizer, task.max_len, texts), len(texts),
               batch_size, mesh)


def encode_images(task, params, load, num, batch_size, mesh):
  """NxE L2-normalised image embeddings (numpy); `load(indices)` gives {'image': LxHxWxC}."""
  def fn(p, batch):
    return task.predict['encode_image'](p, batch['image'])
  return embed(fn, params, load, num, batch_size, mesh)


# ---------------------------------------------------------------------------------------------
# What can be indexed: image files and dataset splits.

def list_images(directory):
  """Sorted paths (relative to `directory`) of the PNG and JPEG files under it."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'--images {directory!r} is not a directory')
  found = []
  for root, _, files in os.walk(directory):
    found += [os.path.relpath(os.path.join(root, f), directory) for f in files
              if f.lower().endswith(IMAGE_SUFFIXES)]
  if not found:
    raise FileNotFoundError(f'no PNG or JPEG files ({", ".join(IMAGE_SUFFIXES)}) under '
                            f'{directory!r}')
  return sorted(found)


def load_image(path, resolution, channels):
  """An image file as the data pipeline emits it: center-cropped, resized, in [-1, 1]."""
  try:
    with PIL.Image.open(path) as img:
      pixels = np.asarray(img.convert('L' if channels == 1 else 'RGB'))
  except (OSError, SyntaxError) as e:
    raise ValueError(f'cannot read image {path!r}: {e}') from e
  return pipeline.preprocess({'image': pixels}, image_key='image', label_key='',
                             resolution=resolution)['image']


def parse_dataset(spec):
  """'name[/config]:split' -> (name, builder config, split); 'tfds:' names keep their config."""
  rest, sep, split = spec.rpartition(':')
  if not sep or not split or rest in ('', pipeline.TFDS_PREFIX, pipeline.TFDS_PREFIX[:-1]):
    raise ValueError(f'--dataset {spec!r} must look like name[/config]:split, e.g. shapes:test, '
                     'shapes/tiny32:validation or tfds:mnist:test')
  if rest.startswith(pipeline.TFDS_PREFIX):
    return rest, '', split
  name, _, config = rest.partition('/')
  return name, config, split


def dataset_config(run_data, spec):
  """The data config that reads `spec` like the run read its data (resolution, image key).

  Without a builder config, the run's own dataset keeps the run's builder config (so
  `shapes:test` is the test split of the shapes configuration the run trained on).
  """
  name, config, split = parse_dataset(spec)
  if not config and name == run_data.name:
    config = run_data.builder_config
  data = zoo_config.ConfigDict(dict(
      name=name, data_dir=run_data.data_dir, resolution=run_data.resolution,
      image_key=run_data.image_key, label_key='', builder_config=config, train_split=split,
      eval_split=split, features=()))
  pipeline.check_config(data)
  return data, split


def first_caption(example, key):
  """The first caption of a decoded example ('' without any)."""
  texts = captions_of(example, key)
  return texts[0] if texts else ''


def captions_of(example, key):
  """Every caption of a decoded example (a Text or Sequence(Text) feature) as strings."""
  if not key or key not in example:
    return []
  value = example[key]
  values = [value] if isinstance(value, (str, bytes)) else list(np.asarray(value).reshape(-1))
  return [v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in values]


class SplitReader:
  """Random access to the decoded, preprocessed examples of one split (any process)."""

  def __init__(self, data_cfg, split):
    self.data_cfg = data_cfg
    self.builder = pipeline.get_builder(data_cfg)
    if split not in self.builder.info.splits:
      raise ValueError(f'split {split!r} is not a split of {self.builder.info.full_name!r}; '
                       f'splits: {sorted(self.builder.info.splits)}')
    self.source = self.builder.as_data_source(split)

  def __len__(self):
    return len(self.source)

  def examples(self, indices):
    """The decoded examples at `indices`."""
    return self.source.__getitems__([int(i) for i in indices])

  def image(self, example):
    """An example's image in [-1, 1] at the config's resolution."""
    return pipeline.preprocess(example, image_key=self.data_cfg.image_key, label_key='',
                               resolution=self.data_cfg.resolution)['image']
