"""The recipe benchmark: the optimal denoiser, every recipe's config, one table on smoke data."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import config as zoo_config
from zoo import diffusion
from zoo.bench import recipes

from conftest import REPO

DIT_SHAPES = os.path.join(REPO, 'experiments', 'dit_shapes.py')


@pytest.mark.parametrize('name', [n for n in recipes.RECIPES if n != 'oracle'])
def test_every_recipe_is_a_valid_config(name):
  arg, overrides, eval_every = recipes.RECIPES[name]
  config = zoo_config.load(f'{DIT_SHAPES}:{arg}', [f'--config.{o}' for o in overrides])
  assert config.train.steps % eval_every == 0


def test_oracle_denoiser_is_the_class_posterior_mean():
  sched = diffusion.Schedule.create('cosine', 1000)
  images = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
  labels = jnp.array([0, 1, 1])
  pred_fn = recipes.oracle_denoiser(images, labels, sched, null_label=2)
  a, s = (float(c[500]) for c in (sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod))
  x_t = jnp.array([[0.3, -0.2], [0.3, -0.2], [0.3, -0.2]])
  eps = pred_fn(x_t, jnp.full((3,), 500), jnp.array([0, 1, 2]))
  x0 = (x_t - s * eps) / a
  # Label 0 has one image: the posterior mean is that image.
  np.testing.assert_allclose(x0[0], images[0], atol=1e-5)
  # Label 1 and the null label: softmax over the allowed images of -|x_t - a x_i|² / 2s².
  for row, allowed in ((1, [1, 2]), (2, [0, 1, 2])):
    d2 = np.sum((np.asarray(x_t[0]) - a * np.asarray(images)[allowed]) ** 2, axis=1)
    w = np.exp(-(d2 - d2.min()) / (2 * s ** 2))
    np.testing.assert_allclose(x0[row], (w / w.sum()) @ np.asarray(images)[allowed], atol=1e-5)
  # A fractional timestep (the solvers' σ grid) falls between its neighbours smoothly.
  eps_mid = pred_fn(x_t, jnp.full((3,), 500.5), jnp.array([1, 1, 1]))
  lo, hi = (pred_fn(x_t, jnp.full((3,), t), jnp.array([1, 1, 1])) for t in (500, 501))
  assert float(jnp.max(jnp.abs(hi - lo))) > 0
  np.testing.assert_allclose(eps_mid, (lo + hi) / 2,
                             atol=1e-3 * float(jnp.max(jnp.abs(hi - lo))) + 1e-6)
  assert jax.jit(pred_fn)(x_t, jnp.full((3,), 10), labels).shape == (3, 2)


def test_table_on_smoke_data(tmp_path):
  out = tmp_path / 'recipes.json'
  recipes.main(['--config', f'{DIT_SHAPES}:smoke=True', '--recipes', 'oracle', 'snr5',
                '--steps', '10', '--num', '16', '--out', str(out)])
  rows = json.loads(out.read_text())['rows']
  oracle, trained = rows
  # The exact denoiser through the sampler, guidance and scorer: (nearly) every sample right.
  assert oracle['recipe'] == 'oracle' and min(oracle['g1'], oracle['g4']) >= 0.9
  assert trained['recipe'] == 'snr5' and trained['step'] == trained['steps'] == 10
  for key in ('g2', 'g4', 'g7', 'g2_raw', 'g4_raw', 'g7_raw'):
    assert 0.0 <= trained[key] <= trained[key + '_shape'] <= 1.0
  assert np.isfinite(trained['loss'])


def test_overrides_reach_every_recipe(tmp_path):
  with pytest.raises((KeyError, ValueError), match='snr_gama'):
    recipes.main(['--config', f'{DIT_SHAPES}:smoke=True', '--recipes', 'base', '--steps', '2',
                  '--override', 'task.snr_gama=5.0', '--out', str(tmp_path / 'r.json')])
