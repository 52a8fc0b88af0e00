"""PNG grids of generated samples: `per_label` per class label, or `per_prompt` per prompt."""

import os

import jax
import numpy as np

from zoo import metrics
from zoo import sharding


class SampleGrid:
  """Samples with the task's `predict['sample']` and writes `workdir/samples/step_NNNNNN.png`."""

  SCHEMA = {'type': str, 'labels': tuple, 'per_label': int, 'sampler': str, 'steps': int,
            'guidance_scale': float, 'use_ema': bool, 'seed': int, 'upscale': int}

  @staticmethod
  def check(cfg, config, where):
    num_classes = config.model.get('num_classes', 0)
    bad = [l for l in cfg.labels if not 0 <= l <= num_classes] if num_classes else list(cfg.labels)
    if bad:
      raise ValueError(f'{where}.labels {bad} are not class ids of this model '
                       f'(num_classes={num_classes}; empty tuple for unconditional models)')
    if cfg.per_label < 1 or cfg.steps < 0 or cfg.upscale < 1:
      raise ValueError(f'{where}: per_label and upscale must be >= 1 and steps >= 0 (0 = task default)')

  def __init__(self, cfg, *, task, config, workdir):
    self.cfg, self.task = cfg, task
    self.outdir = os.path.join(workdir, 'samples')

  def images(self, params):
    """Samples in [0, 1], rows = labels (or a square of unconditional samples)."""
    cfg = self.cfg
    rng = jax.random.PRNGKey(cfg.seed)
    kwargs = dict(sampler=cfg.sampler, steps=cfg.steps or None, guidance_scale=cfg.guidance_scale)
    if cfg.labels:
      labels = np.repeat(np.asarray(cfg.labels, np.int32), cfg.per_label)
      return self.task.predict['sample'](params, rng, labels, **kwargs)
    return self.task.predict['sample'](params, rng, num=cfg.per_label ** 2, **kwargs)

  def run(self, state, step):
    return write_grid(self, state, step, ncols=self.cfg.per_label)


class PromptGrid:
  """Text-to-image samples, `per_prompt` per row: writes `workdir/samples/step_NNNNNN.png`."""

  SCHEMA = {'type': str, 'prompts': tuple, 'per_prompt': int, 'negative_prompt': str,
            'sampler': str, 'steps': int, 'guidance_scale': float, 'use_ema': bool, 'seed': int,
            'upscale': int}

  @staticmethod
  def check(cfg, config, where):
    if config.task.name != 'text_to_image':
      raise ValueError(f'{where}: prompt_grid needs a text_to_image task, not '
                       f'{config.task.name!r} (use sample_grid)')
    if not cfg.prompts or not all(isinstance(p, str) for p in cfg.prompts):
      raise ValueError(f'{where}.prompts must be a non-empty tuple of strings')
    if cfg.per_prompt < 1 or cfg.steps < 0 or cfg.upscale < 1:
      raise ValueError(f'{where}: per_prompt and upscale must be >= 1 and steps >= 0 '
                       '(0 = task default)')

  def __init__(self, cfg, *, task, config, workdir):
    self.cfg, self.task = cfg, task
    self.outdir = os.path.join(workdir, 'samples')

  def images(self, params):
    """Samples in [0, 1], one row per prompt."""
    cfg = self.cfg
    prompts = [p for p in cfg.prompts for _ in range(cfg.per_prompt)]
    return self.task.predict['sample'](
        params, jax.random.PRNGKey(cfg.seed), prompts=prompts,
        negative_prompts=[cfg.negative_prompt] * len(prompts), sampler=cfg.sampler,
        steps=cfg.steps or None, guidance_scale=cfg.guidance_scale)

  def run(self, state, step):
    return write_grid(self, state, step, ncols=self.cfg.per_prompt)


def write_grid(evaluator, state, step, ncols):
  """Samples with `evaluator.images`, writes the PNG grid, returns summary statistics."""
  cfg = evaluator.cfg
  images = sharding.host_gather(evaluator.images(state['ema_params' if cfg.use_ema else 'params']))
  if jax.process_index() == 0:
    path = os.path.join(evaluator.outdir, f'step_{step:06d}.png')
    metrics.save_image_grid(images, path, ncols=ncols, upscale=cfg.upscale)
  return {'sample_mean': float(images.mean()), 'sample_std': float(images.std())}
