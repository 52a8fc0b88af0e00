"""FD-zoo and adherence on fake generators and fake classifiers; the one-object scorer."""

import logging
import os

import numpy as np
import pytest

from data.shapes import generate
from data.shapes import grammar
from data.shapes import render
from data.shapes import score
from data.shapes import shapes_dataset_builder
from zoo import config as zoo_config
from zoo import evals
from zoo.evals import adherence
from zoo.evals import fd
from zoo.evals import generation

ConfigDict = zoo_config.ConfigDict


# --- Fréchet distance -------------------------------------------------------------------------

def test_frechet_distance_matches_closed_form_for_commuting_covariances():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fd.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
  # The same Gaussians in a rotated basis: the distance is rotation-invariant.
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  rotated = fd.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
  assert rotated == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
  feats = np.random.default_rng(1).normal(size=(500, 8)) @ np.diag(np.arange(1.0, 9.0))
  stats = fd.gaussian_stats(feats)
  assert abs(fd.frechet_distance(*stats, *stats)) < 1e-8
  shifted = fd.gaussian_stats(feats + 0.5)  # Same covariance: FD = |shift|^2 = 8 * 0.25.
  assert fd.frechet_distance(*stats, *shifted) == pytest.approx(2.0, rel=1e-9)


# --- fakes -----------------------------------------------------------------------------------

def data_config(builder_config, label_key):
  return ConfigDict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key=label_key,
      builder_config=builder_config, train_split='train', eval_split='validation', features=()))


def experiment(builder_config='tiny32', label_key='label', num_classes=8, **evals_cfg):
  return ConfigDict(dict(data=data_config(builder_config, label_key),
                         model=ConfigDict(dict(name='unet', num_classes=num_classes)),
                         evals=ConfigDict(evals_cfg)))


def sampling(**kw):
  return dict(dict(split='validation', num_samples=64, batch_size=24, sampler='', steps=0,
                   guidance_scale=1.0, use_ema=False, seed=3), **kw)


class FakeClassifier:
  """Features: a fixed random projection of 4x4-pooled pixels; logits decode a constant image.

  An image of constant value (k + 0.5) / K is classified as k, except class `wrong`, which
  comes out as (wrong + 1) % K.
  """

  def __init__(self, label_key='label', num_classes=8, wrong=3):
    self.config = ConfigDict(dict(data=data_config('tiny32', label_key),
                                  model=ConfigDict(dict(num_classes=num_classes))))
    self.key = ('fake', label_key, num_classes, wrong)
    self.num_classes, self.wrong = num_classes, wrong
    self.proj_48x16 = np.random.default_rng(0).normal(size=(48, 16))

  def __call__(self, images_BxHxWxC):
    b = images_BxHxWxC.shape[0]
    pooled_Bx48 = images_BxHxWxC.reshape(b, 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(b, 48)
    k_B = np.clip((images_BxHxWxC.mean(axis=(1, 2, 3)) * self.num_classes).astype(int), 0,
                  self.num_classes - 1)
    k_B = np.where(k_B == self.wrong, (k_B + 1) % self.num_classes, k_B)
    return np.eye(self.num_classes)[k_B], np.tanh(pooled_Bx48 @ self.proj_48x16)


class ReplayTask:
  """A 'generator' that replays the real set in the order the evaluator asks for it."""

  def __init__(self, real, conditioning='class', shift=0.0, encode_labels=False):
    self.real, self.conditioning, self.shift, self.encode = real, conditioning, shift, encode_labels
    self.cursor, self.seen = 0, []
    self.predict = {'sample': self.sample}

  def sample(self, params, rng, labels_B=None, *, num=None, prompts=None, sampler, steps,
             guidance_scale):
    n = len(self.real.images_NxHxWxC)
    idx = (self.cursor + np.arange(len(labels_B if labels_B is not None else prompts or [0] * num)))
    idx %= n
    self.cursor += len(idx)
    self.seen.append(labels_B if labels_B is not None else prompts)
    if self.encode:  # Constant images whose value names the requested class.
      return np.broadcast_to(((labels_B + 0.5) / 8)[:, None, None, None], (len(idx), 32, 32, 3))
    return np.clip((self.real.images_NxHxWxC[idx] + 1.0) / 2.0 + self.shift, 0.0, 1.0)


def fd_zoo(task, classifier, config):
  cfg = config.evals.fd
  return fd.FDZoo(cfg, task=task, config=config, workdir='/unused', classifier=classifier)


# --- FD-zoo ----------------------------------------------------------------------------------

def test_fd_zoo_is_zero_on_real_images_and_larger_on_shifted_ones():
  config = experiment(fd=ConfigDict(dict(type='fd_zoo', classifier_workdir='/x', **sampling())))
  real = generation.real_set(config.data, 'validation', 64, 3, 'test')
  same = ReplayTask(real)
  metrics = fd_zoo(same, FakeClassifier(), config).run({'params': None}, 0)
  # The requested labels are the real label stream (64 = 3 batches of 24, wrapped around).
  np.testing.assert_array_equal(np.concatenate(same.seen)[:64], real.labels_N)
  assert abs(metrics['fd_zoo']) < 1e-6
  shifted = fd_zoo(ReplayTask(real, shift=0.15), FakeClassifier(), config).run({'params': 0}, 0)
  assert shifted['fd_zoo'] > 1e-2 > 1e4 * abs(metrics['fd_zoo'])


def test_class_accuracy_is_the_fraction_of_requested_labels_the_classifier_returns():
  config = experiment(fd=ConfigDict(dict(type='fd_zoo', classifier_workdir='/x', **sampling())))
  real = generation.real_set(config.data, 'validation', 64, 3, 'test')
  metrics = fd_zoo(ReplayTask(real, encode_labels=True), FakeClassifier(wrong=3), config).run(
      {'params': None}, 0)
  assert metrics['class_accuracy'] == np.mean(real.labels_N != 3)


def test_class_accuracy_is_skipped_with_a_reason_when_label_spaces_differ(caplog):
  config = experiment(fd=ConfigDict(dict(type='fd_zoo', classifier_workdir='/x', **sampling())))
  real = generation.real_set(config.data, 'validation', 64, 3, 'test')
  with caplog.at_level(logging.INFO, logger='zoo'):
    evaluator = fd_zoo(ReplayTask(real), FakeClassifier('shape_colour', 64), config)
  assert "no class_accuracy: the model has data.label_key='label'" in caplog.text
  assert set(evaluator.run({'params': None}, 0)) == {'fd_zoo'}


def test_fd_zoo_config_errors():
  cfg = dict(type='fd_zoo', classifier_workdir='', **sampling())
  with pytest.raises(ValueError, match='classifier_workdir'):
    evals.EVALUATORS['fd_zoo'].check(ConfigDict(cfg), experiment(), 'config.evals.fd')
  with pytest.raises(ValueError, match='config.evals.fd.sampler'):
    evals.EVALUATORS['fd_zoo'].check(ConfigDict(dict(cfg, classifier_workdir='/x', sampler='x')),
                                     experiment(), 'config.evals.fd')
  missing = ConfigDict(dict(cfg, classifier_workdir='/no/such/run'))
  config = experiment(fd=missing)
  with pytest.raises(FileNotFoundError, match='config.evals.fd.classifier_workdir=.*/no/such/run'):
    fd.FDZoo(config.evals.fd, task=ReplayTask(None), config=config, workdir='/unused')


# --- adherence -------------------------------------------------------------------------------

class PaintTask:
  """Paints each requested 'shape_colour' class as a large centred object; red comes out blue."""

  conditioning = 'class'

  def __init__(self):
    self.predict = {'sample': self.sample}

  def sample(self, params, rng, labels_B, *, sampler, steps, guidance_scale):
    out = []
    for label in np.asarray(labels_B):
      shape, colour = adherence.decode_shape_colour(label)
      colour = 'blue' if colour == 'red' else colour
      obj = grammar.Obj(shape, colour, 'large', 0.5, 0.5, 16)
      scene = grammar.Scene((obj,), None, None, grammar.Background('plain', (180, 180)))
      out.append(render.render(scene, 32).image / 255.0)
    return np.stack(out)


def test_adherence_judges_requested_shape_colour_classes_and_writes_a_grid(tmp_path):
  cfg = ConfigDict(dict(type='adherence', grid=8, upscale=1, **sampling(batch_size=32)))
  config = experiment('tinysingle32', 'shape_colour', 64, adh=cfg)
  evals.EVALUATORS['adherence'].check(cfg, config, 'config.evals.adh')
  evaluator = adherence.Adherence(cfg, task=PaintTask(), config=config, workdir=str(tmp_path))
  metrics = evaluator.run({'params': None}, 7)
  labels = generation.real_set(config.data, 'validation', 64, 3, 'test').labels_N
  red = labels % len(grammar.COLOUR_NAMES) == grammar.COLOUR_NAMES.index('red')
  assert metrics == {'accuracy': np.mean(~red), 'colour': np.mean(~red), 'shape': 1.0}
  assert os.path.isfile(tmp_path / 'adherence' / 'step_000007.png')


def test_adherence_scores_text_prompts_against_their_examples(tmp_path):
  cfg = ConfigDict(dict(type='adherence', grid=0, upscale=1, **sampling(num_samples=16,
                                                                         batch_size=8)))
  config = experiment(adh=cfg)
  real = generation.real_set(config.data, 'validation', 16, 3, 'test')
  task = ReplayTask(real, conditioning='text')
  metrics = adherence.Adherence(cfg, task=task, config=config, workdir=str(tmp_path)).run(
      {'params': None}, 0)
  assert [p for batch in task.seen for p in batch] == [
      ex['captions'][0].decode() for ex in real.examples]
  assert metrics['overall'] == 1.0 and metrics['colour'] == 1.0
  swapped = ReplayTask(generation.real_set(config.data, 'validation', 16, 4, 'test'), 'text')
  worse = adherence.Adherence(cfg, task=swapped, config=config, workdir=str(tmp_path)).run(
      {'params': None}, 0)
  assert worse['overall'] < 0.7


def test_adherence_config_errors():
  cfg = ConfigDict(dict(type='adherence', grid=0, upscale=1, **sampling()))
  with pytest.raises(ValueError, match="label_key='shape_colour'"):
    adherence.Adherence.check(cfg, experiment(adh=cfg), 'config.evals.adh')
  config = experiment(label_key='', num_classes=0, adh=cfg)
  with pytest.raises(ValueError, match='unconditional'):
    adherence.Adherence(cfg, task=ReplayTask(None, 'none'), config=config, workdir='/unused')


# --- the one-object scorer -------------------------------------------------------------------

def single_object_spec(name):
  configs = {c.name: c for c in shapes_dataset_builder.Builder.BUILDER_CONFIGS}
  return configs[name].spec()


@pytest.mark.parametrize('name,count', [('single32', 160), ('single64', 60)])
def test_judge_single_on_renders_of_the_one_object_config(name, count):
  spec = single_object_spec(name)
  hits = []
  for i in range(count):
    example = generate.make_example(spec, 'validation', i)
    (shape,), (colour,) = example['objects']['shape'], example['objects']['colour']
    judged = score.judge_single(example['image'], shape, colour)
    hits.append(judged['colour'] and judged['shape'])
    assert (judged['predicted_shape'] == shape) == judged['shape']
  assert np.mean(hits) >= 0.99


def test_judge_single_is_near_chance_on_noise():
  rng = np.random.default_rng(0)
  colour_hits, shape_hits = [], []
  for _ in range(120):
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    judged = score.judge_single(image, grammar.SHAPES[rng.integers(8)],
                                grammar.COLOUR_NAMES[rng.integers(8)])
    colour_hits.append(judged['colour'])
    shape_hits.append(judged['shape'])
  assert np.mean(colour_hits) < 0.3 and np.mean(shape_hits) < 0.3  # Chance is 1/8.


def test_judge_single_rejects_bad_inputs():
  with pytest.raises(ValueError, match='uint8'):
    score.judge_single(np.zeros((32, 32, 3), np.float32), 'circle', 'red')
  with pytest.raises(ValueError, match='shape='):
    score.judge_single(np.zeros((32, 32, 3), np.uint8), 'blob', 'red')
  grey = np.full((32, 32, 3), 180, np.uint8)
  assert score.judge_single(grey, 'circle', 'red') == dict(
      colour=False, shape=False, predicted_colour='', predicted_shape='', iou=0.0)
