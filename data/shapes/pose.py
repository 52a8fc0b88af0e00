"""Stick-figure poses: 13 joints, 12 limbs, sampled from joint angles.

Keypoints are (x, y) in [0, 1] image coordinates, y pointing down. The figure faces the
viewer, so its left side is on the image's right (the COCO convention).
"""

import numpy as np

JOINTS = (
    'head', 'neck', 'left_shoulder', 'left_elbow', 'left_wrist', 'right_shoulder',
    'right_elbow', 'right_wrist', 'pelvis', 'left_knee', 'left_ankle', 'right_knee',
    'right_ankle',
)
LIMBS = (
    (0, 1), (1, 2), (2, 3), (3, 4), (1, 5), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (8, 11), (11, 12),
)
NUM_JOINTS = len(JOINTS)
HEAD_RADIUS = 0.1  # Of the figure's height parameter.
_MARGIN = 0.03  # Kept free around the figure, in image units.
# Segment lengths as fractions of the height parameter.
_TORSO, _NECK, _SHOULDER, _UPPER_ARM, _FOREARM, _THIGH, _SHIN = (
    0.32, 0.12, 0.09, 0.16, 0.15, 0.25, 0.24)


def _dir(angle: float) -> np.ndarray:
  """Unit vector `angle` radians from straight down, positive towards the image's right."""
  return np.array([np.sin(angle), np.cos(angle)])


def _limb_pair(joint: np.ndarray, angle: float, bend: float, l1: float, l2: float, side: float):
  """Middle and end joints of a two-segment limb hanging from `joint` on `side` (+1 right)."""
  mid = joint + l1 * _dir(side * angle)
  return mid, mid + l2 * _dir(side * (angle + bend))


def sample_keypoints(rng: np.random.Generator) -> np.ndarray:
  """A random pose placed inside the image: 13x2 float32 (x, y).

  Arm angles go from hanging (0) to raised (~pi); legs spread and knees bend mildly.
  """
  h = rng.uniform(0.45, 0.62)
  lean = rng.uniform(-0.25, 0.25)
  pelvis = np.zeros(2)
  neck = pelvis + _TORSO * h * _dir(np.pi + lean)
  head = neck + _NECK * h * _dir(np.pi + lean + rng.uniform(-0.3, 0.3))
  across = np.array([np.cos(lean), -np.sin(lean)])
  kp = {'head': head, 'neck': neck, 'pelvis': pelvis}
  for name, side in (('left', 1.0), ('right', -1.0)):
    shoulder = neck + side * _SHOULDER * h * across
    elbow, wrist = _limb_pair(shoulder, rng.uniform(0.1, 2.9), rng.uniform(-1.2, 1.2),
                              _UPPER_ARM * h, _FOREARM * h, side)
    knee, ankle = _limb_pair(pelvis, rng.uniform(0.05, 0.5), rng.uniform(-0.4, 0.3),
                             _THIGH * h, _SHIN * h, side)
    kp.update({f'{name}_shoulder': shoulder, f'{name}_elbow': elbow, f'{name}_wrist': wrist,
               f'{name}_knee': knee, f'{name}_ankle': ankle})
  pts_Jx2 = np.stack([kp[j] for j in JOINTS])
  pad = HEAD_RADIUS * h + _MARGIN
  lo, hi = pts_Jx2.min(0) - pad, pts_Jx2.max(0) + pad
  offset = rng.uniform(-lo, 1.0 - hi)
  return (pts_Jx2 + offset).astype(np.float32)


def head_radius(keypoints_Jx2: np.ndarray) -> float:
  """Head radius recovered from the keypoints (the neck-head distance sets the scale)."""
  neck_to_head = float(np.linalg.norm(keypoints_Jx2[0].astype(np.float64) - keypoints_Jx2[1]))
  return HEAD_RADIUS * neck_to_head / _NECK


def raised_arms(keypoints_Jx2: np.ndarray) -> int:
  """How many arms are raised: wrists above (smaller y than) their shoulders."""
  kp = keypoints_Jx2
  return int(kp[4, 1] < kp[2, 1]) + int(kp[7, 1] < kp[5, 1])
