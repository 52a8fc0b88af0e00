"""What the generated-image evaluators (FD-zoo, adherence) share: conditioning, real sets, sampling.

Legend: N examples, B batch, H/W height/width, C channels, K classes, F feature width.

Conditioning contract: a generative task says how its `predict['sample']` is conditioned by
the attribute `task.conditioning`, one of CONDITIONINGS, and is called as

  'none'  -> sample(params, rng, num=B, sampler=, steps=, guidance_scale=)
  'class' -> sample(params, rng, labels_B, sampler=, steps=, guidance_scale=)  (int32 [B])
  'text'  -> sample(params, rng, prompts=[B strings], sampler=, steps=, guidance_scale=)

returning BxHxWxC images in [0, 1]; `sampler=None` / `steps=None` mean the task's defaults.
A task without the attribute counts as 'class' when `task.num_classes` > 0, else 'none'.
Class labels are the real split's own labels (so classes come in the split's proportions);
text prompts are the first caption (data feature 'captions') of each real example.
"""

import dataclasses
import os

import jax
import numpy as np

from data import pipeline as data_pipeline
from zoo import config as zoo_config
from zoo import diffusion
from zoo import latents
from zoo import sharding

CONDITIONINGS = ('none', 'class', 'text')
# Keys shared by every generated-image evaluator's config.
SAMPLING_SCHEMA = {'split': str, 'num_samples': int, 'batch_size': int, 'sampler': str,
                   'steps': int, 'guidance_scale': float, 'use_ema': bool, 'seed': int}
_REAL_SETS = {}  # Real examples are read and decoded once per process, per (data, split, n).


# Keys of the evaluators that also write a PNG grid (`grid` images, 0 = none, `upscale`d).
GRID_SCHEMA = {'type': str, **SAMPLING_SCHEMA, 'grid': int, 'upscale': int}


def check_grid_sampling(cfg, where):
  """`check_sampling` plus the grid keys of GRID_SCHEMA."""
  check_sampling(cfg, where)
  if cfg.grid < 0 or cfg.upscale < 1:
    raise ValueError(f'{where}: grid must be >= 0 (0 = no PNG) and upscale >= 1')


def check_sampling(cfg, where):
  """Validates the SAMPLING_SCHEMA values of an evaluator config."""
  if not cfg.split:
    raise ValueError(f'{where}.split must name a split (e.g. validation)')
  if cfg.num_samples < 2 or cfg.batch_size < 1 or cfg.steps < 0:
    raise ValueError(f'{where}: num_samples must be >= 2, batch_size >= 1 and steps >= 0 '
                     '(0 = the task default)')
  if cfg.sampler:
    zoo_config.check_choice(cfg.sampler, diffusion.SAMPLERS, f'{where}.sampler')


def conditioning(task):
  """The task's conditioning: `task.conditioning`, else 'class' / 'none' by `task.num_classes`."""
  kind = getattr(task, 'conditioning', None)
  if kind is None:
    kind = 'class' if getattr(task, 'num_classes', 0) else 'none'
  zoo_config.check_choice(kind, CONDITIONINGS, f'{type(task).__name__}.conditioning')
  return kind


@dataclasses.dataclass(frozen=True)
class RealSet:
  """`num` examples of a split, drawn without replacement by `seed`, decoded once."""
  images_NxHxWxC: np.ndarray  # float32 in [-1, 1], as the data pipeline emits them.
  labels_N: np.ndarray | None  # int32 `data.label_key`, None without one.
  prompts: tuple[str, ...]  # First caption of each example ('' without captions).
  examples: tuple[dict, ...]  # The decoded TFDS examples (for the shapes scorer).


def data_key(data_cfg):
  """A hashable identity of a data config."""
  return zoo_config.to_json(data_cfg)


def where(config, cfg):
  """'config.evals.<name>' of the evaluator config `cfg`, for error messages."""
  names = [name for name, c in config.evals.items() if c is cfg]
  return f'config.evals.{names[0]}' if names else f'config.evals.<{cfg.type}>'


def real_set(data_cfg, split, num, seed, where):
  """The (cached) RealSet of `num` examples of `split`; ValueError if the split is smaller."""
  data_cfg = latents.source_data(data_cfg)  # Pre-computed latents: their source's records.
  key = (data_key(data_cfg), split, num, seed)
  if key not in _REAL_SETS:
    source = data_pipeline.get_builder(data_cfg).as_data_source(split)
    if num > len(source):
      raise ValueError(f'{where}.num_samples={num} exceeds the {len(source)} examples of split '
                       f'{split!r} of {data_cfg.name!r}')
    indices = np.random.default_rng(seed).permutation(len(source))[:num]
    examples = tuple(source.__getitems__([int(i) for i in indices]))
    images = np.stack([data_pipeline.preprocess(ex, image_key=data_cfg.image_key, label_key='',
                                                resolution=data_cfg.resolution)['image']
                       for ex in examples])
    labels = None
    if data_cfg.label_key:
      labels = np.array([ex[data_cfg.label_key] for ex in examples], np.int32)
    _REAL_SETS[key] = RealSet(images, labels, tuple(_first_caption(ex) for ex in examples),
                              examples)
  return _REAL_SETS[key]


def _first_caption(example):
  captions = example.get('captions', ())
  if not len(captions):
    return ''
  first = captions[0]
  return first.decode() if isinstance(first, bytes) else str(first)


def generate(task, params, cfg, real):
  """`cfg.num_samples` images in [0, 1] (NxHxWxC numpy), conditioned like `real`'s examples.

  Batches all have `cfg.batch_size` examples (the last one wraps around), so the sampler
  compiles once; batch i draws from `fold_in(PRNGKey(cfg.seed), i)`.
  """
  kind, n, bs = conditioning(task), cfg.num_samples, cfg.batch_size
  kwargs = dict(sampler=cfg.sampler or None, steps=cfg.steps or None,
                guidance_scale=cfg.guidance_scale)
  if kind == 'class' and real.labels_N is None:
    raise ValueError('a class-conditional model needs labels: set config.data.label_key')
  rng = jax.random.PRNGKey(cfg.seed)
  out = []
  for i, start in enumerate(range(0, n, bs)):
    idx_B = np.arange(start, start + bs) % n
    key = jax.random.fold_in(rng, i)
    if kind == 'class':
      images = task.predict['sample'](params, key, real.labels_N[idx_B], **kwargs)
    elif kind == 'text':
      images = task.predict['sample'](params, key, prompts=[real.prompts[j] for j in idx_B],
                                      **kwargs)
    else:
      images = task.predict['sample'](params, key, num=bs, **kwargs)
    out.append(np.asarray(sharding.host_gather(images), np.float32))
  return np.concatenate(out)[:n]


def to_uint8(images_NxHxWxC):
  """[0, 1] floats -> uint8, as the shapes scorer wants them."""
  return np.round(np.clip(images_NxHxWxC, 0.0, 1.0) * 255.0).astype(np.uint8)


def params_of(state, use_ema):
  """The params an evaluator samples with."""
  return state['ema_params' if use_ema else 'params']


def require_dir(path, what):
  """FileNotFoundError naming `what` unless `path` is a directory."""
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f'{what}={path!r} is not a directory')
