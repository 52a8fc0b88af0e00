"""The shapes classifier: architecture, config errors, learning through the loop, FD-zoo on it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import config as zoo_config
from zoo import metrics
from zoo import models
from zoo import train
from zoo.evals import fd
from zoo.evals import generation
from zoo.models import classifier
from zoo.nn import layers

from conftest import REPO

EXPERIMENT = os.path.join(REPO, 'experiments', 'shapes_classifier.py')


def expected_param_count(widths, num_classes, feature_width, in_channels=3):
  """Conv k x k: k*k*in*out + out; GroupNorm: 2 * channels; one block per stage."""
  def conv(k, cin, cout):
    return k * k * cin * cout + cout
  total = conv(3, in_channels, widths[0])
  for cin, cout in zip((widths[0], *widths[:-1]), widths):
    total += 2 * cin + conv(3, cin, cout) + 2 * cout + conv(3, cout, cout)
    total += conv(1, cin, cout) if cin != cout else 0
  return total + 2 * widths[-1] + feature_width * num_classes + num_classes


def test_shapes_preset_parameters_and_outputs():
  model = classifier.Classifier(num_classes=64, **classifier.preset('shapes'))
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  params = model.init(jax.random.PRNGKey(1), x)['params']
  assert layers.param_count(params) == expected_param_count((16, 32, 64), 64, 128) == 85792
  logits, feats = model.apply({'params': params}, x, features=True)
  assert logits.shape == (2, 64) and feats.shape == (2, 128)  # Mean and max pools.
  np.testing.assert_allclose(model.apply({'params': params}, x), logits, rtol=1e-6, atol=1e-6)
  # The head is linear in the pooled features.
  head = params['head']
  np.testing.assert_allclose(feats @ head['kernel'].value + head['bias'].value[None], logits,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('overrides,match', [
    (dict(widths=(12, 24)), 'model.widths'),
    (dict(pool='sum'), 'model.pool'),
    (dict(num_classes=1), 'model.num_classes'),
])
def test_config_errors_name_the_key(overrides, match):
  config = models.config('classifier', preset='shapes', **overrides)
  with pytest.raises(ValueError, match=match):
    models.check_config(config, 32)


def test_resolution_must_divide_by_the_downsampling():
  with pytest.raises(ValueError, match='resolution 36 must be divisible by 8'):
    models.check_config(models.config('classifier', preset='shapes'), 36)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A smoke classifier on one-object scenes by 'shape_colour' (colour is learned first)."""
  workdir = str(tmp_path_factory.mktemp('classifier'))
  config = zoo_config.load(
      f'{EXPERIMENT}:smoke=True,label=shape_colour,steps=60',
      ['--config.train.log_every=10', '--config.train.checkpoint_every=60',
       '--config.train.batch_size=32', '--config.optim.lr=0.01'])
  train.train_and_evaluate(config, workdir)
  return workdir


def test_loss_goes_down_and_accuracy_rises(trained):
  rows = metrics.read_jsonl(os.path.join(trained, 'metrics.jsonl'))
  logged = [r for r in rows if 'loss' in r]
  assert logged[-1]['loss'] < logged[0]['loss'] - 0.3
  assert logged[-1]['accuracy'] > logged[0]['accuracy']
  val = [r['val/accuracy'] for r in rows if 'val/accuracy' in r]
  assert val[-1] > 2 / 64  # Chance is 1 / 64.


class Replay:
  """A class-conditional 'generator' that returns the real images it is asked for, in order."""

  conditioning = 'class'

  def __init__(self, real):
    self.real, self.cursor = real, 0
    self.predict = {'sample': self.sample}

  def sample(self, params, rng, labels_B, *, sampler, steps, guidance_scale):
    idx = (self.cursor + np.arange(len(labels_B))) % len(self.real.labels_N)
    self.cursor += len(idx)
    np.testing.assert_array_equal(labels_B, self.real.labels_N[idx])
    return (self.real.images_NxHxWxC[idx] + 1.0) / 2.0


def test_fd_zoo_with_a_trained_classifier(trained):
  """Real images as 'generated' ones: FD-zoo ~ 0, class_accuracy = the classifier's accuracy."""
  config = zoo_config.load(
      f'{EXPERIMENT}:smoke=True,label=shape_colour')
  config.evals = zoo_config.ConfigDict({'fd': dict(
      type='fd_zoo', classifier_workdir=trained, split='validation', num_samples=64,
      batch_size=32, sampler='', steps=0, guidance_scale=1.0, use_ema=True, seed=0)})
  real = generation.real_set(config.data, 'validation', 64, 0, 'test')
  evaluator = fd.FDZoo(config.evals.fd, task=Replay(real), config=config, workdir=trained)
  out = evaluator.run({'ema_params': None}, 0)
  assert abs(out['fd_zoo']) < 1e-3
  zoo_classifier = fd.load_classifier(trained, 'test')
  logits, _ = zoo_classifier((real.images_NxHxWxC + 1.0) / 2.0)
  assert out['class_accuracy'] == np.mean(logits.argmax(-1) == real.labels_N)
  direct = zoo_classifier.task.predict['logits'](zoo_classifier.params,
                                                 jnp.asarray(real.images_NxHxWxC))
  np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
