"""Inpainting-trained diffusion: the denoiser also reads the mask and the masked image.

Legend: B batch, R resolution, C image channels.

The layout is Stable Diffusion inpainting's: the denoiser's input is [x_t (C), mask (1),
masked image (C)] on the channel axis (`config.model.in_channels` = 2C + 1, `out_channels` =
C), the mask is 1 where content is generated and the masked image is the image with those
pixels zeroed. Training draws one mask per example: a box, an outpainting border or the whole
image (which keeps plain generation: an empty canvas, a full mask), uniformly. With `base_from`
the model starts from a plain diffusion run (same architecture, C input channels): its first
convolution (U-Net `conv_in`) is zero-extended over the C + 1 new input
channels, so step 0 predicts exactly what the base does.

`predict['inpaint']` samples with any sampler, then pastes the known pixels back, so pixels
outside the mask come back exactly; `predict['sample']` is inpainting with a full mask.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from zoo import checkpoint
from zoo import diffusion
from zoo import models
from zoo.tasks import diffusion as diffusion_task

SCHEMA = diffusion_task.SCHEMA | {'base_from': str}
MASK_KINDS = ('box', 'border', 'full')
# The first convolution of each denoiser: the one that grows C + 1 input channels. (A DiT
# predicts as many channels as it reads, so it has no inpainting layout yet.)
FIRST_CONV = {'unet': ('conv_in', 'kernel')}


def random_masks(rng, batch, resolution):
  """Bx R x R x1 float32 training masks: a box, a border (outpainting) or all, per example."""
  r = resolution
  rng_kind, rng_box, rng_pad = jax.random.split(rng, 3)
  kind_B = jax.random.randint(rng_kind, (batch,), 0, len(MASK_KINDS))
  # Boxes from a quarter to three quarters of the side, anywhere; borders 1/8 to 1/4 of it.
  lo_Bx2 = jax.random.uniform(rng_box, (batch, 2, 2))
  size_Bx2 = (0.25 + 0.5 * lo_Bx2[:, 1]) * r
  start_Bx2 = lo_Bx2[:, 0] * (r - size_Bx2)
  pad_B = jax.random.randint(rng_pad, (batch,), r // 8, r // 4 + 1)
  ij = jnp.arange(r, dtype=jnp.float32) + 0.5
  rows = (ij[None] >= start_Bx2[:, :1]) & (ij[None] < start_Bx2[:, :1] + size_Bx2[:, :1])
  cols = (ij[None] >= start_Bx2[:, 1:]) & (ij[None] < start_Bx2[:, 1:] + size_Bx2[:, 1:])
  box = rows[:, :, None] & cols[:, None, :]
  idx = jnp.arange(r)
  inner = (idx[None] >= pad_B[:, None]) & (idx[None] < r - pad_B[:, None])
  border = ~(inner[:, :, None] & inner[:, None, :])
  masks = jnp.where((kind_B == 0)[:, None, None], box,
                    jnp.where((kind_B == 1)[:, None, None], border, True))
  return masks.astype(jnp.float32)[..., None]


class InpaintTask(diffusion_task.DiffusionTask):
  """`init`, `loss`, `predict['inpaint' | 'sample']` of an inpainting-trained denoiser."""

  @staticmethod
  def check_config(config):
    task = config.task
    diffusion_task.check_denoiser_task(config, SCHEMA, FIRST_CONV)
    kw = models.fields(config.model.name) | models.kwargs(config.model)
    if kw['in_channels'] != 2 * kw['out_channels'] + 1:
      raise ValueError(f'config.model.in_channels={kw["in_channels"]} must be 2C + 1 = '
                       f'{2 * kw["out_channels"] + 1} for C = config.model.out_channels='
                       f'{kw["out_channels"]} image channels: x_t, the mask, the masked image')
    if not 0.0 <= task.label_dropout < 1.0:
      raise ValueError(f'config.task.label_dropout={task.label_dropout} must lie in [0, 1)')
    if task.base_from and os.path.isfile(os.path.join(task.base_from, 'config.json')):
      _check_base(config, diffusion_task.base_run_config(task.base_from))

  def __init__(self, config):
    super().__init__(config)
    if self.cfg.base_from:
      _check_base(config, diffusion_task.base_run_config(self.cfg.base_from))
    self.name = config.model.name
    c = _image_channels(config)
    self.image_shape = self.pixel_shape = (config.data.resolution, config.data.resolution, c)
    self.predict = {'sample': self.sample, 'inpaint': self.inpaint}

  def init(self, rng, batch):
    x = batch['image']
    if x.shape[1:] != self.image_shape:
      raise ValueError(f'data images are {x.shape[1:]} but the model inpaints {self.image_shape}')
    inputs = jnp.zeros(x.shape[:-1] + (2 * x.shape[-1] + 1,), x.dtype)
    t = jnp.zeros(x.shape[:1], jnp.int32)
    return self.model.init({'params': rng}, inputs, t, labels_B=self._labels(batch))['params']

  def after_pretrained(self, params):
    """With `base_from`: the base's weights, its first convolution zero-extended."""
    if not self.cfg.base_from:
      return params
    path = FIRST_CONV[self.name]
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    kernel = _get(abstract, path)
    c = self.image_shape[-1]
    narrow = jax.ShapeDtypeStruct(kernel.shape[:-2] + (c, kernel.shape[-1]), kernel.dtype,
                                  sharding=kernel.sharding)
    base = checkpoint.load_params(os.path.join(self.cfg.base_from, 'checkpoints'),
                                  _set(abstract, path, narrow), use_ema=True)
    first = _get(base, path)
    extra = jnp.zeros(first.shape[:-2] + (c + 1, first.shape[-1]), first.dtype)
    return _set(base, path, jax.device_put(jnp.concatenate([first, extra], axis=-2),
                                           kernel.sharding))

  def loss(self, params, batch, rng, train=True):
    """The ε-loss of the denoiser given x_t, a random mask and the image under it."""
    x0 = batch['image']
    rng_t, rng_noise, rng_drop, rng_mask, rng_dropout = jax.random.split(rng, 5)
    t = jax.random.randint(rng_t, x0.shape[:1], 0, self.cfg.num_timesteps)
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(self.schedule, x0, t, noise)
    mask = random_masks(rng_mask, x0.shape[0], x0.shape[1])
    labels = self._labels(batch)
    if labels is not None and train and self.cfg.label_dropout > 0:
      drop = jax.random.bernoulli(rng_drop, self.cfg.label_dropout, labels.shape)
      labels = jnp.where(drop, self.num_classes, labels)
    pred = self.model.apply({'params': params}, model_input(x_t, mask, x0), t, labels_B=labels,
                            train=train, rngs={'dropout': rng_dropout})
    return diffusion_task.denoising_loss(self, pred, x0, x_t, noise, t)

  def sample(self, params, rng, labels_B=None, *, num=None, sampler=None, steps=None,
             guidance_scale=None, eta=None):
    """Plain generation: inpainting an empty canvas under a full mask."""
    labels_B, num = self._check_labels(labels_B, num)
    canvas = np.zeros((num, *self.image_shape), np.float32)
    return self.inpaint(params, rng, canvas, np.ones(self.image_shape[:-1] + (1,), np.float32),
                        labels_B, sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                        eta=eta)

  def inpaint(self, params, rng, images, masks, labels_B=None, *, mode='model', sampler=None,
              steps=None, guidance_scale=None, eta=None, jump_length=None, jump_n_sample=None):
    """`images` (BxRxRxC in [0, 1]) regenerated where `masks` is 1 by the trained model.

    `mode` is 'model' (this run conditions on the mask itself); RePaint's jump settings do not
    apply. Every sampler works. Pixels outside the mask come back exactly.
    """
    if mode not in ('model', None):
      raise ValueError(f"mode={mode!r}: an inpainting-trained run inpaints with mode='model' "
                       '(RePaint and blending are for plain diffusion runs)')
    del jump_length, jump_n_sample
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(f'images have shape {images.shape}; this model needs Bx{self.image_shape}')
    masks = np.broadcast_to(diffusion.check_mask(masks, images.shape),
                            images.shape[:-1] + (1,))
    labels_B, _ = self._check_labels(labels_B, images.shape[0])
    settings = diffusion_task.sampler_settings(self.cfg, sampler, steps, guidance_scale, eta)
    out = _inpaint(self, params, rng, jnp.asarray(images * 2.0 - 1.0), jnp.asarray(masks),
                   labels_B, **settings)
    return np.where(masks > 0, np.asarray(out), images)

  __hash__ = object.__hash__


def model_input(x_t, mask, x0):
  """[x_t, mask, x0 with the masked pixels zeroed] on the channel axis (SD inpainting)."""
  return jnp.concatenate([x_t, mask, x0 * (1.0 - mask)], axis=-1)


def _image_channels(config):
  return (models.fields(config.model.name) | models.kwargs(config.model))['out_channels']


def _check_base(config, base):
  """The base must be this architecture with C input channels, on this schedule."""
  ours = models.fields(config.model.name) | models.kwargs(config.model)
  ours['in_channels'] = _image_channels(config)
  diffusion_task.check_base_run(config, base, config.model.name, ours)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


@functools.partial(jax.jit, static_argnames=('task', 'sampler', 'steps', 'guidance_scale'))
def _inpaint(task, params, rng, x_known, mask, labels_B, *, sampler, steps, guidance_scale, eta):
  rng_init, rng_loop = diffusion.split_keys(rng)
  x_T = diffusion.normal(rng_init, x_known.shape)

  def pred_fn(x, t, cond):
    labels, m, known = cond
    return task.model.apply({'params': params}, model_input(x, m, known), t,
                            labels_B=labels).astype(jnp.float32)

  cond = (labels_B, mask, x_known)
  if labels_B is None or guidance_scale == 1.0:
    model_fn = lambda x, t: pred_fn(x, t, cond)  # noqa: E731
  else:
    null = (jnp.full_like(labels_B, task.num_classes), mask, x_known)
    model_fn = diffusion.classifier_free_guidance(pred_fn, cond, null, guidance_scale)
  x0 = diffusion.sample(model_fn, task.schedule, x_T, rng_loop, sampler=sampler, steps=steps,
                        eta=eta, prediction_type=task.cfg.prediction_type,
                        clip_x0=task.cfg.clip_x0)
  return (jnp.clip(x0, -1.0, 1.0) + 1.0) / 2.0
