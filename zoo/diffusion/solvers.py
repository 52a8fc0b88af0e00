"""ODE solvers on σ schedules for discrete ε/v/x0 models: DPM-Solver++(2M), Euler and Heun.

Legend: B batch; x has shape (B, ...); S sampling steps; T training timesteps.
σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) is the noise-to-signal ratio of timestep t, so the VP sample
x_t and the σ-space sample x_σ = x_t·sqrt(σ² + 1) = x0 + σ·ε describe the same point.
A σ that is not on the table maps back to a fractional timestep by interpolating log σ
over the table (diffusers' `_sigma_to_t`); the model is called at that t.
"""

import jax
import jax.numpy as jnp

from zoo.diffusion import objectives

SOLVERS = ('dpmpp_2m', 'euler', 'heun')
KARRAS_RHO = 7.0


def table_sigmas(sched):
  """σ_t (T,) of every training timestep, increasing in t."""
  # The ratio of the two roots keeps the precision that 1 - ᾱ loses near t = 0.
  return sched.sqrt_one_minus_alphas_cumprod / sched.sqrt_alphas_cumprod


def sigma_to_t(sigma, sched):
  """Fractional timesteps of `sigma`: log σ interpolated linearly over the table, clamped."""
  log_sigmas_T = jnp.log(table_sigmas(sched))
  t_T = jnp.arange(sched.num_timesteps, dtype=jnp.float32)
  return jnp.interp(jnp.log(jnp.maximum(sigma, 1e-10)), log_sigmas_T, t_T)


def karras_sigmas(sched, steps, rho=KARRAS_RHO):
  """S descending σ of Karras et al. (2022) eq. 5 between the table's σ_{T-1} and σ_0."""
  sigmas_T = table_sigmas(sched)
  ramp_S = jnp.linspace(0.0, 1.0, steps)
  max_inv, min_inv = sigmas_T[-1] ** (1 / rho), sigmas_T[0] ** (1 / rho)
  return (max_inv + ramp_S * (min_inv - max_inv)) ** rho


def discrete_timesteps(num_timesteps, steps):
  """S descending integer timesteps round(linspace(0, T-1, S+1)) without 0 (diffusers DPM)."""
  return jnp.round(jnp.linspace(0.0, num_timesteps - 1.0, steps + 1))[::-1][:-1]


def solver_sigmas(sched, steps, karras):
  """(σ_S descending, t_S) the solver visits; the final σ = 0 is implicit."""
  if karras:
    sigmas_S = karras_sigmas(sched, steps)
    return sigmas_S, sigma_to_t(sigmas_S, sched)
  t_S = discrete_timesteps(sched.num_timesteps, steps)
  return table_sigmas(sched)[t_S.astype(jnp.int32)], t_S


def _denoise(model_fn, x_vp, t, sigma, prediction_type, clip_x0):
  """The model's x0 estimate at the VP sample `x_vp` of noise level σ, evaluated at time t."""
  pred = model_fn(x_vp, jnp.full((x_vp.shape[0],), t, jnp.float32)).astype(jnp.float32)
  a = jax.lax.rsqrt(sigma**2 + 1)
  s = sigma * a
  if prediction_type == 'epsilon':
    x0 = (x_vp - s * pred) / a
  elif prediction_type == 'v':
    x0 = a * x_vp - s * pred
  else:
    x0 = pred
  return jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0


def _euler_or_heun(denoise, x_T, sigmas_S, t_S, heun):
  """Karras et al. Alg. 1 in σ space; Heun's correction is skipped on the step to σ = 0."""
  x = x_T * jnp.sqrt(sigmas_S[0] ** 2 + 1)

  def deriv(x, sigma, t):
    return (x - denoise(x * jax.lax.rsqrt(sigma**2 + 1), t, sigma)) / sigma

  def body(x, inputs):
    sigma, sigma_next, t, t_next = inputs
    d = deriv(x, sigma, t)
    x_next = x + (sigma_next - sigma) * d
    if heun:
      x_next = x + (sigma_next - sigma) * (d + deriv(x_next, sigma_next, t_next)) / 2
    return x_next, None

  x, _ = jax.lax.scan(body, x, (sigmas_S[:-1], sigmas_S[1:], t_S[:-1], t_S[1:]))
  # The last step lands on σ = 0, where the Euler step returns the x0 estimate itself.
  return denoise(x * jax.lax.rsqrt(sigmas_S[-1] ** 2 + 1), t_S[-1], sigmas_S[-1])


def _dpmpp_2m_coefs(sigmas_S):
  """Per-step (c_x, c_d0, c_d1) with x_next = c_x·x + c_d0·D0 + c_d1·(D0 - D_prev).

  Lu et al. (2022) DPM-Solver++(2M), midpoint variant as in diffusers: the first step is
  first order (no history) and the last one, to σ = 0, is first order and returns D0.
  """
  sig, sig_next = sigmas_S[:-1], sigmas_S[1:]
  # λ = log(α/σ) = -log σ in the noise-to-signal parameterisation.
  h = jnp.log(sig) - jnp.log(sig_next)
  h_prev = jnp.concatenate([h[:1], h[:-1]])
  a_next = jax.lax.rsqrt(sig_next**2 + 1)
  c_x = (sig_next * a_next) / (sig * jax.lax.rsqrt(sig**2 + 1))
  c_d0 = -a_next * jnp.expm1(-h)
  second = (jnp.arange(h.shape[0]) > 0).astype(h.dtype)
  c_d1 = second * 0.5 * c_d0 * h / h_prev
  one, zero = jnp.ones((1,), h.dtype), jnp.zeros((1,), h.dtype)
  return (
    jnp.concatenate([c_x, zero]),
    jnp.concatenate([c_d0, one]),
    jnp.concatenate([c_d1, zero]),
  )


def _dpmpp_2m(denoise, x_T, sigmas_S, t_S):
  """DPM-Solver++(2M) in VP space: one model call per step."""
  c_x, c_d0, c_d1 = _dpmpp_2m_coefs(sigmas_S)

  def body(carry, inputs):
    x, d_prev = carry
    sigma, t, cx, cd0, cd1 = inputs
    d0 = denoise(x, t, sigma)
    return (cx * x + cd0 * d0 + cd1 * (d0 - d_prev), d0), None

  (x, _), _ = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), (sigmas_S, t_S, c_x, c_d0, c_d1))
  return x


def solve(model_fn, sched, x_T, *, solver, steps, prediction_type, clip_x0, karras=True):
  """Integrates the probability-flow ODE from x_T (VP space, ~N(0, I)) down to σ = 0.

  `karras` picks S Karras σ (ρ = 7) between the table's extremes; otherwise the table σ at
  the S integer timesteps of `discrete_timesteps` (diffusers' DPM-Solver spacing; its
  Euler/Heun schedulers without Karras σ use other timesteps). Euler and Heun call the
  model at the fractional timestep of each σ. DPM-Solver++ rounds those timesteps to
  integers, as diffusers does, while stepping with the exact σ: near t = T-1 of the cosine
  schedule, where σ jumps 30x in one timestep, that mismatch costs accuracy, so prefer
  `karras=False` there. Model calls (NFE): S for 'euler' and 'dpmpp_2m', 2S - 1 for
  'heun' (no correction on the last step, which ends at σ = 0). Euler/Heun start from
  x_σ = x_T·sqrt(σ_max² + 1), the VP-consistent scaling (diffusers' `init_noise_sigma` is
  σ_max for its default spacing).
  """
  if solver not in SOLVERS:
    raise ValueError(f'Unknown solver={solver!r}; allowed: {SOLVERS}.')
  objectives.check_prediction_type(prediction_type)
  sigmas_S, t_S = solver_sigmas(sched, steps, karras)

  def denoise(x_vp, t, sigma):
    return _denoise(model_fn, x_vp, t, sigma, prediction_type, clip_x0)

  x_T = jnp.asarray(x_T, jnp.float32)
  if solver == 'dpmpp_2m':
    return _dpmpp_2m(denoise, x_T, sigmas_S, jnp.round(t_S))
  return _euler_or_heun(denoise, x_T, sigmas_S, t_S, heun=solver == 'heun')
