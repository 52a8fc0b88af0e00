"""Inpainting and outpainting quality on held-out shapes scenes, judged from pixels.

Legend: N examples, R resolution.

Inpainting: for each of `num_samples` examples of a split, the box of its largest object
(the one its class label names), widened by one pixel, is masked and regenerated with the
example's label; `data.shapes.score.score` then judges the result against the scene:
`inpaint_shape` / `inpaint_colour` are the scorer's shape and colour accuracies over the
scenes' objects (the regenerated one among them), `inpaint_overall` all its checks, and
`outside_max_diff` the largest change of a pixel outside the mask (0 when kept exactly).
Outpainting: a border of `pad` pixels is regenerated around the rest of the scene;
`outpaint_mse` is the mean squared error (pixels in [0, 1]) against the ground truth inside
the border and `outpaint_overall` the scorer's overall accuracy. Works for any run with
`predict['inpaint']`: training-free (RePaint / blend) or inpainting-trained. A PNG grid (rows:
masked input | inpainted | real, then the same for outpainting) goes to workdir/inpaint/.
"""

import os

import jax
import numpy as np

from data.shapes import score
from zoo import metrics
from zoo import sharding
from zoo.evals import generation


def object_masks(examples, resolution):
  """NxRxRx1 float32: the box of each example's largest object, one pixel wider, set to 1."""
  out = np.zeros((len(examples), resolution, resolution, 1), np.float32)
  for i, ex in enumerate(examples):
    sizes = np.asarray(ex['objects']['size'])
    ymin, xmin, ymax, xmax = np.asarray(ex['objects']['box'])[int(np.argmax(sizes))]
    top, left = max(0, int(np.floor(ymin * resolution)) - 1), max(0, int(np.floor(
        xmin * resolution)) - 1)
    out[i, top:int(np.ceil(ymax * resolution)) + 1, left:int(np.ceil(xmax * resolution)) + 1] = 1
  return out


def border_mask(resolution, pad):
  """RxRx1 float32: 1 on a border `pad` pixels wide."""
  out = np.ones((resolution, resolution, 1), np.float32)
  out[pad:resolution - pad, pad:resolution - pad] = 0
  return out


class InpaintQuality:
  """Inpaints each example's largest object and outpaints its border; scores both."""

  SCHEMA = generation.GRID_SCHEMA | {'method': str, 'pad': int}

  @staticmethod
  def check(cfg, config, where):
    generation.check_grid_sampling(cfg, where)
    if not 0 < cfg.pad < config.data.resolution // 2:
      raise ValueError(f'{where}.pad={cfg.pad} must lie in [1, {config.data.resolution // 2 - 1}]')
    if config.data.name != 'shapes' or not config.data.label_key:
      raise ValueError(f'{where}.type=inpaint judges labelled shapes scenes (data.name=shapes, '
                       'data.label_key set)')

  def __init__(self, cfg, *, task, config, workdir):
    if 'inpaint' not in task.predict:
      raise ValueError(f'{generation.where(config, cfg)}: the {config.task.name!r} task does not '
                       'inpaint')
    self.cfg, self.task, self.data_cfg = cfg, task, config.data
    self.where = generation.where(config, cfg)
    self.outdir = os.path.join(workdir, 'inpaint')

  def _fill(self, params, images, masks, labels):
    cfg, n, bs, out = self.cfg, self.cfg.num_samples, self.cfg.batch_size, []
    rng = jax.random.PRNGKey(cfg.seed)
    method = {'mode': cfg.method} if cfg.method else {}
    for i, start in enumerate(range(0, n, bs)):
      idx = np.arange(start, start + bs) % n
      filled = self.task.predict['inpaint'](
          params, jax.random.fold_in(rng, i), images[idx], masks[idx],
          labels[idx] if self.task.num_classes else None, sampler=cfg.sampler or None,
          steps=cfg.steps or None, guidance_scale=cfg.guidance_scale, **method)
      out.append(np.asarray(sharding.host_gather(filled), np.float32))
    return np.concatenate(out)[:n]

  def run(self, state, step):
    cfg = self.cfg
    real = generation.real_set(self.data_cfg, cfg.split, cfg.num_samples, cfg.seed, self.where)
    params = generation.params_of(state, cfg.use_ema)
    images = (real.images_NxHxWxC + 1.0) / 2.0
    r = images.shape[1]
    boxes = object_masks(real.examples, r)
    ring = np.broadcast_to(border_mask(r, cfg.pad), boxes.shape)
    inpainted = self._fill(params, images, boxes, real.labels_N)
    outpainted = self._fill(params, images, ring, real.labels_N)
    judged_in = score.aggregate([score.score(img, ex) for img, ex in
                                 zip(generation.to_uint8(inpainted), real.examples)])
    judged_out = score.aggregate([score.score(img, ex) for img, ex in
                                  zip(generation.to_uint8(outpainted), real.examples)])
    outside = np.abs(inpainted - images)[np.broadcast_to(boxes == 0, images.shape)]
    border = np.broadcast_to(ring > 0, images.shape)
    if cfg.grid and jax.process_index() == 0:
      k = min(cfg.grid, cfg.num_samples)
      rows = [np.where(boxes[:k] > 0, 0.5, images[:k]), inpainted[:k], images[:k],
              np.where(ring[:k] > 0, 0.5, images[:k]), outpainted[:k]]
      metrics.save_image_grid(np.concatenate(rows), os.path.join(self.outdir,
                                                                 f'step_{step:06d}.png'),
                              ncols=k, upscale=cfg.upscale)
    return {'inpaint_overall': judged_in['overall'], 'inpaint_shape': judged_in['shape'],
            'inpaint_colour': judged_in['colour'],
            'outside_max_diff': float(outside.max()) if outside.size else 0.0,
            'outpaint_mse': float(((outpainted - images) ** 2)[border].mean()),
            'outpaint_overall': judged_out['overall']}
