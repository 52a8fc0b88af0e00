"""Input pipeline: a TFDS split in array_record form -> deterministic per-process numpy batches.

Legend: N examples in the split, G global batch, P process count, L = G // P per-process
batch, R resolution, C channels.

Everything runs in numpy without TensorFlow: TFDS reads the split as a random-access
data source (decoding images with PIL), grain shuffles and batches example indices, and
each batch is read in one call and preprocessed. Batch k of the global stream is a fixed
function of (dataset, split, seed, G, k), so a position is one integer and resuming is
exact; process p serves the p-th contiguous L-slice of every global batch. With
repeat=True every epoch is a fresh permutation and batches run across epoch boundaries.

Datasets come from `BUILTINS` (built offline into data_dir on first use) or are named
`tfds:<name>[/<config>]` and must already be prepared in data_dir as array_record.
`data.features` names extra features to emit beside image and label (masks, depth, ...;
see `extra_features`), each as a fixed-shape array.
`data.text` and `data.qa` add token arrays of captions and of question/answer pairs.

An optional `data.mixture` ('res32:3,single32:1': builder configs of the dataset and their
weights) replaces `data.builder_config`: each config is shuffled on its own (reshuffled every
epoch) and grain's `MapDataset.mix` interleaves them in the weights' proportions, so batch k is
still a fixed function of the stream position. The configs must share their features.
"""

from concurrent import futures
import functools
import os
from typing import Any

import grain
import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from data import captions
from data import extra_features
from data import qa
from data import records
from data.digits import digits_dataset_builder
from data.shapes import shapes_dataset_builder

BUILTINS = {'digits': digits_dataset_builder.Builder, 'shapes': shapes_dataset_builder.Builder}
TFDS_PREFIX = 'tfds:'
DATA_DIR_ENV = 'ZOO_DATA_DIR'
DEFAULT_DATA_DIR = '~/.cache/zoo/tensorflow_datasets'


def resolve_data_dir(data_dir: str | None) -> str:
  """Returns data_dir, else $ZOO_DATA_DIR, else ~/.cache/zoo/tensorflow_datasets."""
  return os.path.expanduser(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def _config_names(builder_cls) -> list[str]:
  return [c.name for c in builder_cls.BUILDER_CONFIGS]


def prepare_builtin(name: str, data_dir: str | None, config: str = '') -> tfds.core.DatasetBuilder:
  """Builds builtin dataset `name` (config '' = its default) into data_dir unless prepared.

  Runs offline. Concurrent first builds into one data_dir race: in multi-process runs
  build beforehand with `python -m data.build`.
  """
  if name not in BUILTINS:
    raise ValueError(f'data.name={name!r} is not a builtin; builtins: {sorted(BUILTINS)}.')
  builder_cls = BUILTINS[name]
  if config and config not in _config_names(builder_cls):
    raise ValueError(
        f'config {config!r} is not a config of {name!r}; '
        f'allowed: {_config_names(builder_cls)} or "" for the default.'
    )
  builder = builder_cls(data_dir=resolve_data_dir(data_dir), config=config or None)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format='array_record')
  return builder


def _prepared_tfds_builder(spec: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Returns the builder for a `<name>[/<config>]` already prepared in data_dir; never downloads."""
  hint = (
      f'Prepare it first (array_record format), e.g. builder.download_and_prepare('
      f"file_format='array_record') with data_dir={data_dir!r}, or set data.data_dir."
  )
  try:
    builder = tfds.builder(spec, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(f'TFDS dataset {spec!r} not found in data_dir {data_dir!r}. {hint}') from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'TFDS dataset {spec!r} is not prepared in data_dir {data_dir!r} '
        f'(looked in {builder.data_dir}). {hint}'
    )
  return builder


def check_config(data_cfg) -> None:
  """Raises ValueError for a data config that cannot work, without touching any files."""
  name = data_cfg.name
  if name not in BUILTINS and not (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)):
    raise ValueError(
        f'data.name={name!r} is unknown; use a builtin {sorted(BUILTINS)} or '
        f"'{TFDS_PREFIX}<name>' / '{TFDS_PREFIX}<name>/<config>' for a prepared TFDS dataset."
    )
  if name in BUILTINS and data_cfg.builder_config not in ['', *_config_names(BUILTINS[name])]:
    raise ValueError(
        f'data.builder_config={data_cfg.builder_config!r} is not a config of {name!r}; '
        f'allowed: {_config_names(BUILTINS[name])} or "" (from data.resolution).'
    )
  if data_cfg.get('mixture', ''):
    _check_mixture(data_cfg)
  if data_cfg.resolution <= 0:
    raise ValueError(f'data.resolution={data_cfg.resolution} must be positive.')
  for key in ('image_key', 'train_split', 'eval_split'):
    if not data_cfg[key]:
      raise ValueError(f'data.{key} must be non-empty.')
  extra_features.check_names(data_cfg.features, data_cfg.image_key, data_cfg.label_key)
  if 'text' in data_cfg:
    captions.check_config(data_cfg.text)
  if 'qa' in data_cfg:
    qa.check_config(data_cfg.qa)
  if name in BUILTINS and data_cfg.features:
    # Instantiating a builder reads no data and writes nothing; it only describes features.
    builder = BUILTINS[name](data_dir=resolve_data_dir(data_cfg.data_dir),
                             config=_builtin_config(data_cfg) or None)
    extra_features.plan(builder.info.features, data_cfg.features, image_key=data_cfg.image_key,
                        resolution=data_cfg.resolution, dataset=name)


MIXTURE_HINT = "e.g. data.mixture='res32:3,single32:1' (builder config:weight, comma-separated)"


def mixture(data_cfg) -> list[tuple[str, float]]:
  """[(builder config, weight)] of `data.mixture`, weights normalised to sum 1; [] without one."""
  spec = data_cfg.get('mixture', '')
  if not spec:
    return []
  parts = []
  for item in spec.split(','):
    name, sep, weight = (x.strip() for x in item.partition(':'))
    try:
      value = float(weight) if sep else 1.0
    except ValueError:
      raise ValueError(f'data.mixture={spec!r}: weight {weight!r} of {name!r} is not a number; '
                       f'{MIXTURE_HINT}') from None
    if not name or not value > 0:
      raise ValueError(f'data.mixture={spec!r}: {item.strip()!r} needs a builder config and a '
                       f'positive weight; {MIXTURE_HINT}')
    parts.append((name, value))
  names = [name for name, _ in parts]
  if len(set(names)) != len(names):
    raise ValueError(f'data.mixture={spec!r} names a builder config twice')
  total = sum(value for _, value in parts)
  return [(name, value / total) for name, value in parts]


def _check_mixture(data_cfg) -> None:
  parts = mixture(data_cfg)
  if data_cfg.builder_config:
    raise ValueError(f'data.mixture={data_cfg.mixture!r} and data.builder_config='
                     f'{data_cfg.builder_config!r} are both set: the mixture names the configs; '
                     "set data.builder_config=''")
  if data_cfg.name in BUILTINS:
    allowed = _config_names(BUILTINS[data_cfg.name])
    for name, _ in parts:
      if name not in allowed:
        raise ValueError(f'data.mixture: {name!r} is not a config of {data_cfg.name!r}; '
                         f'allowed: {allowed}')


def component_config(data_cfg, builder_config: str):
  """A copy of `data_cfg` that reads `builder_config` alone (no mixture)."""
  data_cfg = type(data_cfg)(data_cfg.to_dict())
  data_cfg.builder_config = builder_config
  if 'mixture' in data_cfg:
    data_cfg.mixture = ''
  return data_cfg


def _builtin_config(data_cfg) -> str:
  """The builder config a builtin reads: data.builder_config, else res<resolution> if it exists."""
  config = data_cfg.builder_config
  if not config and f'res{data_cfg.resolution}' in _config_names(BUILTINS[data_cfg.name]):
    config = f'res{data_cfg.resolution}'
  return config


def get_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder that `data_cfg.name` and `data_cfg.builder_config` select.

  For a builtin, builder_config '' picks the config named `res<resolution>` when there is
  one, else the default; the pipeline resizes whatever it reads to `resolution`.
  """
  check_config(data_cfg)
  name, config = data_cfg.name, data_cfg.builder_config
  if name in BUILTINS:
    return prepare_builtin(name, data_cfg.data_dir, _builtin_config(data_cfg))
  spec = name[len(TFDS_PREFIX):]
  if config and '/' not in spec:
    spec = f'{spec}/{config}'
  return _prepared_tfds_builder(spec, resolve_data_dir(data_cfg.data_dir))


def _check_same_features(builders: list[tfds.core.DatasetBuilder], spec: str) -> None:
  first = builders[0].info.features
  for builder in builders[1:]:
    features = builder.info.features
    if set(features) != set(first) or any(
        repr(features[k]) != repr(first[k]) for k in first):
      raise ValueError(f'data.mixture={spec!r}: {builder.info.full_name!r} and '
                       f'{builders[0].info.full_name!r} have different features; a mixture '
                       'needs configs with the same features')


def _index_stream(sizes: list[int], weights: list[float], seed: int,
                  repeat: bool) -> grain.MapDataset:
  """Shuffled record indices of one source, or of several mixed by weight (see the module doc)."""
  if len(sizes) == 1:
    ds = grain.MapDataset.range(sizes[0]).shuffle(seed=_shuffle_seed(seed))
    return ds.repeat() if repeat else ds
  streams, offset = [], 0
  for i, n in enumerate(sizes):
    ds = grain.MapDataset.range(offset, offset + n).shuffle(seed=_shuffle_seed(seed, i))
    streams.append(ds.repeat() if repeat else ds)
    offset += n
  return grain.MapDataset.mix(streams, weights)


def _check_feature(builder: tfds.core.DatasetBuilder, key: str, what: str) -> None:
  features = builder.info.features
  if key not in features:
    raise ValueError(f'data.{what}={key!r} is not a feature of {builder.info.full_name!r}; features: {sorted(features)}.')


def resize_square(img_HxWxC: np.ndarray, resolution: int) -> np.ndarray:
  """Center-crops to a square and resizes to resolution (PIL bicubic, antialiased); float32 out."""
  h, w = img_HxWxC.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  img_SxSxC = np.asarray(img_HxWxC[top:top + s, left:left + s], np.float32)
  if s == resolution:
    return img_SxSxC
  # Mode 'F' resizes one float channel at a time, for any channel count, without rounding.
  channels = [
      np.asarray(PIL.Image.fromarray(img_SxSxC[..., c], mode='F').resize(
          (resolution, resolution), PIL.Image.Resampling.BICUBIC))
      for c in range(img_SxSxC.shape[-1])
  ]
  return np.stack(channels, axis=-1)


def preprocess(example: dict[str, Any], *, image_key: str, label_key: str, resolution: int,
               extras: tuple[extra_features.Extra, ...] = (),
               channels: int | None = None) -> dict[str, np.ndarray]:
  """Maps a decoded uint8 example to {'image': RxRxC float32 in [-1, 1], 'label': int32, *extras}.

  `channels`: the channel count every image must have (the dataset's feature declares it).
  """
  img = np.asarray(example[image_key])
  if img.dtype != np.uint8:
    raise ValueError(f'data.image_key={image_key!r} has dtype {img.dtype}; only uint8 images are supported.')
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3 or min(img.shape) == 0 or (channels and img.shape[-1] != channels):
    raise ValueError(f'data.image_key={image_key!r} has shape {img.shape}; the dataset declares '
                     f'HxWx{channels} images')
  img_RxRxC = np.clip(resize_square(img, resolution), 0.0, 255.0)
  out = {'image': img_RxRxC * np.float32(1 / 127.5) - np.float32(1.0)}
  if label_key:
    out['label'] = np.int32(example[label_key])
  for extra in extras:
    out[extra.name] = extra_features.extract(example, extra, img_RxRxC)
  return out


def _read_batch(k: int, indices_L: np.ndarray, *, source: 'records.Source | records.MixedSource',
                texts: tuple, **preprocess_kw) -> dict[str, np.ndarray]:
  """Batch k (its global index) of examples `indices_L`, preprocessed and stacked."""
  raw = source.read(indices_L)
  examples = []
  for index, example in zip(indices_L, raw):
    try:
      examples.append(preprocess(example, **preprocess_kw))
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f'{source.describe(index)}: {e}') from e
  batch = {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}
  for text in texts:
    batch |= text.tokens(raw, indices_L, k, batch)
  return batch


def _shuffle_seed(seed: int, component: int | None = None) -> int:
  # grain reshuffles epoch e with seed + e, so neighbouring user seeds would replay each
  # other's epochs shifted by one; hashing the seed first decorrelates them.
  entropy = seed if component is None else [seed, component]
  return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


class Batches:
  """Iterator over per-process numpy batches with an integer position (`get_state`).

  Batch k is computed on demand by random access, so `set_state` is exact and free.
  With repeat=False it stops after N // G batches: the last partial global batch is
  dropped, so every process yields the same number of full batches. With prefetch > 0
  one background thread computes up to that many batches ahead; batch k's contents do
  not depend on it.
  """

  def __init__(self, batches: grain.MapDataset, spec: dict[str, tuple[tuple[int, ...], np.dtype]],
               num_batches: int | None, prefetch: int = 0):
    self._batches = batches
    self._spec = spec
    self._num_batches = num_batches
    self._next = 0
    self._prefetch = prefetch
    self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix='zoo-data') if prefetch else None
    self._pending: dict[int, futures.Future] = {}

  def __iter__(self) -> 'Batches':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._num_batches is not None and self._next >= self._num_batches:
      raise StopIteration
    batch = self._get(self._next)
    self._next += 1
    return batch

  def _get(self, k: int) -> dict[str, np.ndarray]:
    if self._pool is None:
      return self._batches[k]
    stop = k + 1 + self._prefetch
    if self._num_batches is not None:
      stop = min(stop, self._num_batches)
    for j in range(k, stop):
      if j not in self._pending:
        self._pending[j] = self._pool.submit(self._batches.__getitem__, j)
    return self._pending.pop(k).result()

  @property
  def num_batches(self) -> int | None:
    """Batches in one pass when repeat=False; None for the infinite stream."""
    return self._num_batches

  def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Name -> (shape, dtype) of one per-process batch."""
    return dict(self._spec)

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable position: the index of the next global batch."""
    return {'next_batch': self._next}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues from a `get_state()` position; valid across process counts for the same G."""
    k = state.get('next_batch') if isinstance(state, dict) else None
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
      raise ValueError(f'data iterator state {state!r} needs a non-negative int "next_batch".')
    for pending in self._pending.values():
      pending.cancel()
    self._pending.clear()
    self._next = int(k)


def get_dataset(data_cfg, *, split: str, seed: int, global_batch_size: int,
                process_index: int = 0, process_count: int = 1, repeat: bool = True,
                prefetch: int = 2) -> Batches:
  """Returns process `process_index`'s batches of `split`, shuffled from `seed`.

  The stream reshuffles every epoch (infinite when repeat=True). Concatenating the batches
  of all processes in process order gives exactly the 1-process batch of size G.
  `prefetch` batches are prepared ahead in a background thread (0: none).
  """
  if global_batch_size <= 0 or process_count <= 0 or global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}.'
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count}).')
  parts = mixture(data_cfg)
  if parts:
    builders = [get_builder(component_config(data_cfg, name)) for name, _ in parts]
    _check_same_features(builders, data_cfg.mixture)
  else:
    builders = [get_builder(data_cfg)]
  builder = builders[0]
  _check_feature(builder, data_cfg.image_key, 'image_key')
  if data_cfg.label_key:
    _check_feature(builder, data_cfg.label_key, 'label_key')
  extras = tuple(extra_features.plan(
      builder.info.features, data_cfg.features, image_key=data_cfg.image_key,
      resolution=data_cfg.resolution, dataset=builder.info.full_name))
  texts = []  # Token arrays: captions (data.text) and question/answer pairs (data.qa).
  if 'text' in data_cfg:
    _check_feature(builder, data_cfg.text.caption_key, 'text.caption_key')
    texts.append(captions.Captions(data_cfg.text, seed))
  if 'qa' in data_cfg:
    qa.check_features(builder.info.features, builder.info.full_name)
    texts.append(qa.QuestionAnswers(data_cfg.qa, seed))
  image_shape = builder.info.features[data_cfg.image_key].shape
  channels = image_shape[-1] if len(image_shape) == 3 else 1
  sources = [records.Source(b, split) for b in builders]
  source = sources[0] if len(sources) == 1 else records.MixedSource(sources)
  local = global_batch_size // process_count

  # grain shuffles and batches indices only: one batched record read per batch is far
  # cheaper than grain's per-element reads from the TFDS source.
  ds = _index_stream([len(s) for s in sources], [w for _, w in parts], seed, repeat)
  n = len(ds)
  ds = ds.batch(local, drop_remainder=True)
  num_batches = None
  if not repeat:
    num_batches = n // global_batch_size
    if num_batches == 0:
      raise ValueError(f'{split!r} of {data_cfg.name!r} has {n} examples, fewer than global_batch_size={global_batch_size}.')
  ds = ds[process_index::process_count].map_with_index(functools.partial(
      _read_batch, source=source, texts=tuple(texts), image_key=data_cfg.image_key,
      label_key=data_cfg.label_key, resolution=data_cfg.resolution, extras=extras,
      channels=channels))

  r = data_cfg.resolution
  spec = {'image': ((local, r, r, channels), np.dtype(np.float32))}
  if data_cfg.label_key:
    spec['label'] = ((local,), np.dtype(np.int32))
  for extra in extras:
    spec[extra.name] = ((local, *extra.shape), extra.dtype)
  for text in texts:
    spec |= text.spec(local)
  return Batches(ds, spec, num_batches, prefetch)
