"""Learned σ (iDDPM hybrid loss): variance interpolation, VLB term, discretized NLL, DDPM hook."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from zoo import diffusion
from zoo.diffusion import objectives, samplers

# β = 0.1, 0.2, 0.3, 0.4 -> ᾱ = 0.9, 0.72, 0.504, 0.3024: small enough to do by hand.
SCHED = diffusion.Schedule.create('linear', 4, beta_start=0.1, beta_end=0.4)
ALPHA_BAR = np.array([0.9, 0.72, 0.504, 0.3024])
BETA = np.array([0.1, 0.2, 0.3, 0.4])


def _posterior_var(t):
  return BETA[t] * (1 - ALPHA_BAR[t - 1]) / (1 - ALPHA_BAR[t])


def _batch(t_B, seed=0, shape=(4, 4, 3)):
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (len(t_B), *shape)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  return x0, noise, np.asarray(diffusion.q_sample(SCHED, x0, t_B, noise))


def test_learned_range_endpoints_and_clipped_t0():
  t_B = np.array([0, 1, 3])
  ones = np.ones((3, 2, 2, 1), np.float32)
  top = np.asarray(diffusion.learned_range_variance(SCHED, ones, t_B))[:, 0, 0, 0]
  bottom = np.asarray(diffusion.learned_range_variance(SCHED, -ones, t_B))[:, 0, 0, 0]
  np.testing.assert_allclose(top, np.log(BETA[[0, 1, 3]]), rtol=1e-6)
  # β̃_0 = 0, so t = 0 uses β̃_1 (ADM's posterior_log_variance_clipped).
  np.testing.assert_allclose(bottom, np.log([_posterior_var(1), _posterior_var(1),
                                             _posterior_var(3)]), rtol=1e-5)
  mid = np.asarray(diffusion.learned_range_variance(SCHED, 0 * ones, t_B))[:, 0, 0, 0]
  np.testing.assert_allclose(mid, (top + bottom) / 2, rtol=1e-6)


def test_kl_is_zero_at_the_true_posterior_and_closed_form_at_beta():
  t_B = np.array([1, 2, 3])
  x0, noise, x_t = _batch(t_B)
  exact = diffusion.vlb_loss(SCHED, x0, x_t, t_B, noise, -np.ones_like(noise))
  np.testing.assert_allclose(exact, 0.0, atol=2e-6)
  # Same mean, variance β instead of β̃: KL = (-1 + log β - log β̃ + β̃/β) / 2 nats per dim.
  at_beta = diffusion.vlb_loss(SCHED, x0, x_t, t_B, noise, np.ones_like(noise))
  var = np.array([_posterior_var(t) for t in t_B])
  want = 0.5 * (-1 + np.log(BETA[t_B]) - np.log(var) + var / BETA[t_B]) / np.log(2)
  np.testing.assert_allclose(at_beta, want, rtol=1e-4)


def test_hand_computed_kl_at_t1():
  """One scalar pixel, t = 1, v = 0, worked through DDPM eqs. 6-7 in float64."""
  x0, x_t, eps, v = 0.5, 0.3, 0.2, 0.0
  a1, b1 = 0.72, 0.2
  tilde = b1 * (1 - 0.9) / (1 - a1)  # 0.0714285...
  c1, c2 = b1 * np.sqrt(0.9) / (1 - a1), np.sqrt(1 - b1) * (1 - 0.9) / (1 - a1)
  x0_pred = (x_t - np.sqrt(1 - a1) * eps) / np.sqrt(a1)
  mean_q, mean_p = c1 * x0 + c2 * x_t, c1 * x0_pred + c2 * x_t
  logvar_p = 0.5 * np.log(b1) + 0.5 * np.log(tilde)
  kl_nats = 0.5 * (-1 + logvar_p - np.log(tilde) + tilde / np.exp(logvar_p)
                   + (mean_q - mean_p) ** 2 / np.exp(logvar_p))
  got = diffusion.vlb_loss(SCHED, np.full((1, 1), x0, np.float32),
                           np.full((1, 1), x_t, np.float32), np.array([1]),
                           np.full((1, 1), eps, np.float32), np.full((1, 1), v, np.float32))
  np.testing.assert_allclose(got, [kl_nats / np.log(2)], rtol=1e-5)
  assert kl_nats > 0.01  # Both the variance and the mean mismatch contribute.


@pytest.mark.parametrize('x,mean,scale', [
    (0.0, 0.0, 0.01), (0.2509804, 0.25, 0.003), (-0.5, -0.4, 0.2), (-1.0, -0.97, 0.05),
    (1.0, 0.9, 0.1), (0.7, 0.2, 1.5),
])
def test_discretized_likelihood_matches_numeric_integration(x, mean, scale):
  lower = -np.inf if x < -0.999 else x - 1 / 255
  upper = np.inf if x > 0.999 else x + 1 / 255
  prob, _ = integrate.quad(stats.norm(mean, scale).pdf, lower, upper, points=[mean]
                           if np.isfinite(lower) and np.isfinite(upper) and lower < mean < upper
                           else None, epsabs=1e-13)
  got = diffusion.discretized_gaussian_log_likelihood(
      jnp.float32(x), jnp.float32(mean), jnp.float32(np.log(scale)))
  np.testing.assert_allclose(np.exp(float(got)), prob, rtol=2e-4)


def test_t0_term_is_the_decoder_nll():
  t_B = np.array([0, 0])
  x0, noise, x_t = _batch(t_B, seed=2, shape=(3,))
  x0 = np.round(x0 * 127.5) / 127.5  # On the 256-level grid.
  eps_pred = noise + 0.3
  v = np.full_like(noise, 0.4)
  got = np.asarray(diffusion.vlb_loss(SCHED, x0, x_t, t_B, eps_pred, v))
  # At t = 0, ᾱ_prev = 1 makes the posterior mean the predicted x0 itself.
  x0_pred = (x_t - np.sqrt(0.1) * eps_pred) / np.sqrt(0.9)
  std = np.exp(0.5 * (0.7 * np.log(0.1) + 0.3 * np.log(_posterior_var(1))))
  lo = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
  hi = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
  prob = stats.norm.cdf(hi, x0_pred, std) - stats.norm.cdf(lo, x0_pred, std)
  want = -np.mean(np.log(prob), axis=1) / np.log(2)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_gradient_reaches_only_v():
  t_B = np.array([0, 1, 3])
  x0, noise, x_t = _batch(t_B, seed=3)
  eps_pred = noise + 0.1 * np.random.default_rng(4).standard_normal(noise.shape)
  v = np.random.default_rng(5).uniform(-1, 1, noise.shape).astype(np.float32)
  g_eps, g_v = jax.grad(lambda e, v: jnp.sum(diffusion.vlb_loss(SCHED, x0, x_t, t_B, e, v)),
                        argnums=(0, 1))(eps_pred.astype(np.float32), v)
  assert not np.any(np.asarray(g_eps))
  assert np.all(np.abs(np.asarray(g_v)).reshape(3, -1).max(axis=1) > 1e-4)


def test_gradient_descent_on_v_finds_the_posterior_variance():
  t_B = np.array([1, 2, 3])
  x0, noise, x_t = _batch(t_B, seed=6)
  loss = jax.jit(jax.value_and_grad(
      lambda v: jnp.sum(diffusion.vlb_loss(SCHED, x0, x_t, t_B, noise, v))))
  v = np.zeros_like(noise)
  first, _ = loss(v)
  for _ in range(300):
    value, grad = loss(v)
    v = v - 50.0 * grad
  assert float(value) < 1e-3 * float(first)
  np.testing.assert_allclose(v, -1.0, atol=0.05)  # -1 <=> β̃, the true posterior variance.


def test_ddpm_learned_variance_step():
  x_t = np.random.default_rng(7).standard_normal((2, 3)).astype(np.float32)
  x0 = np.clip(x_t * 0.5, -1, 1)
  v = np.array([[-1.0, 0.0, 1.0], [0.5, -0.5, 0.2]], np.float32)
  z = np.ones_like(x_t)
  for t in (1, 2, 3):
    ab_t, ab_prev = SCHED.alphas_cumprod[t], SCHED.alphas_cumprod[t - 1]
    mean = samplers._ddpm_step(x_t, x0, None, ab_t, ab_prev, 0.0, 0 * z)
    step = objectives.ddpm_learned_variance_step(x_t, x0, ab_t, ab_prev, v, z)
    want_std = np.exp(0.5 * np.asarray(diffusion.learned_range_variance(SCHED, v, t)))
    np.testing.assert_allclose(np.asarray(step) - np.asarray(mean), want_std, rtol=1e-4)
  last = objectives.ddpm_learned_variance_step(x_t, x0, SCHED.alphas_cumprod[0], 1.0, v, z)
  np.testing.assert_allclose(last, x0, rtol=1e-5, atol=1e-6)
