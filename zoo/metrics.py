"""Metric writers (JSONL + TensorBoard), the progress bar, and PNG image grids."""

import json
import logging
import os

import numpy as np
from PIL import Image

from zoo import files
from zoo import tensorboard

log = logging.getLogger('zoo')


class MetricWriter:
  """Appends one JSON object per log step to `workdir/metrics.jsonl` and mirrors to TensorBoard.

  Only process 0 writes; the other processes get a writer that does nothing. A run resumed at
  `resume_step` first drops the rows the killed process logged after that checkpoint (and a
  line torn by the kill), so the file reads as if the run had never stopped.
  """

  def __init__(self, workdir, *, enabled=True, filename='metrics.jsonl', resume_step=None):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      path = os.path.join(workdir, filename)
      if resume_step is not None and os.path.exists(path):
        _truncate_after(path, resume_step)
      self._jsonl = open(path, 'a')
      self._tb = tensorboard.EventWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step, scalars):
    """Writes `{name: number}` for `step`."""
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _number(v) for k, v in scalars.items()}}
    try:  # Appends: a kill can only tear the last line, which readers and resumes drop.
      self._jsonl.write(json.dumps(row) + '\n')
      self._jsonl.flush()
    except OSError as e:
      raise OSError(e.errno, f'could not append to {self._jsonl.name}: {e.strerror}') from e
    self._tb.scalars(step, {k: v for k, v in row.items() if k != 'step'})

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _number(v):
  v = np.asarray(v).item()
  return v if isinstance(v, int) else float(v)


def read_jsonl(path):
  """The rows of a metrics.jsonl file (a last line torn by a killed writer is left out)."""
  with open(path) as f:
    lines = f.read().split('\n')
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:  # Only the unterminated last line can be a torn write.
        raise ValueError(f'{path}:{i + 1} is not a JSON row: {line[:80]!r}') from None
  return rows


def _truncate_after(path, step):
  rows = read_jsonl(path)
  kept = [r for r in rows if r.get('step', 0) <= step]
  with open(path) as f:
    torn = not f.read().endswith('\n') and os.path.getsize(path) > 0
  if len(kept) != len(rows) or torn:
    log.info('%s: dropping %d rows logged after step %d by the interrupted run', path,
             len(rows) - len(kept), step)
    files.write_text(path, ''.join(json.dumps(r) + '\n' for r in kept))


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
  with files.atomic_path(path) as tmp:
    image_format = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), 'PNG')
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format=image_format)
  return path
