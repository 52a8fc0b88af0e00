"""Judges an image (e.g. a generated one) against a shapes example's conditions, from pixels alone.

The example's labels are re-rendered at the image's resolution to get each entity's
expected full and visible masks; the image is only read through its pixels' colours:
each pixel is classified to the nearest of the palette colours and a ladder of greys
(greys = no object colour). Checks, each pass/fail:

  colour       most pixels inside an object's expected visible mask have its colour
  shape        IoU >= 0.5 between that mask and the pixels of its colour near the object
               (its box widened by a quarter radius, other entities' pixels excluded)
  position     the centroid of all pixels of its colour lies within 0.08 of the expected one
  mask         IoU >= 0.5 between the expected visible mask and all pixels of its colour
  depth_order  where two objects overlap, most pixels show the nearer object's colour
  keypoints    around each visible joint, most pixels have the person's colour
  sign         >= 80% of the sign's visible pixels show the expected board or text colour

Objects, overlaps and joints with fewer than MIN_PIXELS expected visible pixels are not
judged. `score` returns each criterion's accuracy, the overall accuracy over all checks,
the mean mask IoU and the mean keypoint error (distance from the pixel holding a visible
joint to the nearest person-coloured pixel, in image widths).

`judge_single` judges a one-object image (single32/single64) against a requested (shape,
colour) without an example: its colour, and the shape that best explains that colour's pixels.
"""

import numpy as np

from data.shapes import generate
from data.shapes import geometry
from data.shapes import grammar
from data.shapes import render

CRITERIA = ('colour', 'shape', 'position', 'mask', 'depth_order', 'keypoints', 'sign')
MIN_PIXELS = 4
IOU_THRESHOLD = 0.5
POSITION_TOLERANCE = 0.08
NEUTRAL_TOLERANCE = 40.0  # RGB distance for the person, board and text colours.
SIGN_AGREEMENT = 0.8
_PALETTE_Kx3 = np.array([grammar.COLOURS[c] for c in grammar.COLOUR_NAMES], np.float32)
_GREYS_Gx3 = np.repeat(np.array([0, 32, 64, 96, 128, 160, 192, 224, 255], np.float32)[:, None],
                       3, axis=1)


def classify(image_RxRx3: np.ndarray) -> np.ndarray:
  """int RxR: index into COLOUR_NAMES of each pixel's nearest reference colour, -1 for grey."""
  refs = np.concatenate([_PALETTE_Kx3, _GREYS_Gx3])
  px_Nx3 = image_RxRx3.reshape(-1, 3).astype(np.float32)
  d2_NxK = ((px_Nx3[:, None, :] - refs[None, :, :]) ** 2).sum(-1)
  nearest = d2_NxK.argmin(axis=1)
  return np.where(nearest < len(_PALETTE_Kx3), nearest, -1).reshape(image_RxRx3.shape[:2])


def _near(image_RxRx3: np.ndarray, rgb) -> np.ndarray:
  diff = image_RxRx3.astype(np.float32) - np.asarray(rgb, np.float32)
  return (diff ** 2).sum(-1) <= NEUTRAL_TOLERANCE ** 2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = (a | b).sum()
  return float((a & b).sum() / union) if union else 0.0


def _centroid(mask: np.ndarray) -> np.ndarray:
  rows, cols = np.nonzero(mask)
  return np.array([cols.mean(), rows.mean()]) if rows.size else np.array([np.inf, np.inf])


def _widened_box(mask: np.ndarray, margin: int) -> np.ndarray:
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  out = np.zeros_like(mask)
  if rows.size:
    top, left = max(0, rows[0] - margin), max(0, cols[0] - margin)
    out[top:rows[-1] + margin + 1, left:cols[-1] + margin + 1] = True
  return out


def _object_checks(scene, ents, instance, colour, checks, ious) -> None:
  r = instance.shape[0]
  for k, obj in enumerate(scene.objects):
    visible = instance == k + 1
    if visible.sum() < MIN_PIXELS:
      continue
    c = grammar.COLOUR_NAMES.index(obj.colour)
    painted = colour == c
    counts = np.bincount(colour[visible] + 1, minlength=len(grammar.COLOUR_NAMES) + 1)
    checks['colour'].append(counts.argmax() == c + 1)
    window = _widened_box(ents[k].mask, int(np.ceil(0.25 * obj.radius * r)))
    window &= (instance == 0) | visible
    checks['shape'].append(_iou(painted & window, visible) >= IOU_THRESHOLD)
    offset = np.linalg.norm(_centroid(painted) - _centroid(visible)) / r
    checks['position'].append(offset <= POSITION_TOLERANCE)
    ious.append(_iou(painted, visible))
    checks['mask'].append(ious[-1] >= IOU_THRESHOLD)


def _depth_checks(scene, ents, instance, colour, checks) -> None:
  objs = scene.objects
  for i in range(len(objs)):
    for j in range(i + 1, len(objs)):
      near = i if objs[i].depth < objs[j].depth else j
      region = ents[i].mask & ents[j].mask & (instance == near + 1)
      if region.sum() >= MIN_PIXELS:
        shown = colour[region] == grammar.COLOUR_NAMES.index(objs[near].colour)
        checks['depth_order'].append(shown.mean() > 0.5)


def _keypoint_checks(scene, instance, image, checks, errors) -> None:
  if scene.person is None:
    return
  r = instance.shape[0]
  person_px = _near(image, grammar.PERSON_RGB)
  rows, cols = np.nonzero(person_px)
  for point in scene.person.array():
    disc = geometry.joint_disc(point, r)
    if (instance[disc] == grammar.PERSON_INSTANCE).mean() < 0.5:
      continue  # Occluded: the image need not show it.
    checks['keypoints'].append(person_px[disc].mean() >= 0.5)
    px, py = np.minimum((point * r).astype(int), r - 1)  # The pixel holding the joint.
    dist = np.sqrt((cols - px) ** 2 + (rows - py) ** 2).min() if rows.size else r
    errors.append(min(dist, r) / r)


def _sign_checks(ents, instance, image, checks) -> None:
  for e in ents:
    if e.ink is None:
      continue
    visible = instance == e.instance
    if visible.sum() >= MIN_PIXELS:
      ok = np.where(e.ink, _near(image, grammar.TEXT_RGB), _near(image, grammar.BOARD_RGB))
      checks['sign'].append(ok[visible].mean() >= SIGN_AGREEMENT)


def score(image: np.ndarray, example: dict) -> dict:
  """Per-criterion accuracy (None when nothing was judged), 'overall', 'mean_iou', 'keypoint_error'.

  `image` is uint8 RxRx3 at any R; `example` is a shapes example, raw (`generate`) or
  decoded by TFDS. Also returns 'counts' ((passed, judged) per criterion), 'ious' (per
  judged object) and 'keypoint_errors' (per judged joint), which `aggregate` pools.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[1:] != (image.shape[0], 3):
    raise ValueError(f'image must be uint8 RxRx3, got {image.dtype} {image.shape}; '
                     'map [-1, 1] floats with np.round((x + 1) * 127.5).astype(np.uint8).')
  r = image.shape[0]
  scene = generate.scene_from_example(example)
  ents = render.entities(scene, r)
  instance = render.instance_map(ents, r)
  colour = classify(image)
  checks = {c: [] for c in CRITERIA}
  ious, errors = [], []
  _object_checks(scene, ents, instance, colour, checks, ious)
  _depth_checks(scene, ents, instance, colour, checks)
  _keypoint_checks(scene, instance, image, checks, errors)
  _sign_checks(ents, instance, image, checks)
  counts = {c: (int(sum(v)), len(v)) for c, v in checks.items()}
  return _summary(counts, ious, errors)


def _summary(counts: dict, ious: list, errors: list) -> dict:
  passed, judged = sum(p for p, _ in counts.values()), sum(n for _, n in counts.values())
  out = {c: (p / n if n else None) for c, (p, n) in counts.items()}
  out.update(overall=passed / judged if judged else None, counts=counts,
             mean_iou=float(np.mean(ious)) if ious else None,
             keypoint_error=float(np.mean(errors)) if errors else None,
             ious=[float(i) for i in ious], keypoint_errors=[float(e) for e in errors])
  return out


def aggregate(scores: list[dict]) -> dict:
  """Pools many `score` results: accuracies over all their checks, means over all objects/joints."""
  counts = {c: (sum(s['counts'][c][0] for s in scores), sum(s['counts'][c][1] for s in scores))
            for c in CRITERIA}
  out = _summary(counts, [i for s in scores for i in s['ious']],
                 [e for s in scores for e in s['keypoint_errors']])
  del out['ious'], out['keypoint_errors']
  return dict(out, examples=len(scores))


# Single-object judging (`judge_single`): each shape's centroid in units of its radius,
# measured once on a fine render, turns a colour mask's centroid into the centre at
# which that shape, at each of the dataset's sizes, would paint it; a sub-pixel search around
# it absorbs aliasing. Sizes stay the discrete SIZE_RADIUS: with free radii small shapes are
# ambiguous at 32x32 (a 5x5 block is a small square and also a circle of radius 2.9 pixels).
_FIT_RESOLUTION = 512
_FIT_SHIFTS = np.linspace(-0.5, 0.5, 7)  # Pixels.
_FIT_RADII = np.array(sorted(grammar.SIZE_RADIUS.values()))


def _unit_centroid(shape: str) -> tuple[float, float]:
  """Centroid (u, v) of `shape`, in radii from its centre."""
  mask = geometry.shape_mask(shape, 0.5, 0.5, 0.5, _FIT_RESOLUTION)
  rows, cols = np.nonzero(mask)
  scale = 0.5 * _FIT_RESOLUTION  # Pixels per radius.
  return (((cols + 0.5).mean() - 0.5 * _FIT_RESOLUTION) / scale,
          ((rows + 0.5).mean() - 0.5 * _FIT_RESOLUTION) / scale)


_UNIT_CENTROIDS = {s: _unit_centroid(s) for s in geometry.SHAPES}


def _best_fit(mask: np.ndarray, shape: str) -> float:
  """Best IoU with `mask` of `shape` at each size, placed around the mask's centroid.

  All K candidate placements are rasterised at once on a window that holds the mask and
  every candidate, so each IoU is exact.
  """
  r = mask.shape[0]
  cu, cv = _UNIT_CENTROIDS[shape]
  rows, cols = np.nonzero(mask)
  cx, cy = (cols + 0.5).mean() / r, (rows + 0.5).mean() / r
  n = _FIT_SHIFTS.size
  rad_K = np.repeat(_FIT_RADII, n * n)
  x_K = cx - cu * rad_K + np.tile(np.repeat(_FIT_SHIFTS, n), _FIT_RADII.size) / r
  y_K = cy - cv * rad_K + np.tile(_FIT_SHIFTS, n * _FIT_RADII.size) / r
  reach = _FIT_RADII.max()
  win_rows = geometry._window(min(rows.min() / r, y_K.min() - reach),
                              max((rows.max() + 1) / r, y_K.max() + reach), r)
  win_cols = geometry._window(min(cols.min() / r, x_K.min() - reach),
                              max((cols.max() + 1) / r, x_K.max() + reach), r)
  c = geometry.pixel_centres(r)
  u_Kx1xW = (c[win_cols][None, None, :] - x_K[:, None, None]) / rad_K[:, None, None]
  v_KxHx1 = (c[win_rows][None, :, None] - y_K[:, None, None]) / rad_K[:, None, None]
  fit_KxHxW = geometry._in_unit_shape(shape, u_Kx1xW, v_KxHx1)
  inter_K = (fit_KxHxW & mask[win_rows, win_cols]).sum(axis=(1, 2))
  union_K = fit_KxHxW.sum(axis=(1, 2)) + rows.size - inter_K
  return float((inter_K / union_K).max())


def judge_single(image_RxRx3: np.ndarray, shape: str, colour: str) -> dict:
  """Judges a one-object image against the requested (shape, colour), from its pixels alone.

  The predicted colour is the most frequent palette colour among non-grey pixels (`classify`);
  the predicted shape is the one whose render, at one of the dataset's three sizes and placed
  at that colour's centroid (then searched over sub-pixel shifts), has the best IoU with it.
  Returns {'colour': bool, 'shape': bool, 'predicted_colour': str, 'predicted_shape': str,
  'iou': float}; an image without palette pixels predicts '' for both and fails both.
  """
  image = np.asarray(image_RxRx3)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[1:] != (image.shape[0], 3):
    raise ValueError(f'image must be uint8 RxRx3, got {image.dtype} {image.shape}')
  if shape not in grammar.SHAPES or colour not in grammar.COLOUR_NAMES:
    raise ValueError(f'shape={shape!r} / colour={colour!r} must be one of {grammar.SHAPES} / '
                     f'{grammar.COLOUR_NAMES}')
  labels = classify(image)
  counts = np.bincount(labels[labels >= 0], minlength=len(grammar.COLOUR_NAMES))
  if not counts.any():
    return dict(colour=False, shape=False, predicted_colour='', predicted_shape='', iou=0.0)
  c = int(counts.argmax())
  mask = labels == c
  ious = {s: _best_fit(mask, s) for s in grammar.SHAPES}
  predicted = max(ious, key=ious.get)
  return dict(colour=grammar.COLOUR_NAMES[c] == colour, shape=predicted == shape,
              predicted_colour=grammar.COLOUR_NAMES[c], predicted_shape=predicted,
              iou=ious[predicted])
