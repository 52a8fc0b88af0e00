"""Tests for zoo.diffusion.solvers (DPM-Solver++(2M), Euler, Heun) and timestep spacings.

Parity: every model call of the zoo solver (its input x and timestep) and the final sample
are compared with diffusers' schedulers driven by the same analytic model from the same x_T.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
  DDIMScheduler,
  DPMSolverMultistepScheduler,
  EulerDiscreteScheduler,
  HeunDiscreteScheduler,
)

from zoo import diffusion
from zoo.diffusion import solvers

jax.config.update('jax_numpy_rank_promotion', 'raise')
# diffusers converts torch tensors with np.array(..., copy=False), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings(
  "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

T = 1000
MU, STD = 0.3, 0.5
SOLVERS = ('dpmpp_2m', 'euler', 'heun')
_sample = jax.jit(
  diffusion.sample,
  static_argnames=('model_fn', 'sampler', 'steps', 'prediction_type', 'clip_x0', 'karras'),
)


def _alpha_bar(sched, t_B):
  """ᾱ at fractional timesteps, with log σ linear between table entries (as the solvers map)."""
  log_sigma = jnp.interp(
    t_B.astype(jnp.float32), jnp.arange(T, dtype=jnp.float32), jnp.log(solvers.table_sigmas(sched))
  )
  return 1 / (jnp.exp(2 * log_sigma) + 1)


def _gaussian_model(sched, prediction_type='epsilon'):
  """The exact prediction for data x0 ~ N(MU, STD²) per pixel, at any (fractional) t."""

  def model_fn(x_t, t_B):
    ab = jnp.reshape(_alpha_bar(sched, t_B), (-1,) + (1,) * (x_t.ndim - 1))
    var_t = ab * STD**2 + 1 - ab
    eps = jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * MU) / var_t
    x0 = MU + jnp.sqrt(ab) * STD**2 * (x_t - jnp.sqrt(ab) * MU) / var_t
    v = jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0
    return {'epsilon': eps, 'x0': x0, 'v': v}[prediction_type]

  return model_fn


def _recording(model_fn, calls):
  """Wraps model_fn so every call appends its (x_t, t_B) to `calls` in order."""

  def wrapped(x_t, t_B):
    jax.debug.callback(
      lambda x, t: calls.append((np.asarray(x), np.asarray(t))), x_t, t_B, ordered=True
    )
    return model_fn(x_t, t_B)

  return wrapped


# ---------------------------------------------------------------- diffusers parity


_DIFFUSERS_PREDICTION = {'epsilon': 'epsilon', 'v': 'v_prediction', 'x0': 'sample'}


def _diffusers_scheduler(sampler, karras, betas, prediction_type):
  common = {
    'num_train_timesteps': T,
    'trained_betas': betas.tolist(),
    'use_karras_sigmas': karras,
    'prediction_type': _DIFFUSERS_PREDICTION[prediction_type],
  }
  if sampler == 'dpmpp_2m':
    return DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', solver_order=2, **common)
  if sampler == 'euler':
    return EulerDiscreteScheduler(**common)
  return HeunDiscreteScheduler(**common)


def _diffusers_run(sampler, karras, betas, prediction_type, x_T, steps, model_fn):
  """Runs diffusers; returns [(VP model input x, t)] per call, the final x and the σ_S."""
  sch = _diffusers_scheduler(sampler, karras, betas, prediction_type)
  # diffusers takes the product of float32 alphas, which drifts ~3e-5 relative by t = 500 and
  # moves the fractional timesteps by ~0.04; zoo's table is the float64 product, so give
  # diffusers that too and compare the solvers, not two roundings of the same schedule.
  sch.alphas_cumprod = torch.from_numpy(np.cumprod(1 - betas))
  sch.set_timesteps(steps)
  x = np.asarray(x_T, np.float32)
  if sampler != 'dpmpp_2m':
    # Euler/Heun carry x in σ space; start from the VP-consistent x_T·sqrt(σ_max² + 1).
    x = x * np.sqrt(float(sch.sigmas[0]) ** 2 + 1)
  x = torch.from_numpy(x.copy())
  calls = []
  for t in sch.timesteps:
    x_in = sch.scale_model_input(x, t)
    t_B = np.full((x.shape[0],), float(t), np.float32)
    calls.append((x_in.numpy(), t_B))
    pred = torch.from_numpy(np.array(model_fn(jnp.asarray(x_in.numpy()), jnp.asarray(t_B))))
    x = sch.step(pred, t, x).prev_sample
  # Heun lists each intermediate σ twice (its predictor and corrector calls).
  sigmas = sch.sigmas.numpy()[:-1:2] if sampler == 'heun' else sch.sigmas.numpy()[:-1]
  return calls, x.numpy(), sigmas


@pytest.mark.parametrize(
  'sampler, karras, name, prediction_type, steps',
  [
    ('dpmpp_2m', True, 'scaled_linear', 'epsilon', 10),
    ('dpmpp_2m', False, 'linear', 'v', 12),
    ('euler', True, 'scaled_linear', 'epsilon', 10),
    ('euler', True, 'cosine', 'v', 8),
    ('heun', True, 'scaled_linear', 'epsilon', 6),
    ('heun', True, 'linear', 'x0', 5),
  ],
)
def test_matches_diffusers_step_by_step(sampler, karras, name, prediction_type, steps):
  sched = diffusion.Schedule.create(name, T)
  model_fn = _gaussian_model(sched, prediction_type)
  x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  calls = []
  out = diffusion.sample(
    _recording(model_fn, calls),
    sched,
    x_T,
    jax.random.key(1),
    sampler=sampler,
    steps=steps,
    prediction_type=prediction_type,
    clip_x0=False,
    karras=karras,
  )
  jax.effects_barrier()
  ref_calls, ref_out, ref_sigmas = _diffusers_run(
    sampler, karras, diffusion.make_betas(name, T), prediction_type, x_T, steps, model_fn
  )
  np.testing.assert_allclose(solvers.solver_sigmas(sched, steps, karras)[0], ref_sigmas, rtol=1e-5)
  assert len(calls) == len(ref_calls) == (2 * steps - 1 if sampler == 'heun' else steps)
  for (x, t), (ref_x, ref_t) in zip(calls, ref_calls):
    np.testing.assert_allclose(t, ref_t, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(x, ref_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)


def test_diffusers_parity_tolerances_are_meaningful():
  # A 1e-3 change of a single σ must be visible at the 1e-5 tolerance used above.
  sched = diffusion.Schedule.create('scaled_linear', T)
  x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  sigmas_S, t_S = solvers.solver_sigmas(sched, 10, True)
  model_fn = _gaussian_model(sched)

  def run(sigmas_S):
    def denoise(x, t, sigma):
      return solvers._denoise(model_fn, x, t, sigma, 'epsilon', False)

    return solvers._euler_or_heun(denoise, x_T, sigmas_S, t_S, heun=False)

  assert np.abs(np.asarray(run(sigmas_S * 1.001) - run(sigmas_S))).max() > 1e-4


# ---------------------------------------------------------------- analytic correctness


def _exact_transport(sched, x_T):
  """The probability-flow ODE's exact x0 for Gaussian data: affine in x_T.

  x_σ - MU scales by sqrt(STD² + σ²) along the ODE, from x_σmax = x_T·sqrt(σ_max² + 1).
  """
  sigma_max = float(solvers.table_sigmas(sched)[-1])
  x_max = np.asarray(x_T) * np.sqrt(sigma_max**2 + 1)
  return MU + STD * (x_max - MU) / np.sqrt(STD**2 + sigma_max**2)


def _relative_error(sched, sampler, steps, prediction_type, x_T, karras=True):
  x = _sample(
    _gaussian_model(sched, prediction_type),
    sched,
    x_T,
    jax.random.key(1),
    sampler=sampler,
    steps=steps,
    prediction_type=prediction_type,
    clip_x0=False,
    karras=karras,
  )
  exact = _exact_transport(sched, x_T)
  return x, float(np.abs(np.asarray(x) - exact).max() / np.abs(exact - MU).max())


@pytest.mark.parametrize(
  'sampler, steps, prediction_type, name, karras, tol',
  [
    # Measured errors relative to the exact ODE solution: 0.013, 0.004, 0.086, 0.013, 0.049.
    # Euler is first order (DDIM-like undershoot); the last step of karras=False jumps from
    # t = T/S straight to σ = 0, which is why it is only checked on the cosine schedule.
    ('dpmpp_2m', 20, 'epsilon', 'scaled_linear', True, 0.02),
    ('dpmpp_2m', 20, 'v', 'cosine', False, 0.01),
    ('euler', 20, 'x0', 'scaled_linear', True, 0.1),
    ('heun', 20, 'v', 'scaled_linear', True, 0.02),
    ('heun', 20, 'epsilon', 'linear', True, 0.06),
  ],
)
def test_solver_recovers_gaussian_data(sampler, steps, prediction_type, name, karras, tol):
  sched = diffusion.Schedule.create(name, T)
  x_T = jax.random.normal(jax.random.key(0), (16, 32, 32, 1))
  x, err = _relative_error(sched, sampler, steps, prediction_type, x_T, karras)
  assert x.shape == x_T.shape and x.dtype == jnp.float32
  assert err < tol
  assert abs(float(x.mean()) - MU) < 0.015
  assert abs(float(x.std()) - STD) < tol * STD + 0.01


@pytest.mark.parametrize('sampler, min_ratio', [('euler', 1.8), ('heun', 3.5), ('dpmpp_2m', 3.5)])
def test_solver_convergence_order(sampler, min_ratio):
  # Doubling the steps should halve a first-order error and quarter a second-order one
  # (measured: 1.97, 7.9 and 8.2 from 20 to 40 steps).
  sched = diffusion.Schedule.create('scaled_linear', T)
  x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  _, err_20 = _relative_error(sched, sampler, 20, 'epsilon', x_T)
  _, err_40 = _relative_error(sched, sampler, 40, 'epsilon', x_T)
  assert err_20 / err_40 > min_ratio


def test_solvers_are_deterministic_and_one_scan():
  sched = diffusion.Schedule.create('linear', T)
  x_T = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  for sampler in SOLVERS:
    traces = []

    def model_fn(x, t_B, traces=traces):
      traces.append(t_B.dtype)
      return _gaussian_model(sched)(x, t_B)

    run = functools.partial(_sample, model_fn, sched, x_T, sampler=sampler, steps=12)
    np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(2)))
    # Traced once per call site in the scan body (Heun has two), whatever the step count;
    # Euler/Heun trace once more for the final step to σ = 0.
    assert traces == [jnp.float32] * {'dpmpp_2m': 1, 'euler': 2, 'heun': 3}[sampler]


def test_karras_sigmas_closed_form():
  sched = diffusion.Schedule.create('scaled_linear', T)
  ab = np.cumprod(1 - diffusion.make_betas('scaled_linear', T))
  table = np.sqrt((1 - ab) / ab)
  sigmas = np.asarray(solvers.karras_sigmas(sched, 7))
  np.testing.assert_allclose(sigmas[[0, -1]], table[[-1, 0]], rtol=1e-5)
  # Equally spaced in σ^(1/ρ).
  np.testing.assert_allclose(np.diff(np.diff(sigmas ** (1 / 7))), 0, atol=1e-5)
  # σ_to_t inverts the table exactly at integer timesteps.
  np.testing.assert_allclose(
    solvers.sigma_to_t(jnp.asarray(table[[0, 10, 500, 999]]), sched), [0, 10, 500, 999], atol=2e-3
  )


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize('sampler', SOLVERS + ('ddim',))
def test_sharded_batch_matches_single_device(sampler):
  sched = diffusion.Schedule.create('scaled_linear', T)
  model_fn = _gaussian_model(sched, 'v')
  x_T = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
  run = functools.partial(
    _sample, model_fn, sched, rng=jax.random.key(1), sampler=sampler, steps=6, prediction_type='v'
  )
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  sharded = run(jax.device_put(x_T, sharding))
  single = run(jax.device_put(x_T, jax.devices()[0]))
  assert sharded.sharding.is_equivalent_to(sharding, x_T.ndim)
  np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- timestep spacing


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_min_snr_weights_match_diffusers(schedule):
  """zoo's ε weights equal diffusers' train_text_to_image.py `--snr_gamma` weights."""
  from diffusers.training_utils import compute_snr
  betas = np.asarray(diffusion.make_betas(schedule, T))
  sch = DDIMScheduler(num_train_timesteps=T, trained_betas=betas.tolist())
  sch.alphas_cumprod = torch.from_numpy(np.cumprod(1 - betas))  # float64, as zoo's table
  t = np.array([0, 3, 40, 250, 600, 999])
  snr = compute_snr(sch, torch.from_numpy(t))
  gamma = torch.full_like(snr, 5.0)
  want = torch.stack([snr, gamma], dim=1).min(dim=1)[0] / snr
  got = diffusion.snr_weights('epsilon', diffusion.Schedule.create(schedule, T), t, 5.0)
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-4)


@pytest.mark.parametrize('spacing', diffusion.TIMESTEP_SPACINGS)
@pytest.mark.parametrize('steps', [1, 3, 7, 50, 1000])
def test_timestep_spacing_matches_diffusers(spacing, steps):
  sch = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=0)
  sch.set_timesteps(steps)
  ts = diffusion.timesteps_for(T, steps, spacing)
  if not (spacing == 'linspace' and steps == 1):  # zoo's single step starts from T-1
    np.testing.assert_array_equal(ts[::-1], sch.timesteps.numpy())
  assert len(np.unique(ts)) == steps and ts.dtype == np.int32


@pytest.mark.parametrize('spacing', ['leading', 'trailing'])
def test_ddim_spacing_matches_diffusers_trajectory(spacing):
  # Steps divide T, so diffusers' prev_t = t - T // S is the next listed timestep, as in zoo.
  sched = diffusion.Schedule.create('scaled_linear', T)
  model_fn = _gaussian_model(sched)
  x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  x = diffusion.sample(
    model_fn, sched, x_T, jax.random.key(1), steps=20, clip_x0=False, timestep_spacing=spacing
  )
  sch = DDIMScheduler(
    num_train_timesteps=T,
    trained_betas=diffusion.make_betas('scaled_linear', T).tolist(),
    timestep_spacing=spacing,
    steps_offset=0,
    set_alpha_to_one=True,
    clip_sample=False,
  )
  sch.alphas_cumprod = torch.from_numpy(np.array(sched.alphas_cumprod))
  sch.set_timesteps(20)
  ref = torch.from_numpy(np.array(x_T))
  for t in sch.timesteps:
    eps = model_fn(jnp.asarray(ref.numpy()), jnp.full((2,), int(t)))
    ref = sch.step(torch.from_numpy(np.array(eps)), t, ref).prev_sample
  np.testing.assert_allclose(x, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_option_errors():
  sched = diffusion.Schedule.create('linear', T)
  args = (lambda x, t: x, sched, jnp.zeros((1, 2)), jax.random.key(0))
  with pytest.raises(ValueError, match='trailing'):
    diffusion.timesteps_for(T, 10, 'uniform')
  with pytest.raises(ValueError, match='ddpm/ddim only'):
    diffusion.sample(*args, sampler='euler', timestep_spacing='leading')
  with pytest.raises(ValueError, match='steps'):
    diffusion.sample(*args, sampler='heun', steps=0)
  with pytest.raises(ValueError, match='dpmpp_2m'):
    solvers.solve(*args[:3], solver='ddim', steps=3, prediction_type='v', clip_x0=False)
