"""Tests for zoo.diffusion: schedules, forward process, parameterisations, samplers, CFG."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import diffusion

jax.config.update('jax_numpy_rank_promotion', 'raise')

T = 1000
# Jitted once per (model_fn, static args) so repeated calls in a test reuse the compile.
_sample = jax.jit(
  diffusion.sample, static_argnames=('model_fn', 'sampler', 'steps', 'prediction_type', 'clip_x0')
)


# ---------------------------------------------------------------- schedules


def test_linear_schedule_closed_form():
  np.testing.assert_allclose(diffusion.make_betas('linear', 1000), np.linspace(1e-4, 0.02, 1000))
  # ADM/DiT rescale the endpoints by 1000/T.
  betas = diffusion.make_betas('linear', 250)
  np.testing.assert_allclose(betas[[0, -1]], [4e-4, 0.08], rtol=1e-12)
  np.testing.assert_allclose(np.diff(betas), (0.08 - 4e-4) / 249, rtol=1e-9)


def test_scaled_linear_schedule_closed_form():
  betas = diffusion.make_betas('scaled_linear', T)
  np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-12)
  np.testing.assert_allclose(
    np.diff(np.sqrt(betas)), (math.sqrt(0.012) - math.sqrt(0.00085)) / (T - 1), rtol=1e-9
  )


def test_cosine_schedule_matches_cos_squared_alpha_bar():
  def f(u):
    return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2

  sched = diffusion.Schedule.create('cosine', T)
  betas = np.asarray(sched.betas)
  unclipped = betas < 0.999
  t = np.arange(T)[unclipped]
  # Before any clipping the cumulative product telescopes to ᾱ((t+1)/T) / ᾱ(0).
  np.testing.assert_allclose(
    np.asarray(sched.alphas_cumprod)[t], f((t + 1) / T) / f(0), rtol=1e-5, atol=1e-7
  )
  assert unclipped.sum() >= T - 2 and betas[-1] == pytest.approx(0.999)


@pytest.mark.parametrize('name', diffusion.SCHEDULES)
def test_schedule_invariants(name):
  sched = diffusion.Schedule.create(name, T)
  assert sched.num_timesteps == T
  assert all(leaf.dtype == jnp.float32 and leaf.shape == (T,) for leaf in jax.tree.leaves(sched))
  betas, ab = np.asarray(sched.betas), np.asarray(sched.alphas_cumprod)
  assert np.all(betas > 0) and np.all(betas <= 0.999)
  assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < ab[0] < 1
  np.testing.assert_allclose(np.asarray(sched.sqrt_alphas_cumprod) ** 2, ab, rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(sched.sqrt_one_minus_alphas_cumprod) ** 2, 1 - ab, rtol=1e-5, atol=1e-7
  )


def test_schedule_is_a_pytree_for_jit():
  sched = diffusion.Schedule.create('linear', T)
  total = jax.jit(lambda s: jnp.sum(s.alphas_cumprod))(sched)
  np.testing.assert_allclose(total, np.sum(np.cumprod(1 - np.linspace(1e-4, 0.02, T))), rtol=1e-5)


def test_schedule_errors():
  with pytest.raises(ValueError, match='scaled_linear'):
    diffusion.Schedule.create('quadratic', T)
  with pytest.raises(ValueError, match='num_timesteps'):
    diffusion.make_betas('linear', 0)
  # The 1000/T scaling pushes linear betas past 1 for short chains.
  with pytest.raises(ValueError, match='outside'):
    diffusion.make_betas('linear', 10)
  with pytest.raises(ValueError, match='cosine'):
    diffusion.make_betas('cosine', T, beta_end=0.02)


# ---------------------------------------------------------------- forward process


@pytest.mark.parametrize('t', [0, 400, T - 1])
def test_q_sample_statistics(t):
  sched = diffusion.Schedule.create('linear', T)
  n = 20000
  x0 = jnp.broadcast_to(jnp.array([-1.0, -0.3, 0.5, 1.0]).reshape(1, 2, 2, 1), (n, 2, 2, 1))
  noise = jax.random.normal(jax.random.key(t), x0.shape)
  x_t = diffusion.q_sample(sched, x0, jnp.full((n,), t), noise)
  ab = float(np.cumprod(1 - np.linspace(1e-4, 0.02, T))[t])
  np.testing.assert_allclose(x_t.mean(0), math.sqrt(ab) * x0[0], atol=4 * math.sqrt(1 / n))
  np.testing.assert_allclose(x_t.var(0), np.full(x0.shape[1:], 1 - ab), rtol=0.05, atol=1e-8)


def test_q_sample_uses_each_examples_timestep():
  sched = diffusion.Schedule.create('scaled_linear', T)
  t_B = jnp.array([0, 10, 500, 999])
  ones = jnp.ones((4, 3, 3, 2))
  ab = np.cumprod(1 - diffusion.make_betas('scaled_linear', T))[np.asarray(t_B)]
  ab = ab.reshape(4, 1, 1, 1)
  np.testing.assert_allclose(
    diffusion.q_sample(sched, ones, t_B, 0 * ones), np.sqrt(ab) * ones, rtol=1e-6
  )
  np.testing.assert_allclose(
    diffusion.q_sample(sched, 0 * ones, t_B, ones), np.sqrt(1 - ab) * ones, rtol=1e-5
  )


def _example_batch(seed=0, shape=(6, 4, 4, 3)):
  k0, k1 = jax.random.split(jax.random.key(seed))
  x0 = jax.random.uniform(k0, shape, minval=-1, maxval=1)
  noise = jax.random.normal(k1, shape)
  t_B = jnp.array([0, 1, 50, 500, 900, T - 1])
  return x0, noise, t_B


@pytest.mark.parametrize('prediction_type', diffusion.PREDICTION_TYPES)
def test_target_round_trip(prediction_type):
  sched = diffusion.Schedule.create('linear', T)
  x0, noise, t_B = _example_batch()
  x_t = diffusion.q_sample(sched, x0, t_B, noise)
  pred = diffusion.target(prediction_type, sched, x0, noise, t_B)
  eps, x0_hat = diffusion.to_eps_and_x0(prediction_type, sched, x_t, t_B, pred)
  np.testing.assert_allclose(eps, noise, atol=2e-3)
  np.testing.assert_allclose(x0_hat, x0, atol=2e-3)


def test_v_target_closed_form():
  sched = diffusion.Schedule.create('cosine', T)
  x0, noise, t_B = _example_batch(1)
  ab = np.cumprod(1 - diffusion.make_betas('cosine', T))[np.asarray(t_B)].reshape(-1, 1, 1, 1)
  expected = np.sqrt(ab) * np.asarray(noise) - np.sqrt(1 - ab) * np.asarray(x0)
  np.testing.assert_allclose(diffusion.target('v', sched, x0, noise, t_B), expected, atol=1e-5)


def test_loss_is_per_example_mse():
  sched = diffusion.Schedule.create('linear', T)
  x0, noise, t_B = _example_batch(2)
  shift = jnp.arange(6, dtype=jnp.float32).reshape(6, 1, 1, 1)
  for prediction_type in diffusion.PREDICTION_TYPES:
    tgt = diffusion.target(prediction_type, sched, x0, noise, t_B)
    losses = diffusion.loss(prediction_type, sched, tgt + shift, x0, noise, t_B)
    assert losses.shape == (6,)
    np.testing.assert_allclose(losses, np.arange(6) ** 2, atol=1e-4)


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_min_snr_weights(schedule):
  sched = diffusion.Schedule.create(schedule, T)
  t_B = jnp.array([0, 10, 200, 500, 999])
  ab = np.asarray(diffusion.make_betas(schedule, T), np.float64)
  ab = np.cumprod(1.0 - ab)[np.asarray(t_B)]
  snr = ab / (1.0 - ab)
  clipped = np.minimum(snr, 5.0)
  expected = {'epsilon': clipped / snr, 'v': clipped / (snr + 1.0), 'x0': clipped}
  for prediction_type, want in expected.items():
    got = diffusion.snr_weights(prediction_type, sched, t_B, 5.0)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_array_equal(diffusion.snr_weights(prediction_type, sched, t_B, 0.0), 1.0)
  # For ε every weight lies in (0, 1], 1 exactly where SNR <= γ (the noisy steps).
  eps = np.asarray(expected['epsilon'])
  assert eps[0] < 1e-2 and eps[-1] == 1.0
  with pytest.raises(ValueError, match='snr_gamma'):
    diffusion.snr_weights('epsilon', sched, t_B, -1.0)


def test_min_snr_loss_scales_each_example():
  sched = diffusion.Schedule.create('cosine', T)
  x0, noise, t_B = _example_batch(2)
  for prediction_type in diffusion.PREDICTION_TYPES:
    pred = diffusion.target(prediction_type, sched, x0, noise, t_B) + 1.0
    plain = diffusion.loss(prediction_type, sched, pred, x0, noise, t_B)
    weighted = diffusion.loss(prediction_type, sched, pred, x0, noise, t_B, snr_gamma=5.0)
    np.testing.assert_allclose(
        weighted, plain * diffusion.snr_weights(prediction_type, sched, t_B, 5.0), rtol=1e-6)
    assert not np.allclose(weighted, plain)


def test_unknown_prediction_type():
  sched = diffusion.Schedule.create('linear', T)
  x0, noise, t_B = _example_batch()
  with pytest.raises(ValueError, match='epsilon'):
    diffusion.target('score', sched, x0, noise, t_B)


# ---------------------------------------------------------------- samplers


def test_timesteps_for():
  np.testing.assert_array_equal(diffusion.timesteps_for(T, T), np.arange(T))
  np.testing.assert_array_equal(diffusion.timesteps_for(T, 1), [T - 1])
  ts = diffusion.timesteps_for(T, 50)
  assert len(ts) == 50 and ts[0] == 0 and ts[-1] == T - 1
  assert set(np.diff(ts)) <= {20, 21}
  for steps in (2, 3, 7, 333, 999):
    ts = diffusion.timesteps_for(T, steps)
    assert len(np.unique(ts)) == steps and np.all(np.diff(ts) > 0)


@pytest.mark.parametrize('steps', [0, -3, T + 1, 2.5])
def test_steps_validation(steps):
  with pytest.raises(ValueError, match='steps'):
    diffusion.timesteps_for(T, steps)
  sched = diffusion.Schedule.create('linear', T)
  with pytest.raises(ValueError, match='steps'):
    diffusion.sample(lambda x, t: x, sched, jnp.zeros((1, 2)), jax.random.key(0), steps=steps)


def test_sample_rejects_unknown_names():
  sched = diffusion.Schedule.create('linear', T)
  args = (lambda x, t: x, sched, jnp.zeros((1, 2)), jax.random.key(0))
  with pytest.raises(ValueError, match='ddim'):
    diffusion.sample(*args, sampler='plms')
  with pytest.raises(ValueError, match='epsilon'):
    diffusion.sample(*args, prediction_type='score')


MU, STD = 0.3, 0.5


def _gaussian_data_model(sched, prediction_type):
  """The exact prediction for data x0 ~ N(MU, STD²) per pixel, in closed form."""

  def model_fn(x_t, t_B):
    ab = sched.alphas_cumprod[t_B].reshape(-1, 1, 1, 1)
    var_t = ab * STD**2 + 1 - ab
    eps = jnp.sqrt(1 - ab) * (x_t - jnp.sqrt(ab) * MU) / var_t
    x0 = MU + jnp.sqrt(ab) * STD**2 * (x_t - jnp.sqrt(ab) * MU) / var_t
    return {'epsilon': eps, 'x0': x0, 'v': jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0}[
      prediction_type
    ]

  return model_fn


@pytest.mark.parametrize(
  'sampler, steps, prediction_type, name, tol',
  [
    # DDIM is a first-order ODE solver: at 50 steps it loses ~3% of the std even with
    # the exact model; at 10 steps it loses ~25%, which these tolerances reject.
    ('ddim', 50, 'epsilon', 'cosine', 0.025),
    ('ddim', 50, 'v', 'cosine', 0.025),
    ('ddim', 50, 'x0', 'scaled_linear', 0.035),
    ('ddpm', 1000, 'epsilon', 'linear', 0.012),
    ('ddpm', 100, 'v', 'cosine', 0.03),
  ],
)
def test_sampler_recovers_gaussian_data(sampler, steps, prediction_type, name, tol):
  sched = diffusion.Schedule.create(name, T)
  x_T = jax.random.normal(jax.random.key(0), (16, 32, 32, 1))
  x = diffusion.sample(
    _gaussian_data_model(sched, prediction_type),
    sched,
    x_T,
    jax.random.key(1),
    sampler=sampler,
    steps=steps,
    prediction_type=prediction_type,
    clip_x0=False,
  )
  assert x.shape == x_T.shape and x.dtype == jnp.float32
  assert abs(float(x.mean()) - MU) < 0.015
  assert abs(float(x.std()) - STD) < tol


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
  sched = diffusion.Schedule.create('linear', T)
  model_fn = _gaussian_data_model(sched, 'epsilon')
  x_T = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
  run = functools.partial(_sample, model_fn, sched, x_T, steps=20)
  np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(2)))
  ddpm_1 = run(jax.random.key(1), sampler='ddpm')
  np.testing.assert_array_equal(ddpm_1, run(jax.random.key(1), sampler='ddpm'))
  assert np.abs(np.asarray(ddpm_1 - run(jax.random.key(2), sampler='ddpm'))).min() > 0


def test_ddpm_equals_ddim_with_eta_one():
  # Two different formulas (posterior mean vs. Song et al. eq. 12) for the same chain.
  sched = diffusion.Schedule.create('scaled_linear', T)
  model_fn = _gaussian_data_model(sched, 'epsilon')
  x_T = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  run = functools.partial(_sample, model_fn, sched, x_T, jax.random.key(3), steps=25, clip_x0=False)
  np.testing.assert_allclose(run(sampler='ddpm'), run(sampler='ddim', eta=1.0), atol=1e-4)


def _zero_model_recording(seen):
  """model_fn(x, t_B) = 0 that appends each call's timesteps to `seen`."""
  def model_fn(x, t_B):
    jax.debug.callback(lambda t: seen.append(np.asarray(t).tolist()), t_B, ordered=True)
    return jnp.zeros_like(x)
  return model_fn


def test_sampler_visits_respaced_timesteps_in_descending_order():
  sched = diffusion.Schedule.create('linear', T)
  seen = []
  model_fn = _zero_model_recording(seen)

  diffusion.sample(model_fn, sched, jnp.zeros((2, 1)), jax.random.key(0), steps=7)
  jax.effects_barrier()
  assert seen == [[t, t] for t in diffusion.timesteps_for(T, 7)[::-1].tolist()]


def test_steps_offset_shifts_the_grid_and_set_alpha_to_one_sets_the_last_target():
  sched = diffusion.Schedule.create('scaled_linear', T)
  seen = []
  model_fn = _zero_model_recording(seen)

  x_T = jnp.ones((1, 1))
  run = functools.partial(diffusion.sample, model_fn, sched, x_T, jax.random.key(0), steps=4,
                          sampler='ddim', timestep_spacing='leading', clip_x0=False)
  last = run(steps_offset=1, set_alpha_to_one=False)
  jax.effects_barrier()
  assert seen == [[751], [501], [251], [1]]
  # ε = 0: x0 = x_t / sqrt(ᾱ_t) at t = 1, then lands on sqrt(ᾱ_0) x0 rather than x0.
  ab = np.asarray(sched.alphas_cumprod, np.float64)
  np.testing.assert_allclose(np.asarray(last)[0, 0], np.sqrt(ab[0] / ab[751]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(run())[0, 0], np.sqrt(1 / ab[750]), rtol=1e-5)
  with pytest.raises(ValueError, match='steps_offset=250'):
    run(steps_offset=250)
  with pytest.raises(ValueError, match='ddpm/ddim only'):
    run(sampler='euler', timestep_spacing='linspace', steps_offset=1)


def test_clip_x0():
  sched = diffusion.Schedule.create('linear', T)
  x_T = jnp.zeros((2, 3, 3, 1))
  const = lambda x, t: jnp.full_like(x, 5.0)
  run = functools.partial(
    diffusion.sample, const, sched, x_T, jax.random.key(0), steps=5, prediction_type='x0'
  )
  np.testing.assert_allclose(run(clip_x0=True), 1.0, rtol=1e-6)
  np.testing.assert_allclose(run(clip_x0=False), 5.0, rtol=1e-6)


def test_sample_is_one_scan_and_jittable():
  sched = diffusion.Schedule.create('linear', T)
  calls = []

  def model_fn(x, t_B):
    calls.append(t_B.shape)
    return _gaussian_data_model(sched, 'epsilon')(x, t_B)

  x_T = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  out = _sample(model_fn, sched, x_T, jax.random.key(1), sampler='ddim', steps=40, eta=0.5)
  assert calls == [(3,)]  # traced once for all 40 steps
  eager = diffusion.sample(model_fn, sched, x_T, jax.random.key(1), steps=40, eta=0.5)
  np.testing.assert_allclose(out, eager, atol=1e-5)


# ---------------------------------------------------------------- guidance


def test_classifier_free_guidance():
  batch_shapes = []

  def pred_fn(x, t_B, c):
    batch_shapes.append((x.shape[0], t_B.shape[0], c['label'].shape[0]))
    return x * c['label'].reshape(-1, 1, 1, 1) + t_B.reshape(-1, 1, 1, 1)

  cond = {'label': jnp.array([2.0, 3.0])}
  uncond = {'label': jnp.zeros((2,))}
  x = jnp.arange(16, dtype=jnp.float32).reshape(2, 2, 2, 2)
  t_B = jnp.array([7, 9])
  t = np.array([7.0, 9.0]).reshape(2, 1, 1, 1)
  c = np.asarray(x) * np.array([2.0, 3.0]).reshape(2, 1, 1, 1) + t
  u = 0 * np.asarray(x) + t
  for scale in (0.0, 1.0, 4.0):
    batch_shapes.clear()
    guided = diffusion.classifier_free_guidance(pred_fn, cond, uncond, scale)(x, t_B)
    assert batch_shapes == [(4, 4, 4)]
    np.testing.assert_allclose(guided, u + scale * (c - u), rtol=1e-6)
