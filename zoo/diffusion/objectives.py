"""Forward process q(x_t | x_0) and the prediction parameterisations (ε, v, x0).

Legend: B batch; x has shape (B, ...) (e.g. BxHxWxC); t_B integer timesteps, one per
example (a scalar t is also accepted and broadcast to the whole batch).
With a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t): x_t = a·x0 + s·ε and v = a·ε - s·x0.
The learned-variance functions (bottom) follow iDDPM, whose `v` is a different quantity: the
network's variance interpolation output in [-1, 1], not the v-prediction target.
"""

import jax
import jax.numpy as jnp

PREDICTION_TYPES = ('epsilon', 'v', 'x0')


def check_prediction_type(prediction_type):
  """Raises ValueError unless `prediction_type` is one of PREDICTION_TYPES."""
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f'Unknown prediction_type={prediction_type!r}; allowed: {PREDICTION_TYPES}.')


def _coef(arr_T, t_B, x):
  """Gathers arr_T[t] shaped (B, 1, ..., 1) to broadcast against x without rank promotion."""
  return jnp.reshape(arr_T[t_B], (-1,) + (1,) * (x.ndim - 1))


def q_sample(sched, x0, t_B, noise):
  """Draws x_t ~ q(x_t | x_0) = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·noise."""
  return (
    _coef(sched.sqrt_alphas_cumprod, t_B, x0) * x0
    + _coef(sched.sqrt_one_minus_alphas_cumprod, t_B, x0) * noise
  )


def target(prediction_type, sched, x0, noise, t):
  """The regression target for the network: ε, v or x0."""
  check_prediction_type(prediction_type)
  if prediction_type == 'epsilon':
    return noise
  if prediction_type == 'x0':
    return x0
  return (
    _coef(sched.sqrt_alphas_cumprod, t, x0) * noise
    - _coef(sched.sqrt_one_minus_alphas_cumprod, t, x0) * x0
  )


def to_eps_and_x0(prediction_type, sched, x_t, t, pred):
  """Converts a network prediction at (x_t, t) into the implied (ε, x0) pair."""
  check_prediction_type(prediction_type)
  a = _coef(sched.sqrt_alphas_cumprod, t, x_t)
  s = _coef(sched.sqrt_one_minus_alphas_cumprod, t, x_t)
  if prediction_type == 'epsilon':
    return pred, (x_t - s * pred) / a
  if prediction_type == 'x0':
    return (x_t - a * pred) / s, pred
  # a² + s² = 1 makes the v inversion a rotation, free of divisions.
  return s * x_t + a * pred, a * x_t - s * pred


def snr_weights(prediction_type, sched, t, gamma):
  """Min-SNR-γ loss weights (Hang et al. 2023; diffusers' `--snr_gamma`), shape (B,).

  With SNR_t = ᾱ_t / (1 - ᾱ_t), the weight that turns each parameterisation's MSE into
  min(SNR_t, γ) times the x0 error: min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v and
  min(SNR, γ) for x0. High-SNR (low-noise) steps, easy to denoise, stop dominating the
  gradient. gamma = 0 gives ones: the unweighted loss.
  """
  check_prediction_type(prediction_type)
  if gamma < 0:
    raise ValueError(f'snr_gamma={gamma} must be >= 0 (0 = unweighted)')
  t = jnp.asarray(t)
  if gamma == 0:
    return jnp.ones(t.shape, jnp.float32)
  snr = jnp.square(sched.sqrt_alphas_cumprod[t] / sched.sqrt_one_minus_alphas_cumprod[t])
  clipped = jnp.minimum(snr, gamma)
  if prediction_type == 'epsilon':
    return clipped / snr
  if prediction_type == 'v':
    return clipped / (snr + 1.0)
  return clipped


def loss(prediction_type, sched, pred, x0, noise, t, snr_gamma=0.0):
  """Per-example mean squared error (B,) between `pred` and the target.

  Uniform over timesteps in the chosen parameterisation (the "simple" loss of DDPM for ε)
  unless `snr_gamma` > 0 applies the min-SNR-γ weights of `snr_weights`. Computed in float32.
  """
  tgt = target(prediction_type, sched, x0, noise, t)
  err = jnp.square(pred.astype(jnp.float32) - tgt.astype(jnp.float32))
  mse = jnp.mean(jnp.reshape(err, (err.shape[0], -1)), axis=1)
  if snr_gamma == 0:
    return mse
  return mse * jnp.broadcast_to(snr_weights(prediction_type, sched, t, snr_gamma), mse.shape)


# Learned variance (iDDPM "learned range", ADM/DiT `gaussian_diffusion.py` with learn_sigma).
# Posterior q(x_{t-1} | x_t, x0) = N(c1·x0 + c2·x_t, β̃_t), β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t),
# c1 = β_t sqrt(ᾱ_{t-1}) / (1 - ᾱ_t), c2 = sqrt(1 - β_t) (1 - ᾱ_{t-1}) / (1 - ᾱ_t).
# 1 - ᾱ is taken as sqrt_one_minus_alphas_cumprod² (computed in float64 by the schedule): the
# float32 difference 1 - ᾱ_t loses ~3 digits at small t.
_BIN_HALF_WIDTH = 1.0 / 255.0  # Data in [-1, 1] quantised to 256 levels (ADM's decoder).
_LOG_FLOOR = 1e-12


def _posterior(sched):
  """(c1, c2, clipped log β̃) as (T,) float32 arrays; β̃_0 = 0 is clipped to β̃_1 (as ADM)."""
  one_minus_ab = jnp.square(sched.sqrt_one_minus_alphas_cumprod)
  one_minus_ab_prev = jnp.concatenate([jnp.zeros((1,), jnp.float32), one_minus_ab[:-1]])
  ab_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), sched.alphas_cumprod[:-1]])
  var = sched.betas * one_minus_ab_prev / one_minus_ab
  log_var = jnp.log(jnp.concatenate([var[1:2], var[1:]]))
  c1 = sched.betas * jnp.sqrt(ab_prev) / one_minus_ab
  c2 = jnp.sqrt(1.0 - sched.betas) * one_minus_ab_prev / one_minus_ab
  return c1, c2, log_var


def learned_range_variance(sched, v, t_B):
  """Log-variance of p(x_{t-1} | x_t): frac·log β_t + (1 - frac)·log β̃_t, frac = (v + 1)/2.

  `v` is the network's second output half (any shape (B, ...)); v = 1 gives β_t, v = -1 the
  (clipped) posterior β̃_t. Not clipped to [-1, 1], as in ADM.
  """
  _, _, log_var_T = _posterior(sched)
  frac = (v.astype(jnp.float32) + 1.0) / 2.0
  return frac * _coef(jnp.log(sched.betas), t_B, v) + (1.0 - frac) * _coef(log_var_T, t_B, v)


def _normal_kl(mean1, logvar1, mean2, logvar2):
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log P(bin of x) under N(mean, exp(log_scale)²) for x in [-1, 1] on 256 levels.

  Bins are x ± 1/255; the edge bins extend to ∓∞. Uses the exact normal CDF (log_ndtr, stable
  in the tails) where ADM uses a tanh approximation; probabilities are floored at 1e-12 as ADM.
  """
  inv_std = jnp.exp(-log_scale)
  upper = inv_std * (x - mean + _BIN_HALF_WIDTH)
  lower = inv_std * (x - mean - _BIN_HALF_WIDTH)
  log_cdf_upper = jax.scipy.special.log_ndtr(upper)
  log_sf_lower = jax.scipy.special.log_ndtr(-lower)
  mid = jnp.log(jnp.maximum(
      jax.scipy.special.ndtr(upper) - jax.scipy.special.ndtr(lower), _LOG_FLOOR))
  return jnp.where(x < -0.999, jnp.maximum(log_cdf_upper, jnp.log(_LOG_FLOOR)),
                   jnp.where(x > 0.999, jnp.maximum(log_sf_lower, jnp.log(_LOG_FLOOR)), mid))


def _mean_bits(x):
  return jnp.mean(jnp.reshape(x, (x.shape[0], -1)), axis=1) / jnp.log(2.0)


def vlb_loss(sched, x0, x_t, t_B, eps_pred, v):
  """Per-example (B,) variational-bound term in bits per dimension (iDDPM hybrid loss).

  KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the discretized-Gaussian NLL of
  x0 for t = 0, where p has the mean implied by a STOP-GRADIENTED `eps_pred` and the learned
  variance of `v` (learned_range_variance). Only `v` gets gradients, so the hybrid loss is
  `loss(...) + vlb_loss(...)`; ADM's rescaling by T/1000 applies only to its RESCALED_MSE.
  """
  eps = jax.lax.stop_gradient(eps_pred.astype(jnp.float32))
  x0, x_t = x0.astype(jnp.float32), x_t.astype(jnp.float32)
  t_B = jnp.broadcast_to(jnp.asarray(t_B, jnp.int32), (x0.shape[0],))
  c1_T, c2_T, true_log_var_T = _posterior(sched)
  _, x0_pred = to_eps_and_x0('epsilon', sched, x_t, t_B, eps)
  pred_mean = _coef(c1_T, t_B, x_t) * x0_pred + _coef(c2_T, t_B, x_t) * x_t
  true_mean = _coef(c1_T, t_B, x_t) * x0 + _coef(c2_T, t_B, x_t) * x_t
  pred_log_var = learned_range_variance(sched, v, t_B)
  kl_B = _mean_bits(_normal_kl(true_mean, _coef(true_log_var_T, t_B, x_t), pred_mean,
                               pred_log_var))
  nll_B = -_mean_bits(discretized_gaussian_log_likelihood(x0, pred_mean, 0.5 * pred_log_var))
  return jnp.where(t_B == 0, nll_B, kl_B)


def ddpm_learned_variance_step(x_t, x0, ab_t, ab_prev, v, z):
  """One ancestral DDPM step of a (respaced) chain with the learned variance.

  The drop-in for `samplers._ddpm_step` when the model has learn_sigma: scalars ab_t = ᾱ_t and
  ab_prev = ᾱ of the next (less noisy) sampled step, or 1 on the last step; `x0` the predicted
  (optionally clipped) x0; `v` the model's second half; `z` standard noise. β and β̃ are those
  of the respaced chain (β' = 1 - ab_t/ab_prev), as ADM's respacing recomputes them; on the
  full chain the variance equals `learned_range_variance`. The last step adds no noise.
  """
  beta = 1.0 - ab_t / ab_prev
  mean = (jnp.sqrt(ab_prev) * beta * x0 + jnp.sqrt(1.0 - beta) * (1.0 - ab_prev) * x_t) / (
      1.0 - ab_t)
  frac = (v.astype(jnp.float32) + 1.0) / 2.0
  last = ab_prev >= 1.0
  # β̃' is 0 on the last step; any finite stand-in is fine since that step adds no noise.
  tilde = jnp.where(last, beta, beta * (1.0 - ab_prev) / (1.0 - ab_t))
  log_var = frac * jnp.log(beta) + (1.0 - frac) * jnp.log(tilde)
  return mean + jnp.where(last, 0.0, jnp.exp(0.5 * log_var)) * z
