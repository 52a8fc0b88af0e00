"""Spatial, size and depth relations between a scene's objects, with an ambiguity margin.

'a left of b' holds when a's centre is more than MARGIN left of b's; it is clearly false
when a's centre is not left of b's at all; in between it is ambiguous and language never
states or asks it. 'a in front of b' means a occludes b: their full shapes overlap by at
least MIN_OVERLAP pixels at REF_RESOLUTION and a is nearer.
"""

import numpy as np

from data.shapes import grammar
from data.shapes import render
from data.shapes import sampling

MARGIN = 0.08
MIN_OVERLAP = 8
RELATIONS = ('left of', 'right of', 'above', 'below', 'bigger than', 'smaller than',
             'in front of', 'behind')
INVERSE = {'left of': 'right of', 'right of': 'left of', 'above': 'below', 'below': 'above',
           'bigger than': 'smaller than', 'smaller than': 'bigger than',
           'in front of': 'behind', 'behind': 'in front of'}


def overlaps(scene: grammar.Scene) -> np.ndarray:
  """Bool NxN: objects i and j overlap by >= MIN_OVERLAP pixels at REF_RESOLUTION."""
  masks = [e.mask for e in render.entities(scene, sampling.REF_RESOLUTION)[:len(scene.objects)]]
  n = len(masks)
  out = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(i + 1, n):
      out[i, j] = out[j, i] = (masks[i] & masks[j]).sum() >= MIN_OVERLAP
  return out


class Facts:
  """Relation truth values for one scene's objects (indices into scene.objects)."""

  def __init__(self, scene: grammar.Scene):
    self.scene = scene
    self.objects = scene.objects
    self.overlap = overlaps(scene)

  def _signed(self, i: int, rel: str, j: int) -> float:
    """How far i is past j in the relation's direction (> MARGIN: holds; <= 0: clearly not)."""
    a, b = self.objects[i], self.objects[j]
    return {'left of': b.x - a.x, 'right of': a.x - b.x,
            'above': b.y - a.y, 'below': a.y - b.y}[rel]

  def holds(self, i: int, rel: str, j: int) -> bool:
    """Whether 'object i <rel> object j' is true and unambiguous."""
    a, b = self.objects[i], self.objects[j]
    if rel in ('bigger than', 'smaller than'):
      d = grammar.SIZES.index(a.size) - grammar.SIZES.index(b.size)
      return d > 0 if rel == 'bigger than' else d < 0
    if rel in ('in front of', 'behind'):
      nearer = a.depth < b.depth if rel == 'in front of' else a.depth > b.depth
      return bool(self.overlap[i, j]) and nearer
    return self._signed(i, rel, j) > MARGIN

  def clearly_not(self, i: int, rel: str, j: int) -> bool:
    """Whether 'object i <rel> object j' is unambiguously false."""
    if rel in ('left of', 'right of', 'above', 'below'):
      return self._signed(i, rel, j) <= 0.0
    return not self.holds(i, rel, j)

  def true_relations(self) -> list[tuple[int, str, int]]:
    """Every unambiguous true (i, rel, j) with i != j."""
    n = len(self.objects)
    return [(i, rel, j) for i in range(n) for j in range(n) if i != j
            for rel in RELATIONS if self.holds(i, rel, j)]

  def unique_partner(self, rel: str, anchor: int) -> int | None:
    """The one object that is <rel> the anchor, when every other object clearly is not."""
    others = [k for k in range(len(self.objects)) if k != anchor]
    hits = [k for k in others if self.holds(k, rel, anchor)]
    if len(hits) == 1 and all(self.clearly_not(k, rel, anchor) for k in others if k != hits[0]):
      return hits[0]
    return None
