"""Renders a scene at a resolution: the image and every map, from one painter's pass.

Entities are painted far to near, each pixel taking the colour, instance id, semantic
class and depth of the nearest entity covering it, so the maps agree with the pixels by
construction: nearer entities have smaller depth and the visible one is the nearest.
"""

import dataclasses

import numpy as np

from data.shapes import geometry
from data.shapes import grammar
from data.shapes import pose


@dataclasses.dataclass(frozen=True)
class Entity:
  """A figure to paint: instance id, depth, full (unoccluded) mask, class and colours."""

  instance: int
  depth: int
  mask: np.ndarray
  semantic: int
  rgb: tuple[int, int, int]
  ink: np.ndarray | None = None  # Sign text pixels, painted TEXT_RGB over the board.


@dataclasses.dataclass(frozen=True)
class Layers:
  """A rendered scene. Maps are uint8 RxR; visibility is COCO-style (0 none, 1 hidden, 2 seen)."""

  image: np.ndarray
  semantic: np.ndarray
  instance: np.ndarray
  depth: np.ndarray
  skeleton: np.ndarray
  visibility: np.ndarray
  boxes: np.ndarray  # Objects' full-mask boxes (ymin, xmin, ymax, xmax) in [0, 1], float32.


def entities(scene: grammar.Scene, resolution: int) -> list[Entity]:
  """The scene's figures at `resolution`, in object order, then the sign, then the person."""
  out = [
      Entity(k + 1, o.depth, geometry.shape_mask(o.shape, o.x, o.y, o.radius, resolution),
             1 + grammar.SHAPES.index(o.shape), o.rgb)
      for k, o in enumerate(scene.objects)]
  if scene.sign is not None:
    board, ink = geometry.sign_masks(np.asarray(scene.sign.box), scene.sign.word, resolution)
    out.append(Entity(grammar.SIGN_INSTANCE, scene.sign.depth, board, grammar.SIGN_CLASS,
                      grammar.BOARD_RGB, ink))
  if scene.person is not None:
    out.append(Entity(grammar.PERSON_INSTANCE, scene.person.depth,
                      geometry.person_mask(scene.person.array(), resolution),
                      grammar.PERSON_CLASS, grammar.PERSON_RGB))
  return out


def instance_map(ents: list[Entity], resolution: int) -> np.ndarray:
  """uint8 RxR id of the visible (nearest) entity at each pixel; 0 for background."""
  out = np.zeros((resolution, resolution), np.uint8)
  for e in sorted(ents, key=lambda e: -e.depth):
    out[e.mask] = e.instance
  return out


def background(bg: grammar.Background, resolution: int) -> np.ndarray:
  """uint8 RxRx3 grey background."""
  c = geometry.pixel_centres(resolution)
  x, y = c[None, :], c[:, None]
  if bg.kind == 'plain':
    band = np.zeros((resolution, resolution), int)
  elif bg.kind == 'stripes':
    t = (y, x, (x + y) * np.sqrt(0.5))[bg.orientation]
    band = np.broadcast_to(np.floor(t / bg.period).astype(int) % 2, (resolution, resolution))
  else:
    band = (np.floor(x / bg.period) + np.floor(y / bg.period)).astype(int) % 2
  grey = np.asarray(bg.levels, np.uint8)[band]
  return np.repeat(grey[..., None], 3, axis=-1)


def _visibility(person: grammar.Person | None, instance: np.ndarray) -> np.ndarray:
  vis = np.zeros(pose.NUM_JOINTS, np.int32)
  if person is None:
    return vis
  for j, point in enumerate(person.array()):
    seen = instance[geometry.joint_disc(point, instance.shape[0])] == grammar.PERSON_INSTANCE
    vis[j] = 2 if seen.mean() >= 0.5 else 1
  return vis


def _box(mask: np.ndarray) -> np.ndarray:
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  r = mask.shape[0]
  if not rows.size:
    return np.zeros(4, np.float32)
  return np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], np.float32) / np.float32(r)


def render(scene: grammar.Scene, resolution: int) -> Layers:
  """Paints the scene far to near and returns the image with its maps."""
  ents = entities(scene, resolution)
  image = background(scene.background, resolution)
  shape2 = (resolution, resolution)
  semantic, instance = np.zeros(shape2, np.uint8), np.zeros(shape2, np.uint8)
  depth = np.full(shape2, grammar.BACKGROUND_DEPTH, np.uint8)
  for e in sorted(ents, key=lambda e: -e.depth):
    image[e.mask] = e.rgb
    if e.ink is not None:
      image[e.ink] = grammar.TEXT_RGB
    semantic[e.mask], instance[e.mask], depth[e.mask] = e.semantic, e.instance, e.depth
  skeleton = np.zeros(shape2, np.uint8)
  if scene.person is not None:
    skeleton = geometry.skeleton_map(scene.person.array(), resolution)
  boxes = np.zeros((0, 4), np.float32)
  if scene.objects:
    boxes = np.stack([_box(e.mask) for e in ents[:len(scene.objects)]])
  visibility = _visibility(scene.person, instance)
  return Layers(image, semantic, instance, depth, skeleton, visibility, boxes)
