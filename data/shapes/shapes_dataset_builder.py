"""TFDS builder `shapes`: procedural multimodal scenes with exact ground truth.

Splits: train, validation, test and held_out (compositions in grammar.HELD_OUT_PAIRS,
never shown by the other three). Configs res32/res64/res128/res256 hold 10,000 / 1,000 /
1,000 / 1,000 examples (res32_50k: res32 with 50,000 train scenes), tiny32/tiny64 512 / 64 /
64 / 64 for smoke runs and tests;
single32/single64 (and tinysingle32) draw one object on a plain background, for
class-conditional generation by the 64-way 'shape_colour' label. A custom
`ShapesConfig(name=..., resolution=..., num_train=...)` changes sizes, seed, caption noise,
or the allowed shapes and colours.

Build with `python -m data.build shapes --config res64`, or with
`tfds build data/shapes --config res64 --file_format array_record` after
`pip install -e '.[tfds]'` (the tfds CLI imports TensorFlow; zoo never does). Records are
re-serialised with sorted map keys, so a rebuild with the same config writes byte-identical
files, whichever of the two paths builds them.
"""

import dataclasses
import functools
import multiprocessing
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import writer as writer_lib
from tensorflow_datasets.proto import tf_example_pb2

from data.shapes import generate
from data.shapes import grammar
from data.shapes import pose
from data.shapes import questions

RESOLUTIONS = (32, 64, 128, 256)
# Mismatched-pair fractions (percent) of the res32_noise<p> configs.
CAPTION_NOISE_PERCENT = (10, 30, 50)
# Below this many examples a split is generated in-process: starting worker processes
# (each imports the `data` package) costs more than it saves.
MIN_PARALLEL = 2000


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Resolution, split sizes, seed, caption noise and the scene vocabulary of a build."""

  resolution: int = 64
  num_train: int = 10_000
  num_validation: int = 1_000
  num_test: int = 1_000
  num_held_out: int = 1_000
  seed: int = 0
  caption_noise: float = 0.0
  shapes: tuple[str, ...] = grammar.SHAPES
  colours: tuple[str, ...] = grammar.COLOUR_NAMES
  p_person: float = 0.4
  p_sign: float = 0.4
  max_objects: int = grammar.MAX_OBJECTS
  backgrounds: tuple[str, ...] = grammar.BACKGROUNDS

  def __post_init__(self):
    self.spec()  # Raises ValueError for bad arguments before anything is built.

  def spec(self) -> generate.GenSpec:
    """The generator's spec for this config."""
    scene = grammar.SceneSpec(tuple(self.shapes), tuple(self.colours), self.p_person, self.p_sign,
                              self.max_objects, tuple(self.backgrounds))
    sizes = (self.num_train, self.num_validation, self.num_test, self.num_held_out)
    return generate.GenSpec(self.resolution, sizes, self.seed, self.caption_noise, scene)


def _map(r: int, doc: str) -> tfds.features.Tensor:
  # zlib: masks compress ~50x, and decoding needs only numpy.
  return tfds.features.Tensor(shape=(r, r), dtype=np.uint8, encoding='zlib', doc=doc)


def features(r: int) -> tfds.features.FeaturesDict:
  """The feature spec at resolution r (strings decode to bytes without TensorFlow)."""
  label = tfds.features.ClassLabel
  tensor = tfds.features.Tensor
  texts = tfds.features.Sequence(tfds.features.Text())
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(r, r, 3)),
      'label': label(names=grammar.SHAPES, doc='Shape of the largest (then nearest) object.'),
      'shape_colour': label(names=grammar.SHAPE_COLOURS,
                            doc='Colour and shape of the same object (64 classes).'),
      'captions': texts,
      'questions': texts,
      'answers': texts,
      'question_types': tfds.features.Sequence(label(names=questions.QUESTION_TYPES)),
      'language_swapped': tensor(shape=(), dtype=np.bool_, doc='Captions/QA from another example.'),
      'objects': tfds.features.Sequence({
          'shape': label(names=grammar.SHAPES),
          'colour': label(names=grammar.COLOUR_NAMES),
          'size': label(names=grammar.SIZES),
          'center': tensor(shape=(2,), dtype=np.float32, doc='(x, y) in [0, 1].'),
          'box': tensor(shape=(4,), dtype=np.float32,
                        doc='(ymin, xmin, ymax, xmax) of the full shape.'),
          'depth': tensor(shape=(), dtype=np.int32, doc='Depth level; smaller is nearer.'),
          'depth_order': tensor(shape=(), dtype=np.int32, doc='0 = nearest object.'),
      }),
      'background': label(names=grammar.BACKGROUNDS),
      'semantic_mask': _map(r, f'Class of the visible entity: {grammar.SEMANTIC_CLASSES}.'),
      'instance_mask': _map(r, 'Object k is k+1; sign 5; person 6; background 0.'),
      'depth': _map(r, 'Depth level of the visible entity; background 255.'),
      'skeleton': _map(r, 'Limb index + 1 of pose.LIMBS on each limb stroke.'),
      'pose_keypoints': tensor(shape=(pose.NUM_JOINTS, 2), dtype=np.float32,
                               doc='(x, y) in [0, 1].'),
      'pose_visibility': tensor(shape=(pose.NUM_JOINTS,), dtype=np.int32,
                                doc='0 no person, 1 occluded, 2 visible.'),
      'person_depth': tensor(shape=(), dtype=np.int32, doc='-1 without a person.'),
      'sign_box': tensor(shape=(4,), dtype=np.float32, doc='(ymin, xmin, ymax, xmax).'),
      'sign_depth': tensor(shape=(), dtype=np.int32, doc='-1 without a sign.'),
      'word': tfds.features.Text(doc='The word on the sign; empty without one.'),
  })


def _canonical(record: bytes) -> bytes:
  # TFDS serialises the example's feature map in a per-process hash order; sorting the
  # keys makes the bytes a function of the content alone.
  return tf_example_pb2.Example.FromString(record).SerializeToString(deterministic=True)


class _CanonicalWriter(writer_lib.ExampleWriter):
  """Writes records re-serialised deterministically."""

  def write(self, path, examples):
    """Writes (key, record) pairs to `path` with each record in canonical form."""
    return super().write(path, ((key, _canonical(record)) for key, record in examples))


def default_workers() -> int:
  """The CPUs this process may use."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for the procedural shapes scenes."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': "'shape_colour' label; single-object configs."}
  BUILDER_CONFIGS = [
      ShapesConfig(name=f'res{r}', description=f'{r}x{r} RGB scenes.', resolution=r)
      for r in RESOLUTIONS
  ] + [
      # The first 10,000 train scenes and every other split are res32's (same seed and index).
      ShapesConfig(name='res32_50k', description='res32 with 50,000 train scenes: more than a '
                   'VQA run of an hour sees twice.', resolution=32, num_train=50_000),
  ] + [
      ShapesConfig(name=f'tiny{r}', description=f'{r}x{r}, 512/64/64/64 examples: for smoke runs.',
                   resolution=r, num_train=512, num_validation=64, num_test=64, num_held_out=64)
      for r in (32, 64)
  ] + [
      ShapesConfig(name=f'single{r}', description=f'{r}x{r}, one object on a plain background: '
                   "class-conditional generation by 'shape_colour'.", resolution=r, max_objects=1,
                   backgrounds=('plain',), p_person=0.0, p_sign=0.0)
      for r in (32, 64)
  ] + [
      ShapesConfig(name='tinysingle32', description='single32 with 512/64/64/64 examples.',
                   resolution=32, num_train=512, num_validation=64, num_test=64, num_held_out=64,
                   max_objects=1, backgrounds=('plain',), p_person=0.0, p_sign=0.0)
  ] + [
      # A shape the model never saw, for LoRA fine-tuning (experiments/lora_shapes.py): the
      # single-object scenes without hearts, and hearts alone (labels stay the global ids).
      ShapesConfig(name='single32_noheart', description="single32 without 'heart'.",
                   resolution=32, max_objects=1, backgrounds=('plain',), p_person=0.0,
                   p_sign=0.0, shapes=tuple(s for s in grammar.SHAPES if s != 'heart')),
      ShapesConfig(name='single32_heart', description="single32 of 'heart' alone, 1000/256/256/"
                   '64 examples.', resolution=32, num_train=1000, num_validation=256,
                   num_test=256, num_held_out=64, max_objects=1, backgrounds=('plain',),
                   p_person=0.0, p_sign=0.0, shapes=('heart',)),
  ] + [
      ShapesConfig(name=f'res32_noise{p}', description=f'res32 with {p}% of the train examples '
                   "carrying another train example's captions (the paired-data quality sweep).",
                   resolution=32, caption_noise=p / 100)
      for p in CAPTION_NOISE_PERCENT
  ]
  DEFAULT_CONFIG_NAME = 'res64'

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """num_workers: generator processes for large splits (default: the CPUs available)."""
    self._num_workers = num_workers or default_workers()
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file (see digits_dataset_builder.Builder.code_path for why it is overridden)."""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features(self.builder_config.resolution),
        supervised_keys=('image', 'label'),
        # Record i of a split is example i of the generator; the pipeline shuffles.
        disable_shuffling=True,
    )

  def _example_writer(self) -> writer_lib.ExampleWriter:
    return _CanonicalWriter(file_format=self.info.file_format)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    spec = self.builder_config.spec()
    return {s: self._generate_examples(spec, s) for s in generate.SPLITS if spec.size(s)}

  def _generate_examples(self, spec: generate.GenSpec, split: str):
    n = spec.size(split)
    make = functools.partial(generate.tfds_example, spec, split)
    if self._num_workers <= 1 or n < MIN_PARALLEL:
      for i in range(n):
        yield i, make(i)
      return
    # spawn, not fork: the parent may hold JAX's threads, which fork can deadlock.
    with multiprocessing.get_context('spawn').Pool(self._num_workers) as pool:
      yield from enumerate(pool.imap(make, range(n), chunksize=64))
