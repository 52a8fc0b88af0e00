"""One example of the shapes dataset as a pure function of (spec, split, index).

Every example draws from its own seed (spec.seed, split, stream, index), so examples can
be generated in any order or in parallel and always come out the same. Caption noise
(train only) gives a fixed fraction of examples the captions, questions and answers of
another train example: round(caption_noise * num_train) examples, chosen by a seeded
permutation, each taking the language of the next one in that permutation (cyclically).
"""

import dataclasses
import functools
import io

import numpy as np
import PIL.Image

from data.shapes import captions
from data.shapes import grammar
from data.shapes import pose
from data.shapes import questions
from data.shapes import relations
from data.shapes import render
from data.shapes import sampling

SPLITS = ('train', 'validation', 'test', 'held_out')
MIN_RESOLUTION = 16
_SCENE, _LANGUAGE, _NOISE = 0, 1, 2  # Random streams.


@dataclasses.dataclass(frozen=True)
class GenSpec:
  """Everything that determines the dataset's content."""

  resolution: int = 64
  sizes: tuple[int, int, int, int] = (10_000, 1_000, 1_000, 1_000)  # In SPLITS order.
  seed: int = 0
  caption_noise: float = 0.0
  scene: grammar.SceneSpec = dataclasses.field(default_factory=grammar.SceneSpec)

  def __post_init__(self):
    r = self.resolution
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or r < MIN_RESOLUTION:
      raise ValueError(f'resolution={r!r} must be an int >= {MIN_RESOLUTION} '
                       '(the configs use 32, 64, 128, 256).')
    if len(self.sizes) != len(SPLITS) or any(int(n) < 0 for n in self.sizes) or not any(self.sizes):
      raise ValueError(f'sizes={self.sizes!r} must be {len(SPLITS)} non-negative example counts '
                       f'for {SPLITS}, not all zero.')
    if not 0.0 <= self.caption_noise <= 1.0:
      raise ValueError(f'caption_noise={self.caption_noise} must be a fraction in [0, 1].')
    if self.size('held_out') and not self.scene.held_out_pairs():
      raise ValueError(f'held_out needs one of {grammar.HELD_OUT_PAIRS}, but '
                       f'shapes={self.scene.shapes} and colours={self.scene.colours} allow none; '
                       'set its size to 0.')

  def size(self, split: str) -> int:
    """Number of examples in `split`."""
    return int(self.sizes[SPLITS.index(split)])


def _rng(spec: GenSpec, split: str, stream: int, index: int = 0) -> np.random.Generator:
  return np.random.default_rng([spec.seed, SPLITS.index(split), stream, index])


def make_scene(spec: GenSpec, split: str, index: int) -> grammar.Scene:
  """The scene of example `index` of `split`."""
  return sampling.sample_scene(_rng(spec, split, _SCENE, index), spec.scene,
                               held_out=split == 'held_out')


def language(spec: GenSpec, split: str, index: int, scene: grammar.Scene) -> dict[str, list[str]]:
  """Clean captions, questions, answers and question types of example `index`."""
  facts = relations.Facts(scene)
  rng = _rng(spec, split, _LANGUAGE, index)
  caps = captions.captions(facts, rng)
  qs, answers, types = questions.questions(facts, rng, spec.scene, split == 'held_out')
  return {'captions': caps, 'questions': qs, 'answers': answers, 'question_types': types}


@functools.lru_cache(maxsize=8)
def noise_donors(spec: GenSpec) -> dict[int, int]:
  """Train index -> the train index whose language it carries, for the noisy examples."""
  n = spec.size('train')
  m = round(spec.caption_noise * n)
  if m == 0 or n < 2:
    return {}
  perm = _rng(spec, 'train', _NOISE).permutation(n).tolist()
  if m == 1:
    return {perm[0]: perm[1]}
  return {perm[k]: perm[(k + 1) % m] for k in range(m)}


def make_example(spec: GenSpec, split: str, index: int) -> dict:
  """Example `index` of `split` as numpy arrays and Python strings (image not yet encoded)."""
  if not 0 <= index < spec.size(split):
    raise ValueError(f'index={index} is outside {split!r} (size {spec.size(split)}).')
  scene = make_scene(spec, split, index)
  layers = render.render(scene, spec.resolution)
  donor = noise_donors(spec).get(index) if split == 'train' else None
  if donor is None:
    lang = language(spec, split, index, scene)
  else:
    lang = language(spec, split, donor, make_scene(spec, split, donor))
  return {'image': layers.image, 'label': scene.label(), 'shape_colour': scene.shape_colour(),
          **lang,
          'language_swapped': donor is not None, **_scene_features(scene, layers)}


def _scene_features(scene: grammar.Scene, layers: render.Layers) -> dict:
  objs = scene.objects
  depths = np.array([o.depth for o in objs], np.int32)
  person, sign = scene.person, scene.sign
  return {
      'objects': {
          'shape': [o.shape for o in objs], 'colour': [o.colour for o in objs],
          'size': [o.size for o in objs],
          'center': np.array([(o.x, o.y) for o in objs], np.float32).reshape(-1, 2),
          'box': layers.boxes, 'depth': depths,
          'depth_order': np.argsort(np.argsort(depths)).astype(np.int32),
      },
      'background': scene.background.kind,
      'semantic_mask': layers.semantic, 'instance_mask': layers.instance,
      'depth': layers.depth, 'skeleton': layers.skeleton,
      'pose_keypoints': person.array() if person else np.zeros((pose.NUM_JOINTS, 2), np.float32),
      'pose_visibility': layers.visibility,
      'person_depth': np.int32(person.depth if person else -1),
      'sign_box': np.asarray(sign.box if sign else (0.0,) * 4, np.float32),
      'sign_depth': np.int32(sign.depth if sign else -1),
      'word': sign.word if sign else '',
  }


def png_bytes(image_HxWx3: np.ndarray) -> bytes:
  """PNG-encodes with PIL: TFDS would need TensorFlow to encode a numpy image itself."""
  buf = io.BytesIO()
  PIL.Image.fromarray(image_HxWx3).save(buf, format='png')
  return buf.getvalue()


def tfds_example(spec: GenSpec, split: str, index: int) -> dict:
  """`make_example` with the image PNG-encoded, ready for the TFDS builder."""
  example = make_example(spec, split, index)
  example['image'] = png_bytes(example['image'])
  return example


def _name(value, names) -> str:
  """A class name from a ClassLabel int, bytes or str."""
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, str):
    return value
  return names[int(value)]


def scene_from_example(example: dict) -> grammar.Scene:
  """Rebuilds the scene from an example's labels (raw or decoded by TFDS).

  Everything but the background's greys is restored exactly, so the figures re-render
  to the stored pixels at any resolution.
  """
  o = example['objects']
  centres = np.asarray(o['center'], np.float32).reshape(-1, 2)
  objects = tuple(
      grammar.Obj(_name(s, grammar.SHAPES), _name(c, grammar.COLOUR_NAMES),
                  _name(z, grammar.SIZES), float(xy[0]), float(xy[1]), int(d))
      for s, c, z, xy, d in zip(o['shape'], o['colour'], o['size'], centres, o['depth']))
  person = None
  if np.asarray(example['pose_visibility']).any():
    kp = np.asarray(example['pose_keypoints'], np.float32)
    person = grammar.Person(tuple((float(x), float(y)) for x, y in kp),
                            int(example['person_depth']))
  word = _name(example['word'], ())
  sign = None
  if word:
    sign = grammar.Sign(tuple(float(v) for v in np.asarray(example['sign_box'], np.float32)), word,
                        int(example['sign_depth']))
  kind = _name(example['background'], grammar.BACKGROUNDS)
  background = grammar.Background(kind, (grammar.GREY_RANGE[0],) * 2)
  return grammar.Scene(objects, person, sign, background)
