"""Scene grammar: the vocabularies, the scene description and its checks.

A scene is resolution-free: centres, keypoints and boxes are in [0, 1] image units and
stored as float32-exact Python floats, so a scene rebuilt from an example's float32
labels renders to the same pixels at any resolution.
"""

import dataclasses

import numpy as np

from data.shapes import geometry

SHAPES = geometry.SHAPES
# Saturated colours, pairwise >= ~100 apart in RGB and far from every grey, so the
# nearest palette colour of a pixel names its object unambiguously.
COLOURS = {
    'red': (230, 25, 25), 'green': (30, 170, 40), 'blue': (30, 60, 230),
    'yellow': (245, 220, 30), 'purple': (130, 40, 190), 'orange': (250, 120, 0),
    'cyan': (30, 210, 220), 'pink': (240, 80, 200),
}
COLOUR_NAMES = tuple(COLOURS)
# Class names of the (shape, colour) label: shape-major, 'red circle', 'green circle', ...
SHAPE_COLOURS = tuple(f'{c} {s}' for s in SHAPES for c in COLOUR_NAMES)
SIZES = ('small', 'medium', 'large')
SIZE_RADIUS = {'small': 0.1, 'medium': 0.14, 'large': 0.19}
BACKGROUNDS = ('plain', 'stripes', 'checker')
# Backgrounds are greys (r == g == b) in this range: never confusable with the palette,
# the person (dark), the sign board (white) or its text (black).
GREY_RANGE = (150, 220)
PERSON_RGB = (40, 40, 40)
BOARD_RGB = (255, 255, 255)
TEXT_RGB = (0, 0, 0)
# Compositions never seen in train/validation/test; every held_out example shows one.
HELD_OUT_PAIRS = (
    ('triangle', 'green'), ('star', 'blue'), ('heart', 'yellow'), ('square', 'purple'))
WORDS = ('GO', 'HI', 'STOP', 'ZOO', 'JAX', 'CAT', 'DOG', 'SUN', 'BUS', 'MAP', 'OPEN', 'EXIT',
         'TREE', 'FISH', 'BIRD', 'CAKE')
MAX_OBJECTS = 4
# Instance ids: object k of `Scene.objects` is k + 1; the sign and the person follow.
SIGN_INSTANCE, PERSON_INSTANCE = MAX_OBJECTS + 1, MAX_OBJECTS + 2
SEMANTIC_CLASSES = ('background', *SHAPES, 'sign', 'person')
SIGN_CLASS, PERSON_CLASS = len(SHAPES) + 1, len(SHAPES) + 2
# Depth map values: nearer is smaller; entities take distinct levels, the background is 255.
DEPTH_LEVELS = tuple(range(16, 240, 8))
BACKGROUND_DEPTH = 255


def f32(value: float) -> float:
  """`value` rounded to float32, as a Python float (what a stored label reads back as)."""
  return float(np.float32(value))


@dataclasses.dataclass(frozen=True)
class Obj:
  """One shape: attributes, centre (x, y) and depth level."""

  shape: str
  colour: str
  size: str
  x: float
  y: float
  depth: int

  @property
  def radius(self) -> float:
    """Radius of the circle the shape fits in, in image units."""
    return SIZE_RADIUS[self.size]

  @property
  def rgb(self) -> tuple[int, int, int]:
    """The palette colour."""
    return COLOURS[self.colour]

  def phrase(self, article: str = 'the', size: bool = False) -> str:
    """'the red circle' or, with size and article 'a', 'a large red circle'."""
    words = [self.size, self.colour, self.shape] if size else [self.colour, self.shape]
    return with_article(article, ' '.join(words))


@dataclasses.dataclass(frozen=True)
class Person:
  """A stick figure: 13 (x, y) keypoints in `pose.JOINTS` order, at one depth level."""

  keypoints: tuple[tuple[float, float], ...]
  depth: int

  def array(self) -> np.ndarray:
    """Keypoints as a 13x2 float32 array."""
    return np.asarray(self.keypoints, np.float32)


@dataclasses.dataclass(frozen=True)
class Sign:
  """A white board with a black word; box = (ymin, xmin, ymax, xmax)."""

  box: tuple[float, float, float, float]
  word: str
  depth: int


@dataclasses.dataclass(frozen=True)
class Background:
  """Grey background: 'plain' (levels[0]), 'stripes' or 'checker' alternating two levels."""

  kind: str
  levels: tuple[int, int]
  period: float = 0.1
  orientation: int = 0  # Stripes: 0 horizontal, 1 vertical, 2 diagonal.


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects (distinct colours), an optional person and sign, and the background."""

  objects: tuple[Obj, ...]
  person: Person | None
  sign: Sign | None
  background: Background

  def subject(self) -> Obj:
    """The largest object, the nearest among equals: its shape is the example's label."""
    return min(self.objects, key=lambda o: (-SIZES.index(o.size), o.depth))

  def label(self) -> int:
    """Index into SHAPES of the subject's shape."""
    return SHAPES.index(self.subject().shape)

  def shape_colour(self) -> int:
    """Index into SHAPE_COLOURS of the subject's (shape, colour)."""
    subject = self.subject()
    return SHAPES.index(subject.shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(subject.colour)


@dataclasses.dataclass(frozen=True)
class SceneSpec:
  """What scenes may contain: shapes, colours, backgrounds, object count, person and sign odds."""

  shapes: tuple[str, ...] = SHAPES
  colours: tuple[str, ...] = COLOUR_NAMES
  p_person: float = 0.4
  p_sign: float = 0.4
  max_objects: int = MAX_OBJECTS
  backgrounds: tuple[str, ...] = BACKGROUNDS

  def __post_init__(self):
    check_names('shapes', self.shapes, SHAPES)
    check_names('colours', self.colours, COLOUR_NAMES)
    check_names('backgrounds', self.backgrounds, BACKGROUNDS)
    if not 1 <= self.max_objects <= MAX_OBJECTS:
      raise ValueError(f'max_objects={self.max_objects} must be in [1, {MAX_OBJECTS}].')
    for key in ('p_person', 'p_sign'):
      if not 0.0 <= getattr(self, key) <= 1.0:
        raise ValueError(f'{key}={getattr(self, key)} must be in [0, 1].')
    if not self.seen_pairs():
      raise ValueError(f'shapes={self.shapes} x colours={self.colours} are all held out '
                       f'({HELD_OUT_PAIRS}); train would be empty.')

  def seen_pairs(self) -> list[tuple[str, str]]:
    """(shape, colour) pairs that train/validation/test may show."""
    return [(s, c) for s in self.shapes for c in self.colours if (s, c) not in HELD_OUT_PAIRS]

  def held_out_pairs(self) -> list[tuple[str, str]]:
    """The held-out pairs these shapes and colours can show."""
    return [(s, c) for s, c in HELD_OUT_PAIRS if s in self.shapes and c in self.colours]


def with_article(article: str, noun_phrase: str) -> str:
  """Prefixes the article, turning 'a' into 'an' before a vowel."""
  if article == 'a' and noun_phrase[0] in 'aeiou':
    article = 'an'
  return f'{article} {noun_phrase}'


def check_names(key: str, names, allowed) -> None:
  """Raises ValueError unless `names` is a non-empty tuple of distinct allowed names."""
  if isinstance(names, str) or not names:
    raise ValueError(f'{key}={names!r} must be a non-empty tuple of names from {list(allowed)}.')
  unknown = [n for n in names if n not in allowed]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f'{key}={tuple(names)!r}: unknown or repeated {unknown or "names"}; '
                     f'allowed: {list(allowed)}.')
