"""Control adherence: generate from held-out hints, judge the images against their scenes.

Legend: N examples, R resolution, K hint channels.

For `num_samples` examples of a shapes split, the run's hint (depth, seg, pose or edges,
computed from the example as the pipeline would) and label (a `controlnet` run) or first
caption (a `text_controlnet` run: the prompt names each object's colour and shape) condition a
sample at the run's `conditioning_scale` and at scale 0 (exactly the base model: the same model
without control).
Both are judged by `data.shapes.score.score` against the example's scene, from pixels alone:

  mean_iou       per visible object, IoU between its given mask and its colour's pixels
  depth_order    where two objects overlap, the nearer one's colour is the one shown
  keypoints      per visible joint, the person's colour covers it
  keypoint_px    mean distance (pixels) from a joint to the nearest person-coloured pixel
  overall        all the scorer's checks
  silhouette_iou IoU between the scene's object pixels (its semantic mask's shape classes) and
                 the image's object-coloured pixels, whatever their colour: what a seg or depth
                 hint pins down when only the label, not each object's colour, is given

Metrics are `<name>` for the controlled samples and `<name>_base` without control. A PNG grid
(rows: hint | controlled | base | real) goes to workdir/control/step_N.png.
"""

import os

import jax
import numpy as np

from data import conditions
from data import extra_features
from data import pipeline as data_pipeline
from data.shapes import generate
from data.shapes import grammar
from data.shapes import render
from data.shapes import score
from zoo import metrics
from zoo import sharding
from zoo.evals import generation

_METRICS = ('overall', 'mean_iou', 'depth_order', 'keypoints')


def hints_of(examples, control, data_cfg, builder_features):
  """NxRxRxK hints of decoded examples, as the training pipeline computes them."""
  feature = conditions.get(control).feature
  extra, = extra_features.plan(builder_features, (feature,), image_key=data_cfg.image_key,
                               resolution=data_cfg.resolution, dataset=data_cfg.name)
  values = [data_pipeline.preprocess(ex, image_key=data_cfg.image_key, label_key='',
                                     resolution=data_cfg.resolution, extras=(extra,))[feature]
            for ex in examples]
  return np.asarray(conditions.hint(control, np.stack(values)))


def silhouette_iou(image_RxRx3, example):
  """IoU of the scene's shape-object pixels and the image's palette-coloured pixels."""
  r = image_RxRx3.shape[0]
  semantic = render.render(generate.scene_from_example(example), r).semantic
  objects = (semantic >= 1) & (semantic <= len(grammar.SHAPES))
  coloured = score.classify(image_RxRx3) >= 0
  union = (objects | coloured).sum()
  return float((objects & coloured).sum() / union) if union else 1.0


def judge(images_NxRxRx3, examples):
  """The scorer's pooled metrics of images against their examples' scenes."""
  pixels = generation.to_uint8(images_NxRxRx3)
  pooled = score.aggregate([score.score(img, ex) for img, ex in zip(pixels, examples)])
  out = {k: pooled[k] for k in _METRICS if pooled[k] is not None}
  out['silhouette_iou'] = float(np.mean([silhouette_iou(img, ex)
                                         for img, ex in zip(pixels, examples)]))
  if pooled['keypoint_error'] is not None:
    out['keypoint_px'] = pooled['keypoint_error'] * images_NxRxRx3.shape[1]
  return out


class ControlAdherence:
  """Samples under held-out hints with and without control; scores both (see module doc)."""

  SCHEMA = generation.GRID_SCHEMA

  @staticmethod
  def check(cfg, config, where):
    generation.check_grid_sampling(cfg, where)
    if config.task.name not in ('controlnet', 'text_controlnet'):
      raise ValueError(f'{where}.type=control needs config.task.name controlnet or '
                       f'text_controlnet, not {config.task.name!r}')
    if config.data.name != 'shapes':
      raise ValueError(f'{where}.type=control judges shapes scenes; config.data.name is '
                       f'{config.data.name!r}')

  def __init__(self, cfg, *, task, config, workdir):
    self.cfg, self.task, self.data_cfg = cfg, task, config.data
    self.where = generation.where(config, cfg)
    self.outdir = os.path.join(workdir, 'control')

  def samples(self, params, real, hints, scale):
    """NxRxRx3 images in [0, 1] under the hints at `scale`, batch by batch."""
    cfg, n, bs, out = self.cfg, self.cfg.num_samples, self.cfg.batch_size, []
    rng = jax.random.PRNGKey(cfg.seed)
    for i, start in enumerate(range(0, n, bs)):
      idx_B = np.arange(start, start + bs) % n
      if getattr(self.task, 'conditioning', None) == 'text':  # A text ControlNet.
        condition = dict(prompts=[real.prompts[j] for j in idx_B])
      else:
        condition = dict(labels_B=None if real.labels_N is None or not self.task.num_classes
                         else real.labels_N[idx_B])
      images = self.task.predict['sample'](
          params, jax.random.fold_in(rng, i), **condition, hints=hints[idx_B],
          conditioning_scale=scale, sampler=cfg.sampler or None, steps=cfg.steps or None,
          guidance_scale=cfg.guidance_scale)
      out.append(np.asarray(sharding.host_gather(images), np.float32))
    return np.concatenate(out)[:n]

  def run(self, state, step):
    cfg = self.cfg
    real = generation.real_set(self.data_cfg, cfg.split, cfg.num_samples, cfg.seed, self.where)
    features = data_pipeline.get_builder(self.data_cfg).info.features
    hints = hints_of(real.examples, self.task.control, self.data_cfg, features)
    params = generation.params_of(state, cfg.use_ema)
    controlled = self.samples(params, real, hints, self.task.cfg.conditioning_scale)
    base = self.samples(params, real, hints, 0.0)
    if cfg.grid and jax.process_index() == 0:
      k = min(cfg.grid, cfg.num_samples)
      rows = [conditions.to_uint8(hints[:k]) / 255.0, controlled[:k], base[:k],
              (real.images_NxHxWxC[:k] + 1.0) / 2.0]
      metrics.save_image_grid(np.concatenate(rows), os.path.join(self.outdir,
                                                                 f'step_{step:06d}.png'),
                              ncols=k, upscale=cfg.upscale)
    return judge(controlled, real.examples) | {
        f'{k}_base': v for k, v in judge(base, real.examples).items()}
