"""Aliased rasterisers: a pixel belongs to a figure iff its centre does; no anti-aliasing.

Coordinates are (x, y) in [0, 1] image units, y pointing down; pixel (row i, col j) has
its centre at ((j + 0.5) / R, (i + 0.5) / R). Every mask is a pure function of the
figure's parameters and R, so a scene re-rendered from its stored labels gives the same
pixels, and every pixel of a mask shows exactly that figure's colour.
"""

import functools

import numpy as np
import PIL.ImageFont

from data.shapes import pose

SHAPES = ('circle', 'square', 'triangle', 'star', 'heart', 'cross', 'diamond', 'hexagon')


def _regular(k: int, radius: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
  angles = phase + 2 * np.pi * np.arange(k) / k
  return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star() -> np.ndarray:
  angles = -np.pi / 2 + np.pi * np.arange(10) / 5
  radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.5)
  return radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _cross(arm: float = 0.3, reach: float = 0.9) -> np.ndarray:
  a, b = arm, reach
  return np.array([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
                   (-a, a), (-b, a), (-b, -a), (-a, -a)])


# Vertices (u, v) in units of the object's radius, inside the unit square.
_POLYGONS = {
    'square': np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]),
    'triangle': _regular(3),
    'star': _star(),
    'cross': _cross(),
    'diamond': _regular(4),
    'hexagon': _regular(6, phase=0.0),
}
# The heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3 spans x in +-1.139, y in [-1, 1.236].
_HEART_SCALE, _HEART_SHIFT = 1.14, 0.118


def _in_polygon(u: np.ndarray, v: np.ndarray, verts_Kx2: np.ndarray) -> np.ndarray:
  """Even-odd rule on a broadcast grid of points (u, v)."""
  inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
  for (x0, y0), (x1, y1) in zip(verts_Kx2, np.roll(verts_Kx2, -1, axis=0)):
    if y0 == y1:
      continue  # A horizontal edge never crosses a horizontal ray.
    crosses = (y0 > v) != (y1 > v)
    x_at_v = x0 + (v - y0) * ((x1 - x0) / (y1 - y0))
    inside ^= crosses & (u < x_at_v)
  return inside


def _in_unit_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  if shape == 'circle':
    return u * u + v * v <= 1.0
  if shape == 'heart':
    x, y = u * _HEART_SCALE, _HEART_SHIFT - v * _HEART_SCALE
    return (x * x + y * y - 1.0) ** 3 <= x * x * y ** 3
  return _in_polygon(u, v, _POLYGONS[shape])


@functools.lru_cache(maxsize=8)
def pixel_centres(resolution: int) -> np.ndarray:
  """Centre coordinates of the R pixels along one axis, float64."""
  return (np.arange(resolution, dtype=np.float64) + 0.5) / resolution


def _window(lo: float, hi: float, resolution: int) -> slice:
  """The pixels whose centres may lie in [lo, hi] (a superset, never a subset)."""
  return slice(max(0, int(np.floor(lo * resolution)) - 1),
               min(resolution, int(np.ceil(hi * resolution)) + 1))


def shape_mask(shape: str, x: float, y: float, radius: float, resolution: int) -> np.ndarray:
  """Bool RxR mask of `shape` centred at (x, y) inside a circle of `radius`."""
  out = np.zeros((resolution, resolution), bool)
  x, y, radius = float(x), float(y), float(radius)
  rows = _window(y - radius, y + radius, resolution)
  cols = _window(x - radius, x + radius, resolution)
  c = pixel_centres(resolution)
  u = (c[cols][None, :] - x) / radius
  v = (c[rows][:, None] - y) / radius
  out[rows, cols] = _in_unit_shape(shape, u, v)
  return out


def limb_width(resolution: int) -> int:
  """Stroke width of the stick figure and the skeleton map, in pixels."""
  return max(2, round(resolution / 24))


def _segment_dist2(x: np.ndarray, y: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
  d = q - p
  t = np.clip(((x - p[0]) * d[0] + (y - p[1]) * d[1]) / max(float(d @ d), 1e-12), 0.0, 1.0)
  return (x - p[0] - t * d[0]) ** 2 + (y - p[1] - t * d[1]) ** 2


def _capsule(p: np.ndarray, q: np.ndarray, half: float, resolution: int) -> np.ndarray:
  """Bool RxR: pixel centres within `half` of the segment pq."""
  out = np.zeros((resolution, resolution), bool)
  rows = _window(min(p[1], q[1]) - half, max(p[1], q[1]) + half, resolution)
  cols = _window(min(p[0], q[0]) - half, max(p[0], q[0]) + half, resolution)
  c = pixel_centres(resolution)
  out[rows, cols] = _segment_dist2(c[cols][None, :], c[rows][:, None], p, q) <= half * half
  return out


def _limb_masks(keypoints_Jx2: np.ndarray, resolution: int):
  half = limb_width(resolution) / (2 * resolution)
  kp = keypoints_Jx2.astype(np.float64)
  for a, b in pose.LIMBS:
    yield _capsule(kp[a], kp[b], half, resolution)


def person_mask(keypoints_Jx2: np.ndarray, resolution: int) -> np.ndarray:
  """Bool RxR mask of the stick figure: limb strokes with round caps and a filled head."""
  out = np.zeros((resolution, resolution), bool)
  for limb in _limb_masks(keypoints_Jx2, resolution):
    out |= limb
  head = keypoints_Jx2[0].astype(np.float64)
  return out | shape_mask('circle', head[0], head[1], pose.head_radius(keypoints_Jx2), resolution)


def skeleton_map(keypoints_Jx2: np.ndarray, resolution: int) -> np.ndarray:
  """uint8 RxR: limb index + 1 on each limb stroke (later limbs on top), 0 elsewhere."""
  out = np.zeros((resolution, resolution), np.uint8)
  for i, limb in enumerate(_limb_masks(keypoints_Jx2, resolution)):
    out[limb] = i + 1
  return out


def joint_disc(point_xy: np.ndarray, resolution: int) -> np.ndarray:
  """Bool RxR: pixel centres within half a limb width of the joint (never empty).

  Lies inside the figure's strokes, so it is what visibility and the keypoint scorer test.
  """
  c = pixel_centres(resolution)
  px, py = float(point_xy[0]), float(point_xy[1])
  half = limb_width(resolution) / (2 * resolution)
  return (c[None, :] - px) ** 2 + (c[:, None] - py) ** 2 <= half * half


def _glyphs(text: str) -> np.ndarray:
  mask = PIL.ImageFont.load_default_imagefont().getmask(text)
  return np.asarray(mask, np.uint8).reshape(mask.size[::-1]) > 0


@functools.cache
def text_bitmap(word: str) -> np.ndarray:
  """Bool HxW glyphs of `word` in PIL's built-in bitmap font, with a 1-pixel margin.

  The font ships inside Pillow, so nothing is downloaded. Rows are cropped to the
  capitals' height (6 pixels), columns to the word's ink.
  """
  rows = np.flatnonzero(_glyphs('ABCDEFGHIJKLMNOPQRSTUVWXYZ').any(axis=1))
  ink = _glyphs(word)[rows[0]:rows[-1] + 1]
  cols = np.flatnonzero(ink.any(axis=0))
  return np.pad(ink[:, cols[0]:cols[-1] + 1], 1)


def sign_masks(box: np.ndarray, word: str, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """Bool RxR (board, text) of a sign with `box` = (ymin, xmin, ymax, xmax).

  The glyph bitmap is stretched over the board by nearest neighbour, so text is legible
  only where the board spans more pixels than the bitmap (about R >= 96 for four letters).
  """
  ymin, xmin, ymax, xmax = (float(b) for b in box)
  c = pixel_centres(resolution)
  in_x, in_y = (c >= xmin) & (c < xmax), (c >= ymin) & (c < ymax)
  board = in_y[:, None] & in_x[None, :]
  glyphs = text_bitmap(word)
  h, w = glyphs.shape
  gx = np.clip(np.floor((c - xmin) / (xmax - xmin) * w).astype(int), 0, w - 1)
  gy = np.clip(np.floor((c - ymin) / (ymax - ymin) * h).astype(int), 0, h - 1)
  return board, board & glyphs[gy[:, None], gx[None, :]]
