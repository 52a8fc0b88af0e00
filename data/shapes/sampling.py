"""Random scenes: 1-4 objects of distinct colours, maybe a person and a sign, on a grey background.

Placement is rejection-sampled at REF_RESOLUTION so that every object keeps at least half
of its area visible, the person half of its strokes and the sign all of its text; the
check is resolution-free, so one scene serves every resolution.
"""

import numpy as np

from data.shapes import geometry
from data.shapes import grammar
from data.shapes import pose
from data.shapes import render

REF_RESOLUTION = 64
MIN_VISIBLE = 0.5
_TRIES = 25
_SIGN_SCALE = (0.011, 0.016)  # Image units per glyph-bitmap pixel.


def _attributes(rng: np.random.Generator, spec: grammar.SceneSpec, n: int, held_out: bool):
  """n (shape, colour, size) triples, distinct colours; held_out puts a held-out pair first."""
  chosen = []
  if held_out:
    pairs = spec.held_out_pairs()
    chosen.append(pairs[rng.integers(len(pairs))])
  pool = [(s, c) for s in spec.shapes for c in spec.colours] if held_out else spec.seen_pairs()
  while len(chosen) < n:
    used = {c for _, c in chosen}
    free = [p for p in pool if p[1] not in used]
    if not free:
      break
    chosen.append(free[rng.integers(len(free))])
  return [(s, c, grammar.SIZES[rng.integers(len(grammar.SIZES))]) for s, c in chosen]


def _background(rng: np.random.Generator, kinds: tuple[str, ...]) -> grammar.Background:
  kind = kinds[rng.integers(len(kinds))]
  lo, hi = grammar.GREY_RANGE
  a = int(rng.integers(lo, hi + 1))
  contrasting = [g for g in range(lo, hi + 1) if abs(g - a) >= 25]
  b = a if kind == 'plain' else contrasting[rng.integers(len(contrasting))]
  return grammar.Background(kind, (a, b), grammar.f32(rng.uniform(0.06, 0.2)), int(rng.integers(3)))


def _sign(rng: np.random.Generator, word: str, depth: int) -> grammar.Sign:
  h, w = geometry.text_bitmap(word).shape
  scale = rng.uniform(*_SIGN_SCALE)
  bw, bh = w * scale, h * scale
  x0, y0 = rng.uniform(0.02, 0.98 - bw), rng.uniform(0.02, 0.98 - bh)
  box = tuple(grammar.f32(v) for v in (y0, x0, y0 + bh, x0 + bw))
  return grammar.Sign(box, word, depth)


def _place(rng, attrs, has_person: bool, word: str | None, bg) -> grammar.Scene:
  depths = rng.choice(grammar.DEPTH_LEVELS, size=len(attrs) + 2, replace=False).tolist()
  objects = []
  for (shape, colour, size), depth in zip(attrs, depths):
    r = grammar.SIZE_RADIUS[size]
    x, y = rng.uniform(r, 1.0 - r, size=2)
    objects.append(grammar.Obj(shape, colour, size, grammar.f32(x), grammar.f32(y), depth))
  person = None
  if has_person:
    kp = pose.sample_keypoints(rng)
    person = grammar.Person(tuple((float(x), float(y)) for x, y in kp), depths[-2])
  sign = _sign(rng, word, depths[-1]) if word else None
  return grammar.Scene(tuple(objects), person, sign, bg)


def _acceptable(scene: grammar.Scene) -> bool:
  ents = render.entities(scene, REF_RESOLUTION)
  instance = render.instance_map(ents, REF_RESOLUTION)
  for e in ents:
    area = int(e.mask.sum())
    if area == 0 or (instance[e.mask] == e.instance).sum() < MIN_VISIBLE * area:
      return False
    if e.ink is not None and not (instance[e.ink] == e.instance).all():
      return False
  return True


def sample_scene(rng: np.random.Generator, spec: grammar.SceneSpec, *, held_out: bool = False):
  """A random scene; with held_out it contains at least one of HELD_OUT_PAIRS.

  If placement keeps failing, the sign, then the person, then the last object are
  dropped; a lone object always fits, so this terminates.
  """
  n = int(rng.integers(1, spec.max_objects + 1))
  attrs = _attributes(rng, spec, n, held_out)
  bg = _background(rng, spec.backgrounds)
  has_person = bool(rng.random() < spec.p_person)
  word = grammar.WORDS[rng.integers(len(grammar.WORDS))] if rng.random() < spec.p_sign else None
  while True:
    for _ in range(_TRIES):
      scene = _place(rng, attrs, has_person, word, bg)
      if _acceptable(scene):
        order = rng.permutation(len(scene.objects))
        return grammar.Scene(tuple(scene.objects[i] for i in order), scene.person, scene.sign, bg)
    if word:
      word = None
    elif has_person:
      has_person = False
    else:
      attrs = attrs[:-1]
