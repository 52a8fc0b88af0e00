"""Metric writers (JSONL + TensorBoard), the progress bar, and PNG image grids."""

import json
import os

import numpy as np
from PIL import Image


class MetricWriter:
  """Appends one JSON object per log step to `workdir/metrics.jsonl` and mirrors to TensorBoard.

  Only process 0 writes; the other processes get a writer that does nothing.
  """

  def __init__(self, workdir, *, enabled=True, filename='metrics.jsonl'):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # Heavy import: only where it writes.
      self._jsonl = open(os.path.join(workdir, filename), 'a')
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step, scalars):
    """Writes `{name: number}` for `step`."""
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _number(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for k, v in row.items():
      if k != 'step':
        self._tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _number(v):
  v = np.asarray(v).item()
  return v if isinstance(v, int) else float(v)


def read_jsonl(path):
  """The rows of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def image_grid(images_NxHxWxC, ncols=None, pad=1):
  """Tiles images in [0, 1] into one uint8 HxWxC grid with `pad` pixels of white between."""
  images = np.clip(np.asarray(images_NxHxWxC, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  ncols = ncols or int(np.ceil(np.sqrt(n)))
  nrows = int(np.ceil(n / ncols))
  grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return (grid * 255.0 + 0.5).astype(np.uint8)


def save_image_grid(images_NxHxWxC, path, ncols=None, upscale=1):
  """Writes a PNG grid of images in [0, 1]; `upscale` enlarges small images (nearest)."""
  grid = image_grid(images_NxHxWxC, ncols)
  if upscale > 1:
    grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
  return path
