"""Training-free inpainting: the RePaint walk, exactness outside the mask, the limits, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo import diffusion
from zoo.bench import recipes

T = 1000
SCHED = diffusion.Schedule.create('cosine', T)
_inpaint = jax.jit(diffusion.inpaint, static_argnames=(
    'model_fn', 'mode', 'sampler', 'steps', 'prediction_type', 'clip_x0', 'jump_length',
    'jump_n_sample'))


def _model_fn(x, t_B):
  """A smooth stand-in denoiser: depends on x and t, so every step matters."""
  return 0.3 * x * (t_B[:, None, None, None] / T) + 0.1 * jnp.sin(3.0 * x)


def _known_and_mask(seed=0, shape=(3, 8, 8, 2)):
  rng = np.random.default_rng(seed)
  known = rng.uniform(-1, 1, shape).astype(np.float32)
  mask = (rng.uniform(size=shape[:-1] + (1,)) < 0.5).astype(np.float32)
  return known, mask


def test_repaint_walk_matches_diffusers():
  from diffusers import RePaintScheduler
  for steps, jump_length, jump_n_sample in ((50, 10, 10), (20, 3, 4), (7, 10, 5)):
    sch = RePaintScheduler(num_train_timesteps=T)
    sch.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
    walk = diffusion.repaint_schedule(steps, jump_length, jump_n_sample)
    levels = [a for a, _ in walk]
    assert levels == (sch.timesteps.numpy() // (T // steps)).tolist()
    assert walk[-1] == (0, -1) and all(abs(a - b) == 1 for a, b in walk)


@pytest.mark.parametrize('mode', diffusion.INPAINT_MODES)
@pytest.mark.parametrize('sampler', diffusion.INPAINT_SAMPLERS)
def test_known_pixels_come_back_exactly(mode, sampler):
  known, mask = _known_and_mask()
  out = np.asarray(_inpaint(_model_fn, SCHED, known, mask, jax.random.key(0), mode=mode,
                            sampler=sampler, steps=12, jump_length=3, jump_n_sample=3))
  keep = np.broadcast_to(mask == 0, known.shape)
  np.testing.assert_array_equal(out[keep], known[keep])
  assert np.abs(out[~keep] - known[~keep]).mean() > 0.1  # The masked pixels were generated.
  empty = _inpaint(_model_fn, SCHED, known, np.zeros_like(mask), jax.random.key(1), mode=mode,
                   sampler=sampler, steps=12, jump_length=3, jump_n_sample=3)
  np.testing.assert_array_equal(empty, known)


@pytest.mark.parametrize('sampler', diffusion.INPAINT_SAMPLERS)
def test_full_mask_is_plain_generation(sampler):
  known, mask = _known_and_mask()
  rng = jax.random.key(3)
  full = np.ones_like(mask)
  blend = _inpaint(_model_fn, SCHED, known, full, rng, mode='blend', sampler=sampler, steps=12)
  # RePaint without resampling is blended diffusion, transition for transition.
  once = _inpaint(_model_fn, SCHED, known, full, rng, mode='repaint', sampler=sampler, steps=12,
                  jump_length=3, jump_n_sample=1)
  np.testing.assert_array_equal(once, blend)
  rng_init = jax.random.split(rng, 3)[0]
  x_T = jax.random.normal(rng_init, known.shape, jnp.float32)
  plain = diffusion.sample(_model_fn, SCHED, x_T, rng_init, sampler=sampler, steps=12)
  np.testing.assert_allclose(blend, plain, atol=1e-6)


def test_inpainting_completes_the_known_half():
  """Two training images with opposite halves and the exact denoiser: the generated half is the
  one of the image the known half belongs to."""
  a = np.concatenate([np.ones((4, 2, 1)), -np.ones((4, 2, 1))], axis=1).astype(np.float32)
  images = jnp.asarray(np.stack([a, -a]).reshape(2, -1))
  pred_fn = recipes.oracle_denoiser(images, jnp.zeros((2,), jnp.int32), SCHED, null_label=1)
  model_fn = lambda x, t: pred_fn(x, t, jnp.ones(x.shape[:1], jnp.int32))  # noqa: E731
  known = np.repeat(a[None], 64, 0)
  mask = np.zeros((4, 4, 1), np.float32)
  mask[:, 2:] = 1.0  # Generate the right half; the left half says "image a".
  out = _inpaint(model_fn, SCHED, known, mask, jax.random.key(0), mode='repaint', steps=20,
                 jump_length=4, jump_n_sample=5)
  right = np.asarray(out)[:, :, 2:, 0].mean(axis=(1, 2))
  assert np.mean(right < 0) >= 0.9  # a's right half is -1.


def test_outpaint_canvas():
  image = np.full((2, 4, 4, 3), 0.25, np.float32)
  canvas, mask = diffusion.outpaint_canvas(image, 2, 8)
  assert canvas.shape == (2, 8, 8, 3) and mask.shape == (2, 8, 8, 1)
  np.testing.assert_array_equal(canvas[:, 2:6, 2:6], image)
  assert mask[:, 2:6, 2:6].sum() == 0 and mask.sum() == 2 * (64 - 16)
  with pytest.raises(ValueError, match='use an image of 4x4'):
    diffusion.outpaint_canvas(np.zeros((5, 5, 3)), 2, 8)
  with pytest.raises(ValueError, match='pad=0'):
    diffusion.outpaint_canvas(np.zeros((8, 8, 3)), 0, 8)


def test_errors():
  known, mask = _known_and_mask()
  with pytest.raises(ValueError, match='binary'):
    diffusion.check_mask(mask * 0.5, known.shape)
  with pytest.raises(ValueError, match=r'\(3, 8, 8, 1\)'):
    diffusion.check_mask(mask[:, :4], known.shape)
  with pytest.raises(ValueError, match='repaint'):
    diffusion.inpaint(_model_fn, SCHED, known, mask, jax.random.key(0), mode='paint')
  with pytest.raises(ValueError, match='ddpm or ddim'):
    diffusion.inpaint(_model_fn, SCHED, known, mask, jax.random.key(0), sampler='dpmpp_2m')
  with pytest.raises(ValueError, match='jump_length'):
    diffusion.repaint_schedule(10, 0, 2)
