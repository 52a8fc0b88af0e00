"""Training-free inpainting and outpainting for any ε/v/x0 denoiser: blended diffusion, RePaint.

Legend: B batch; x has shape BxHxWxC in [-1, 1]; a mask is BxHxWx1 (or HxWx1), 1 where new
content is generated and 0 where the known image is kept (diffusers' convention: white =
repaint).

Both modes run the DDPM (or DDIM) reverse chain of `samplers.sample` and, after every step,
replace the known region by the known image noised to the step's timestep (blended diffusion,
Avrahami et al. 2022; Lugmayr et al.'s RePaint without resampling). RePaint also travels back
in time: after every `jump_length` steps down it re-noises `jump_length` steps up,
`jump_n_sample - 1` times, so the generated region can harmonise with the known one. The last
step lands on t = -1, where the known region is the known image exactly: pixels outside the
mask come back unchanged, bit for bit.
"""

import jax
import jax.numpy as jnp
import numpy as np

from zoo.diffusion import objectives, samplers

MODES = ('repaint', 'blend')
INPAINT_SAMPLERS = ('ddpm', 'ddim')


def check_mask(mask, image_shape):
  """The mask as float32 BxHxWx1 (or HxWx1) of 0s and 1s matching `image_shape`; else ValueError."""
  mask = np.asarray(mask)
  want = tuple(image_shape[:-1]) + (1,)
  if mask.shape != want and mask.shape != want[1:]:
    raise ValueError(f'mask has shape {mask.shape}; the image needs {want} or {want[1:]} '
                     '(1 = generate, 0 = keep)')
  if not np.all((mask == 0) | (mask == 1)):
    raise ValueError('mask must be binary: every value 0 (keep) or 1 (generate), got values '
                     f'{np.unique(mask)[:6].tolist()}')
  return mask.astype(np.float32)


def repaint_schedule(steps, jump_length=10, jump_n_sample=10):
  """RePaint's time-travel walk over the levels S-1 (x_T) ... -1 (x_0) as (from, to) pairs.

  Level k is the k-th respaced timestep. A pair with to < from is one reverse step, to > from
  one re-noising step. The jumps are those of the paper's schedule (and diffusers'
  `RePaintScheduler`): on reaching a level that is a multiple of `jump_length` (below
  S - jump_length), go back up `jump_length` levels, `jump_n_sample - 1` times.
  """
  if jump_length < 1 or jump_n_sample < 1:
    raise ValueError(f'jump_length={jump_length} and jump_n_sample={jump_n_sample} must be >= 1')
  jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
  t, walk = steps, []
  while t >= 1:
    t -= 1
    walk.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] -= 1
      for _ in range(jump_length):
        t += 1
        walk.append(t)
  walk.append(-1)
  return list(zip(walk[:-1], walk[1:]))


def inpaint(model_fn, sched, x_known, mask, rng, *, mode='repaint', sampler='ddpm', steps=50,
            eta=0.0, prediction_type='epsilon', clip_x0=True, jump_length=10, jump_n_sample=10):
  """Samples BxHxWxC images that equal `x_known` where `mask` is 0 and are generated where 1.

  Jittable with `model_fn`, `mode`, `sampler`, `steps`, `prediction_type`, `clip_x0` and the
  jump settings static. With mode='blend' (or jump_n_sample=1) a full mask gives exactly
  `samplers.sample(...)` with the same arguments and rng; an empty one gives `x_known`.
  """
  if mode not in MODES:
    raise ValueError(f'Unknown inpainting mode={mode!r}; allowed: {MODES}.')
  if sampler not in INPAINT_SAMPLERS:
    raise ValueError(f'inpainting runs sampler ddpm or ddim, not {sampler!r}')
  objectives.check_prediction_type(prediction_type)
  x_known = jnp.asarray(x_known, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x_known.shape[:-1] + (1,))
  ts = samplers.timesteps_for(sched.num_timesteps, steps)
  walk = (repaint_schedule(steps, jump_length, jump_n_sample) if mode == 'repaint'
          else [(i, i - 1) for i in range(steps - 1, -1, -1)])
  # Per transition: the timestep now, the one after, ᾱ of both (ᾱ = 1 at index -1), up or down.
  idx_from, idx_to = (np.array(a, np.int32) for a in zip(*walk))
  ab = jnp.concatenate([sched.alphas_cumprod[ts], jnp.ones((1,), jnp.float32)])
  t_from = jnp.asarray(ts[idx_from])
  ab_from, ab_to = ab[idx_from], ab[idx_to]  # Index -1 picks the appended 1.
  rng_init, rng_known, rng_up = jax.random.split(rng, 3)
  x_T = jax.random.normal(rng_init, x_known.shape, jnp.float32)
  t_B = jnp.zeros(x_known.shape[:1], jnp.int32)

  def down(x, i, t, ab_t, ab_prev):
    x_prev = samplers.reverse_step(model_fn, sched, x, t_B + t, ab_t, ab_prev,
                                   jax.random.fold_in(rng_init, i), sampler=sampler, eta=eta,
                                   prediction_type=prediction_type, clip_x0=clip_x0)
    noise = jax.random.normal(jax.random.fold_in(rng_known, i), x.shape, jnp.float32)
    known = jnp.sqrt(ab_prev) * x_known + jnp.sqrt(1 - ab_prev) * noise
    return mask * x_prev + (1.0 - mask) * known

  def up(x, i, ab_t, ab_next):
    # q(x_next | x_t) of the respaced chain: ᾱ_next / ᾱ_t is the product of the skipped (1 - β).
    ratio = ab_next / ab_t
    z = jax.random.normal(jax.random.fold_in(rng_up, i), x.shape, jnp.float32)
    return jnp.sqrt(ratio) * x + jnp.sqrt(1 - ratio) * z

  def body(carry, inputs):
    x, n_down = carry
    i, going_down, t, ab_t, ab_next = inputs
    x = jax.lax.cond(going_down, lambda x: down(x, n_down, t, ab_t, ab_next),
                     lambda x: up(x, i, ab_t, ab_next), x)
    return (x, n_down + going_down.astype(jnp.int32)), None

  inputs = (jnp.arange(len(walk), dtype=jnp.int32), jnp.asarray(idx_to < idx_from), t_from,
            ab_from, ab_to)
  (x_0, _), _ = jax.lax.scan(body, (x_T, jnp.zeros((), jnp.int32)), inputs)
  return x_0


def outpaint_canvas(image, pad, resolution):
  """(canvas, mask): `image` (HxWxC or BxHxWxC in [-1, 1]) centred on a `resolution`² canvas.

  The new border (`pad` pixels on every side) is masked for generation; its start value is
  irrelevant (mid-grey). The canvas must be the model's resolution: H + 2·pad == resolution.
  """
  image = np.asarray(image, np.float32)
  if pad < 1:
    raise ValueError(f'pad={pad} must be >= 1')
  h, w = image.shape[-3:-1]
  if h + 2 * pad != resolution or w + 2 * pad != resolution:
    raise ValueError(f'outpainting a {h}x{w} image by pad={pad} gives {h + 2 * pad}x'
                     f'{w + 2 * pad}, but the model generates {resolution}x{resolution}: use '
                     f'an image of {resolution - 2 * pad}x{resolution - 2 * pad}')
  spec = [(0, 0)] * (image.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
  canvas = np.pad(image, spec)
  mask = np.pad(np.zeros(image.shape[:-1] + (1,), np.float32), spec, constant_values=1.0)
  return canvas, mask
