"""Prompt adherence on the shapes dataset: the exact pixel scorers judge generated images.

- class-conditional models on the 64-way 'shape_colour' label (one-object configs such as
  single32): `data.shapes.score.judge_single` against the requested (shape, colour); metrics
  'accuracy' (both right), 'colour', 'shape';
- text-to-image models: `data.shapes.score.score` of each image against the real example
  whose first caption prompted it; metrics 'overall' and each judged criterion's accuracy.

Requested labels / prompts are those of `num_samples` real examples of `split` (see
generation.py). Also writes the first `grid` images to `workdir/adherence/step_NNNNNN.png`.
"""

import os

import jax
import numpy as np

from data.shapes import grammar
from data.shapes import score
from zoo import latents
from zoo import metrics
from zoo.evals import generation

LABEL_KEY = 'shape_colour'  # index = SHAPES.index(shape) * len(COLOUR_NAMES) + colour index.


def decode_shape_colour(label):
  """(shape, colour) names of a 'shape_colour' class index."""
  shape, colour = divmod(int(label), len(grammar.COLOUR_NAMES))
  return grammar.SHAPES[shape], grammar.COLOUR_NAMES[colour]


def judge_classes(images_uint8_NxHxWx3, labels_N):
  """Metrics of `judge_single` over images requested as 'shape_colour' classes."""
  judged = [score.judge_single(img, *decode_shape_colour(label))
            for img, label in zip(images_uint8_NxHxWx3, labels_N)]
  colour = np.array([j['colour'] for j in judged])
  shape = np.array([j['shape'] for j in judged])
  return {'accuracy': float(np.mean(colour & shape)), 'colour': float(colour.mean()),
          'shape': float(shape.mean())}


def judge_prompts(images_uint8_NxHxWx3, examples):
  """Overall and per-criterion accuracy of `score` against each prompting example."""
  pooled = score.aggregate([score.score(img, ex) for img, ex in
                            zip(images_uint8_NxHxWx3, examples)])
  return {k: pooled[k] for k in ('overall', *score.CRITERIA) if pooled[k] is not None}


class Adherence:
  """Generates from the split's labels or captions and scores the images from their pixels."""

  SCHEMA = generation.GRID_SCHEMA

  @staticmethod
  def check(cfg, config, where):
    generation.check_grid_sampling(cfg, where)
    if config.data.name != 'shapes' and not latents.is_latents(config.data):
      raise ValueError(f'{where}.type=adherence needs config.data.name=shapes (or latents '
                       f'encoded from it), not {config.data.name!r}')
    if config.model.get('num_classes', 0) and config.data.label_key != LABEL_KEY:
      raise ValueError(f'{where}: class-conditional adherence needs config.data.label_key='
                       f'{LABEL_KEY!r} (one-object configs), not {config.data.label_key!r}')

  def __init__(self, cfg, *, task, config, workdir):
    self.cfg, self.task, self.data_cfg = cfg, task, config.data
    self.where = generation.where(config, cfg)
    self.kind = generation.conditioning(task)
    if self.kind == 'none':
      raise ValueError(f'{self.where}: an unconditional model has no prompt to adhere to')
    if self.kind == 'class' and config.data.label_key != LABEL_KEY:
      raise ValueError(f'{self.where}: class-conditional adherence needs data.label_key='
                       f'{LABEL_KEY!r}, not {config.data.label_key!r}')
    source = latents.source_data(config.data).name
    if source != 'shapes':
      raise ValueError(f'{self.where}: the latents in {config.data.data_dir} were encoded from '
                       f'{source!r}; adherence needs shapes')
    self.outdir = os.path.join(workdir, 'adherence')

  def run(self, state, step):
    cfg = self.cfg
    real = generation.real_set(self.data_cfg, cfg.split, cfg.num_samples, cfg.seed, self.where)
    images = generation.generate(self.task, generation.params_of(state, cfg.use_ema), cfg, real)
    if cfg.grid and jax.process_index() == 0:
      metrics.save_image_grid(images[:cfg.grid], os.path.join(self.outdir, f'step_{step:06d}.png'),
                              upscale=cfg.upscale)
    pixels = generation.to_uint8(images)
    if self.kind == 'class':
      return judge_classes(pixels, real.labels_N)
    return judge_prompts(pixels, real.examples)
