"""Canny edge maps: OpenCV parity, the thin-and-connected behaviour, and the 'edges' feature."""

import ml_collections
import numpy as np
import pytest

import data as data_lib
from data import edges


def _scene(seed):
  """A 40x40 RGB image with a few flat rectangles, the kind of input ControlNet annotates."""
  rng = np.random.default_rng(seed)
  img = np.full((40, 40, 3), rng.integers(0, 256, 3), np.uint8)
  for _ in range(4):
    y, x = rng.integers(0, 30, 2)
    h, w = rng.integers(4, 12, 2)
    img[y:y + h, x:x + w] = rng.integers(0, 256, 3)
  return img


def test_matches_opencv():
  import cv2  # The parity extra installs opencv-python-headless.
  rng = np.random.default_rng(0)
  for seed in range(20):
    img = _scene(seed)
    np.testing.assert_array_equal(
        edges.canny(img), cv2.Canny(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), 100, 200))
    grey = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    for low, high in ((100, 200), (50, 120), (300, 600)):
      np.testing.assert_array_equal(edges.canny(grey, low, high), cv2.Canny(grey, low, high))


def test_a_step_gives_one_thin_line_and_hysteresis_follows_it():
  img = np.zeros((16, 16), np.uint8)
  img[:8, 8:] = 255  # Strong step (Sobel |gx| = 4 * 255) in the top half...
  img[8:, 8:] = 30  # ...continued by a weak one (4 * 30 = 120: above low, below high).
  img[:, 14:] = 255  # A second weak step (225 -> 255 is 4 * 225 = 900: strong) for contrast.
  out = edges.canny(img)
  assert set(np.unique(out)) <= {0, 255}
  left = out[:, :12] > 0
  # One pixel per row (non-maximum suppression), away from the horizontal edge at rows 7-8;
  # in rows 9-15 it is the weak step, kept because it is connected to the strong one.
  for row in (*range(0, 7), *range(9, 16)):
    assert left[row].sum() == 1 and left[row, 7], row
  isolated = np.zeros((16, 16), np.uint8)
  isolated[:, 8:] = 30  # The same weak step alone: no strong seed, no edge.
  assert not edges.canny(isolated).any()
  assert not edges.canny(np.full((8, 8, 3), 77, np.uint8)).any()


def test_errors():
  with pytest.raises(ValueError, match='low <= high'):
    edges.canny(np.zeros((4, 4)), 200, 100)
  with pytest.raises(ValueError, match='HxWx3'):
    edges.canny(np.zeros((4, 4, 2)))


def test_edges_feature_is_computed_from_the_emitted_image():
  cfg = ml_collections.ConfigDict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key='',
      builder_config='tiny32', train_split='train', eval_split='validation',
      features=('edges',)))
  batch = next(iter(data_lib.get_dataset(cfg, split='train', seed=0, global_batch_size=4)))
  assert batch['edges'].shape == (4, 32, 32, 1) and batch['edges'].dtype == np.float32
  for image, edge in zip(batch['image'], batch['edges']):
    pixels = np.round((image + 1.0) * 127.5)
    np.testing.assert_array_equal(edge[..., 0] * 255, edges.canny(pixels))
  assert batch['edges'].any()
  cfg.features = ('edgez',)
  with pytest.raises(ValueError, match="computed from any image: \\['edges'\\]"):
    data_lib.get_dataset(cfg, split='train', seed=0, global_batch_size=4)
