"""Reverse-process samplers (DDPM, DDIM, and the ODE solvers of `solvers`), and CFG.

Legend: B batch; x has shape (B, ...); t_B int32 timesteps (B,); S sampling steps.
A model_fn is `model_fn(x_t, t_B) -> prediction` in the model's prediction type; the
solvers 'dpmpp_2m', 'euler' and 'heun' may call it with float timesteps.

Randomness: `rng` is one key for the whole batch, or a batch of keys (B, 2), one per example
(`split_keys`, `normal`, `fold_in_keys` handle both). With per-example keys every example's
noise depends on its own key alone, so a sample does not depend on the batch it is drawn in
(what `zoo generate` needs for results independent of batch size and device count).
"""

import jax
import jax.numpy as jnp
import numpy as np

from zoo.diffusion import objectives, solvers

SAMPLERS = ('ddpm', 'ddim') + solvers.SOLVERS
TIMESTEP_SPACINGS = ('linspace', 'leading', 'trailing')


def timesteps_for(num_timesteps, steps, spacing='linspace'):
  """Returns `steps` ascending, distinct timesteps (int32 numpy) spread over [0, T).

  'linspace' is iDDPM-style respacing, round(linspace(0, T-1, S)): steps == T is exactly
  the full chain and every S >= 2 starts sampling at t = T-1; S == 1 uses [T-1], the
  noisiest step, since a single step must start from noise. 'leading' is k·(T // S) for
  k < S (diffusers with steps_offset=0; never reaches T-1), 'trailing' is
  round(T - k·T/S) - 1 (always starts at T-1). All three are diffusers' `timestep_spacing`.
  """
  if spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f'Unknown timestep_spacing={spacing!r}; allowed: {TIMESTEP_SPACINGS}.')
  if int(steps) != steps or not 1 <= steps <= num_timesteps:
    raise ValueError(f'steps={steps!r} must be an integer in [1, {num_timesteps}].')
  steps = int(steps)
  if spacing == 'leading':
    return (np.arange(steps) * (num_timesteps // steps)).astype(np.int32)
  if spacing == 'trailing':
    # diffusers' arange(T, 0, -T/S) can yield S+1 entries for some S; this is exactly S.
    ts = np.round(num_timesteps - np.arange(steps) * (num_timesteps / steps)) - 1
    return ts[::-1].astype(np.int32)
  if steps == 1:
    return np.array([num_timesteps - 1], np.int32)
  # Spacing >= 1 before rounding, so rounding cannot merge two timesteps.
  return np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int32)


def batched_keys(rng):
  """True for a batch of raw keys (B, 2) uint32, one per example."""
  return jnp.ndim(rng) == 2


def split_keys(rng, num=2):
  """`jax.random.split` of one key, or of each key of a batch (then `num` arrays of (B, 2))."""
  if batched_keys(rng):
    keys_BxNx2 = jax.vmap(lambda k: jax.random.split(k, num))(rng)
    return tuple(keys_BxNx2[:, i] for i in range(num))
  return tuple(jax.random.split(rng, num))


def fold_in_keys(rng, i):
  """`jax.random.fold_in(rng, i)` of one key or of each key of a batch."""
  if batched_keys(rng):
    return jax.vmap(jax.random.fold_in, (0, None))(rng, i)
  return jax.random.fold_in(rng, i)


def normal(rng, shape, dtype=jnp.float32):
  """Standard normal noise of `shape` (B, ...); with per-example keys row b comes from key b."""
  if batched_keys(rng):
    if rng.shape[0] != shape[0]:
      raise ValueError(f'{rng.shape[0]} keys for a batch of {shape[0]}')
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(rng)
  return jax.random.normal(rng, shape, dtype)


def _validate(sampler, prediction_type, timestep_spacing):
  if sampler not in SAMPLERS:
    raise ValueError(f'Unknown sampler={sampler!r}; allowed: {SAMPLERS}.')
  objectives.check_prediction_type(prediction_type)
  if sampler in solvers.SOLVERS and timestep_spacing != 'linspace':
    raise ValueError(
      f'timestep_spacing={timestep_spacing!r} applies to ddpm/ddim only; sampler={sampler!r} '
      "takes 'linspace' (its σ come from `karras`)."
    )


def _ddim_step(x, x0, eps, ab_t, ab_prev, eta, z):
  """Song et al. (2021) eq. 12; η = 1 reproduces the DDPM posterior variance."""
  del x
  sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
  # max(., 0) guards float32 rounding when η = 1 makes the direction term vanish.
  dir_coef = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0))
  return jnp.sqrt(ab_prev) * x0 + dir_coef * eps + sigma * z


def _ddpm_step(x, x0, eps, ab_t, ab_prev, eta, z):
  """Ancestral step from the posterior q(x_prev | x_t, x0) of the respaced chain.

  β' = 1 - ᾱ_t/ᾱ_prev; variance is the "fixed small" β̃ = β'(1 - ᾱ_prev)/(1 - ᾱ_t),
  which is 0 on the last step (ᾱ_prev = 1), so that step returns x0.
  """
  del eps, eta
  beta = 1 - ab_t / ab_prev
  mean = (jnp.sqrt(ab_prev) * beta * x0 + jnp.sqrt(1 - beta) * (1 - ab_prev) * x) / (1 - ab_t)
  return mean + jnp.sqrt(beta * (1 - ab_prev) / (1 - ab_t)) * z


def _stochastic(sampler, eta):
  # A literal η = 0 lets DDIM skip drawing noise; a traced η always draws it.
  return sampler == 'ddpm' or not (isinstance(eta, (int, float)) and eta == 0)


def reverse_step(model_fn, sched, x, t_B, ab_t, ab_prev, rng, *, sampler, eta, prediction_type,
                 clip_x0, learned_variance=False):
  """One DDPM or DDIM step x_t -> x_prev (ᾱ_prev = 1 lands on x0); noise from `rng`.

  With `clip_x0` the predicted x0 is clipped to [-1, 1] and ε recomputed from it.
  """
  channels = x.shape[-1]
  pred = model_fn(x, t_B).astype(jnp.float32)
  v = None
  if learned_variance and sampler == 'ddpm':
    pred, v = pred[..., :channels], pred[..., channels:]
  eps, x0 = objectives.to_eps_and_x0(prediction_type, sched, x, t_B, pred)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x - jnp.sqrt(ab_t) * x0) / jnp.sqrt(1 - ab_t)
  z = (normal(rng, x.shape) if _stochastic(sampler, eta)
       else jnp.zeros_like(x))
  if v is not None:
    return objectives.ddpm_learned_variance_step(x, x0, ab_t, ab_prev, v, z)
  step_fn = _ddpm_step if sampler == 'ddpm' else _ddim_step
  return step_fn(x, x0, eps, ab_t, ab_prev, eta, z)


def sample(
  model_fn,
  sched,
  x_T,
  rng,
  *,
  sampler='ddim',
  steps=50,
  eta=0.0,
  prediction_type='epsilon',
  clip_x0=True,
  timestep_spacing='linspace',
  karras=True,
  learned_variance=False,
  steps_offset=0,
  set_alpha_to_one=True,
):
  """Runs the reverse chain from x_T to x_0 in one `lax.scan` over the respaced timesteps.

  Jittable with `model_fn`, `sampler`, `steps`, `prediction_type`, `clip_x0`,
  `timestep_spacing` and `karras` static; T comes from the schedule's array shape. `eta`
  applies to DDIM only, `timestep_spacing` (see `timesteps_for`) to DDPM/DDIM only. The
  last step uses ᾱ_prev = 1, so it lands on the predicted x0. With `clip_x0`, the
  predicted x0 is clipped to [-1, 1] and ε is recomputed from it (as in ADM) so both stay
  consistent. Step i draws its noise from fold_in(rng, i): keys do not depend on `steps`;
  `rng` may be one key per example (see the module docstring).
  'dpmpp_2m', 'euler' and 'heun' are deterministic ODE solvers (`rng` and `eta` unused) on
  Karras σ, or on the table σ with `karras=False`; see `solvers.solve` (Heun: 2S-1 calls).
  With `learned_variance` the model returns [ε, v] (2C channels, iDDPM/DiT learned σ): DDPM
  steps take their variance from v (`objectives.ddpm_learned_variance_step`), the other
  samplers use ε alone.
  `steps_offset` and `set_alpha_to_one` are diffusers' DDIMScheduler fields (Stable Diffusion
  ships 1 and False with 'leading' spacing): every timestep is shifted up by the offset, and
  without `set_alpha_to_one` the last step lands on ᾱ_0 instead of 1 (DDPM/DDIM only).
  """
  _validate(sampler, prediction_type, timestep_spacing)
  if sampler in solvers.SOLVERS and (steps_offset or not set_alpha_to_one):
    raise ValueError(f'steps_offset / set_alpha_to_one apply to ddpm/ddim only, not {sampler!r}')
  if learned_variance and prediction_type != 'epsilon':
    raise ValueError(f'learned variance needs prediction_type="epsilon", not {prediction_type!r}')
  channels = x_T.shape[-1]
  if learned_variance and sampler != 'ddpm':
    full_fn, model_fn = model_fn, lambda x, t: full_fn(x, t)[..., :channels]
  if sampler in solvers.SOLVERS:
    timesteps_for(sched.num_timesteps, steps)  # Same validation of `steps` for every sampler.
    return solvers.solve(
      model_fn,
      sched,
      x_T,
      solver=sampler,
      steps=steps,
      prediction_type=prediction_type,
      clip_x0=clip_x0,
      karras=karras,
    )
  ts = timesteps_for(sched.num_timesteps, steps, timestep_spacing)[::-1]
  if not 0 <= steps_offset <= sched.num_timesteps - 1 - ts[0]:
    raise ValueError(f'steps_offset={steps_offset} takes timestep {ts[0] + steps_offset} past '
                     f'T-1={sched.num_timesteps - 1} (spacing {timestep_spacing!r}, {steps} steps)')
  ts = ts + steps_offset
  prev_ts = np.append(ts[1:], -1)
  ab_S = sched.alphas_cumprod[ts]
  final = 1.0 if set_alpha_to_one else sched.alphas_cumprod[0]
  ab_prev_S = jnp.where(prev_ts >= 0, sched.alphas_cumprod[np.maximum(prev_ts, 0)], final)
  x_T = jnp.asarray(x_T, jnp.float32)
  t_B = jnp.zeros((x_T.shape[0],), jnp.int32)

  def body(x, inputs):
    i, t, ab_t, ab_prev = inputs
    return reverse_step(model_fn, sched, x, t_B + t, ab_t, ab_prev, fold_in_keys(rng, i),
                        sampler=sampler, eta=eta, prediction_type=prediction_type,
                        clip_x0=clip_x0, learned_variance=learned_variance), None

  inputs = (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), ab_S, ab_prev_S)
  x_0, _ = jax.lax.scan(body, x_T, inputs)
  return x_0


def classifier_free_guidance(pred_fn, cond, uncond, scale):
  """Wraps a conditional `pred_fn(x, t_B, c)` into a guided `model_fn(x_t, t_B)`.

  `cond` and `uncond` are pytrees with leading batch dim B (e.g. labels, or the
  null-label / empty-prompt embedding). pred_fn runs once on the 2B batch that interleaves
  them, [uncond_0, cond_0, uncond_1, cond_1, ...], and the result is
  uncond + scale·(cond - uncond) (diffusers convention): scale 1 is the conditional
  prediction alone, scale 0 the unconditional one. Guidance is applied to the prediction in
  whatever parameterisation the model predicts (ε, v or x0). Interleaving (rather than
  [uncond; cond]) keeps both halves of every example on the device that holds the example when
  the batch is sharded, so each device computes the same rows as an unsharded run would.
  """
  def pairs(u, c):
    return jnp.stack([u, c], axis=1).reshape((-1,) + u.shape[1:])

  both = jax.tree.map(pairs, uncond, cond)

  def model_fn(x_t, t_B):
    pred_2B = pred_fn(pairs(x_t, x_t), pairs(t_B, t_B), both)
    pred_Bx2 = pred_2B.reshape((x_t.shape[0], 2) + pred_2B.shape[1:])
    uncond_pred, cond_pred = pred_Bx2[:, 0], pred_Bx2[:, 1]
    return uncond_pred + scale * (cond_pred - uncond_pred)

  return model_fn
