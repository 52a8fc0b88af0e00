"""Distillation: progressive (halving DDIM steps) and consistency students of a shapes teacher."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data as data_lib
from zoo import config as zoo_config
from zoo import diffusion
from zoo import runs
from zoo import tasks
from zoo import train
from zoo.tasks import consistency
from zoo.tasks import distill

from conftest import REPO
from conftest import assert_same

QUIET = ['--config.train.progress_bar=false', '--config.mesh.data=1',
         '--config.evals.samples.per_label=1']


def _config(experiment, arg, *overrides):
  return zoo_config.load(os.path.join(REPO, 'experiments', f'{experiment}.py:{arg}'),
                         [*QUIET, *overrides])


def _load(workdir):
  """runs.load's (config, setup, weights) with the weights on one device: laid out over the 8
  test devices, every jitted call would compute the same thing 8 times on 2 cores."""
  config, s, state = runs.load(workdir)
  return config, s, jax.device_put(jax.device_get(state), jax.devices()[0])


def _batch(config):
  """The first 8 training images (and labels) of `config`'s data."""
  return next(iter(data_lib.get_dataset(config.data, split='train', seed=0,
                                        global_batch_size=8)))


class _NoCheckpoint:
  def latest_step(self):
    return None


def _first_state(config):
  """(setup, the state a run of `config` starts from: pretrained parts loaded), untrained."""
  s = train.setup(config, data_lib.get_dataset(config.data, split='train', seed=0,
                                               global_batch_size=8).spec())
  return s, train._first_state(s, _NoCheckpoint(), None, jax.random.PRNGKey(0))


def _loss_drop(workdir):
  """(loss of the student as it started (a copy of the teacher), loss after training), each
  averaged over the same 4 draws of t and noise on the same 8 training images."""
  config, s, state = _load(workdir)
  batch = _batch(config)
  params = state['params']
  start = {**params, 'student': params['teacher']}
  loss = jax.jit(lambda p, r: s.task.loss(p, batch, r, train=False)[0])
  rngs = [jax.random.PRNGKey(i) for i in range(4)]
  return [float(np.mean([loss(p, r) for r in rngs])) for p in (start, params)]


def test_x0_target_is_the_x0_whose_ddim_step_lands_on_the_teacher():
  sched = diffusion.Schedule.create('cosine', 1000)
  rng = np.random.default_rng(0)
  z_t, z_prev = (jnp.asarray(rng.standard_normal((3, 4, 4, 3)), jnp.float32) for _ in range(2))
  ab = sched.alphas_cumprod
  ab_t, ab_prev = ab[jnp.array([999, 600, 100])], jnp.array([ab[700], ab[300], 1.0])
  x_tilde = distill.x0_target(z_t, z_prev, ab_t, ab_prev)
  a_t, a_prev = ab_t[:, None, None, None], ab_prev[:, None, None, None]
  eps = (z_t - jnp.sqrt(a_t) * x_tilde) / jnp.sqrt(1 - a_t)
  landed = jnp.sqrt(a_prev) * x_tilde + jnp.sqrt(1 - a_prev) * eps
  np.testing.assert_allclose(landed, z_prev, atol=2e-4)
  np.testing.assert_array_equal(x_tilde[2], z_prev[2])  # Onto x0 (ᾱ = 1): x̃ = z''.


def test_progressive_rounds_chain_and_learn(shapes_diffusion_run, tmp_path):
  teacher = str(shapes_diffusion_run[0])
  first = str(tmp_path / 'pd4')
  train.train_and_evaluate(_config('progressive_distill_shapes', f'smoke=True,teacher={teacher},'
                                   'steps=4,train_steps=16'), first)
  before, after = _loss_drop(first)
  assert after < 0.8 * before  # About 0.77 here.
  config, s, state = _load(first)
  # The student started from the teacher's weights; the frozen teacher is untouched.
  _, _, teacher_state = _load(teacher)
  for a, b in zip(jax.tree.leaves(state['params']['teacher']),
                  jax.tree.leaves(teacher_state['ema_params'])):
    np.testing.assert_array_equal(a, b)
  images = s.task.predict['sample'](state['ema_params'], jax.random.PRNGKey(0),
                                    np.arange(4, dtype=np.int32))
  assert images.shape == (4, 32, 32, 3) and 0 <= float(images.min()) <= float(images.max()) <= 1
  with pytest.raises(ValueError, match=r'a round halves them \(student_steps=2\)'):
    _config('progressive_distill_shapes', f'smoke=True,teacher={first},steps=1')
  # A consistency student can start from this progressive student (its v-prediction weights):
  # the state such a run starts from (train_and_evaluate's) holds its EMA weights.
  _, cd_start = _first_state(_config('consistency_distill_shapes',
                                     f'smoke=True,teacher={teacher},init={first}'))
  assert_same(cd_start['params']['student'], state['ema_params']['student'])
  with pytest.raises(ValueError, match="student_from=.* is a 'diffusion' run"):
    _config('consistency_distill_shapes', f'smoke=True,teacher={teacher},init={teacher}')
  # Round 2 (4 -> 2 steps): its frozen teacher is round 1's EMA student, called unguided as a
  # v-predictor, and its loss against two of that teacher's DDIM steps evaluates.
  s2, start2 = _first_state(_config('progressive_distill_shapes',
                                    f'smoke=True,teacher={first},steps=2'))
  assert s2.task.teacher_prediction == 'v' and s2.task.teacher_scale == 1.0
  assert_same(start2['params']['teacher'], state['ema_params']['student'])
  assert_same(start2['params']['student'], state['ema_params']['student'])
  batch = _batch(config)
  loss, _ = jax.jit(lambda p: s2.task.loss(p, batch, jax.random.PRNGKey(0), train=False))(
      start2['params'])  # On the run's 1-device mesh.
  assert 0 < float(loss) < 10


@pytest.mark.parametrize('overrides, match', [
    (['--config.task.guidance_scale=2.0'], 'sample it at guidance_scale=1.0'),
    (['--config.task.prediction_type=epsilon'], "predicts v"),
    (['--config.task.student_steps=3'], 'must equal student_steps=3'),
    (['--config.task.teacher_from=/nonexistent'], 'is not a zoo run'),
])
def test_progressive_config_errors(shapes_diffusion_run, overrides, match):
  teacher = str(shapes_diffusion_run[0])
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    config = _config('progressive_distill_shapes', f'smoke=True,teacher={teacher}', *overrides)
    tasks.build(config)


def test_consistency_boundary_and_timesteps():
  c_skip, c_out = consistency.boundary_coefficients(jnp.array([0, 999]))
  assert (float(c_skip[0]), float(c_out[0])) == (1.0, 0.0)  # f(x, 0) = x.
  assert float(c_skip[1]) < 1e-6 and float(c_out[1]) > 0.999
  # LCM's scheduler: 50 grid points (skip 20), every 12th from the top for 4 steps.
  np.testing.assert_array_equal(consistency.sampling_timesteps(1000, 20, 4), [999, 759, 519, 279])
  np.testing.assert_array_equal(consistency.sampling_timesteps(1000, 20, 1), [999])
  with pytest.raises(ValueError, match=r'\[1, 50\]'):
    consistency.sampling_timesteps(1000, 20, 51)


def test_consistency_student_trains_and_samples_in_one_and_two_steps(shapes_diffusion_run,
                                                                     tmp_path):
  teacher = str(shapes_diffusion_run[0])
  workdir = str(tmp_path / 'cd')
  train.train_and_evaluate(_config('consistency_distill_shapes',
                                   f'smoke=True,teacher={teacher},train_steps=8',
                                   '--config.train.batch_size=4'), workdir)
  before, after = _loss_drop(workdir)
  assert after < 0.7 * before  # About 0.47 here.
  _, s, state = _load(workdir)
  labels = np.arange(3, dtype=np.int32)
  one, two = (s.task.predict['sample'](state['ema_params'], jax.random.PRNGKey(0), labels,
                                       steps=n) for n in (1, 2))
  assert one.shape == two.shape == (3, 32, 32, 3)
  assert float(jnp.abs(one - two).max()) > 0  # The second step re-noises and denoises again.
  with pytest.raises(ValueError, match="samples with 'consistency'"):
    s.task.predict['sample'](state['ema_params'], jax.random.PRNGKey(0), labels, sampler='ddim')
