"""Discrete noise schedules (betas and the cumulative products derived from them).

Timesteps are integers t in [0, T); index t is the t-th noising step, so ᾱ_t =
prod_{s<=t} (1 - β_s) and ᾱ decreases with t.
"""

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

SCHEDULES = ('linear', 'scaled_linear', 'cosine')

# LDM / Stable Diffusion endpoints (v1-inference.yaml linear_start / linear_end).
_SD_BETA_START = 0.00085
_SD_BETA_END = 0.012
_COSINE_S = 0.008
_MAX_BETA = 0.999


def _cosine_alpha_bar(t):
  """iDDPM ᾱ(t) for continuous t in [0, 1] (squaredcos_cap_v2)."""
  return math.cos((t + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2


def make_betas(name, num_timesteps, *, beta_start=None, beta_end=None):
  """Returns the float64 betas (T,) of the named schedule.

  'linear' follows ADM/DiT `get_named_beta_schedule`: endpoints 1e-4..0.02 scaled by
  1000/T so that any T has roughly the same total noise. 'scaled_linear' is the LDM/SD
  schedule, linear in sqrt(β). Both accept `beta_start`/`beta_end` overrides (taken as
  given, without the 1000/T scaling). 'cosine' is iDDPM's, with β capped at 0.999.
  """
  if name not in SCHEDULES:
    raise ValueError(f'Unknown schedule name={name!r}; allowed: {SCHEDULES}.')
  if int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ValueError(f'num_timesteps={num_timesteps!r} must be a positive integer.')
  betas = _named_betas(name, int(num_timesteps), beta_start, beta_end)
  if not np.all((betas > 0) & (betas < 1)):
    raise ValueError(
      f'Schedule {name!r} with num_timesteps={num_timesteps}, beta_start={beta_start}, '
      f'beta_end={beta_end} gives betas outside (0, 1): [{betas.min()}, {betas.max()}].'
    )
  return betas


def _named_betas(name, n, beta_start, beta_end):
  """The unvalidated betas of `make_betas`."""
  if name == 'cosine':
    if beta_start is not None or beta_end is not None:
      raise ValueError("The 'cosine' schedule takes no beta_start/beta_end.")
    ratios = [_cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n) for i in range(n)]
    return np.minimum(1.0 - np.array(ratios, dtype=np.float64), _MAX_BETA)
  if name == 'linear':
    scale = 1000 / n
    start = scale * 1e-4 if beta_start is None else beta_start
    end = scale * 0.02 if beta_end is None else beta_end
    return np.linspace(start, end, n, dtype=np.float64)
  start = _SD_BETA_START if beta_start is None else beta_start
  end = _SD_BETA_END if beta_end is None else beta_end
  return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2


@flax.struct.dataclass
class Schedule:
  """A schedule as a pytree of float32 (T,) arrays, safe to pass into jitted code.

  T is static: `num_timesteps` reads it from the array shape.
  """

  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray

  @property
  def num_timesteps(self):
    return self.betas.shape[0]

  @classmethod
  def create(cls, name, num_timesteps, *, beta_start=None, beta_end=None):
    """Builds the named schedule; see `make_betas` for the names."""
    betas = make_betas(name, num_timesteps, beta_start=beta_start, beta_end=beta_end)
    # Cumulative products in float64: in float32 the 1000-term product drifts visibly.
    alphas_cumprod = np.cumprod(1.0 - betas)
    arrays = dict(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
    )
    return cls(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})
