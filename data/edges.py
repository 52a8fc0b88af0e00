"""Canny edge maps of any image, computed on the fly (the ControlNet 'canny' condition).

`canny` follows OpenCV's `cv2.Canny(image, low, high)` as ControlNet's annotator calls it
(100, 200): no pre-blur, 3x3 Sobel gradients, L1 magnitude |gx| + |gy|, non-maximum
suppression along the gradient direction quantised to 0/45/90/135 degrees, then hysteresis:
pixels above `high` are edges, pixels above `low` are edges when 8-connected to one.
Colour images are reduced to luminance first (ITU-R BT.601, as `cv2.cvtColor`).
"""

import numpy as np
from scipy import ndimage

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_TAN_22_5 = np.tan(np.pi / 8)


def _grey(image):
  image = np.asarray(image, np.float32)
  if image.ndim == 3 and image.shape[-1] == 3:
    return np.round(image @ LUMA)  # cv2.cvtColor rounds to uint8 before Canny.
  if image.ndim == 3 and image.shape[-1] == 1:
    return image[..., 0]
  if image.ndim == 2:
    return image
  raise ValueError(f'canny takes an HxW, HxWx1 or HxWx3 image, got shape {image.shape}')


def canny(image, low=100.0, high=200.0):
  """HxW uint8 edge map (255 = edge, 0 = none) of an image with values in [0, 255]."""
  if not 0 <= low <= high:
    raise ValueError(f'canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}')
  grey = _grey(image)
  gx = ndimage.sobel(grey, axis=1, mode='nearest')
  gy = ndimage.sobel(grey, axis=0, mode='nearest')
  mag = np.abs(gx) + np.abs(gy)
  padded = np.pad(mag, 1)
  h, w = mag.shape

  def shifted(dy, dx):
    return padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

  ax, ay = np.abs(gx), np.abs(gy)
  horizontal = ay < _TAN_22_5 * ax  # The gradient points along x: compare left and right.
  vertical = ax < _TAN_22_5 * ay
  diagonal_same_sign = (gx * gy) > 0  # y grows downwards: same signs point down-right.
  n1 = np.where(horizontal, shifted(0, -1), np.where(
      vertical, shifted(-1, 0), np.where(diagonal_same_sign, shifted(-1, -1), shifted(-1, 1))))
  n2 = np.where(horizontal, shifted(0, 1), np.where(
      vertical, shifted(1, 0), np.where(diagonal_same_sign, shifted(1, 1), shifted(1, -1))))
  # OpenCV's test: > one neighbour and >= the other (keeps one pixel of a two-pixel plateau),
  # strictly greater than both on the diagonals.
  diagonal = ~horizontal & ~vertical
  peak = (mag > low) & (mag > n1) & np.where(diagonal, mag > n2, mag >= n2)
  strong = peak & (mag > high)
  regions, count = ndimage.label(peak, structure=np.ones((3, 3), bool))
  keep = np.zeros(count + 1, bool)
  keep[np.unique(regions[strong])] = True
  keep[0] = False
  return np.where(keep[regions], 255, 0).astype(np.uint8)
