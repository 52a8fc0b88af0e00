"""Forward process q(x_t | x_0) and the prediction parameterisations (ε, v, x0).

Legend: B batch; x has shape (B, ...) (e.g. BxHxWxC); t_B integer timesteps, one per
example (a scalar t is also accepted and broadcast to the whole batch).
With a = sqrt(ᾱ_t), s = sqrt(1 - ᾱ_t): x_t = a·x0 + s·ε and v = a·ε - s·x0.
"""

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


def loss(prediction_type, sched, pred, x0, noise, t):
  """Per-example mean squared error (B,) between `pred` and the target.

  The weighting is uniform over timesteps in the chosen parameterisation (the "simple"
  loss of DDPM for ε); no SNR reweighting is applied. Computed in float32.
  """
  tgt = target(prediction_type, sched, x0, noise, t)
  err = jnp.square(pred.astype(jnp.float32) - tgt.astype(jnp.float32))
  return jnp.mean(jnp.reshape(err, (err.shape[0], -1)), axis=1)
