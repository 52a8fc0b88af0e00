"""Denoising diffusion: the network predicts ε (or v, x0) of a fixed forward schedule.

Class-conditional models learn the null class too: each label is replaced by it with
probability `label_dropout`, so one network gives both terms of classifier-free guidance.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from zoo import config as zoo_config
from zoo import diffusion
from zoo import models

DENOISERS = ('unet', 'dit')  # Models with the (x_t, t, labels=, context=) denoiser signature.
# Base task keys that must agree: the schedule the base was trained on is the one it denoises.
_SHARED_TASK_KEYS = ('schedule', 'num_timesteps', 'prediction_type')
COMPUTE_FIELDS = ('remat', 'dtype')
SCHEMA = {
    'name': str, 'schedule': str, 'num_timesteps': int, 'prediction_type': str,
    'label_dropout': float, 'sampler': str, 'sample_steps': int, 'eta': float,
    'guidance_scale': float, 'clip_x0': bool, 'snr_gamma': float,
}


class DiffusionTask:
  """`init`, `loss` and `predict['sample']` for a time-conditioned denoiser (U-Net)."""

  @staticmethod
  def check_config(config):
    task = config.task
    check_denoiser_task(config, SCHEMA, DENOISERS)
    if not 0.0 <= task.label_dropout < 1.0:
      raise ValueError(f'config.task.label_dropout={task.label_dropout} must lie in [0, 1)')
    check_learned_sigma(config)
    if config.model.num_classes and not config.data.label_key:
      raise ValueError('config.model.num_classes > 0 needs labels: set config.data.label_key')

  def __init__(self, config):
    self.model = models.build(config.model)
    self.cfg = config.task
    self.num_classes = config.model.num_classes
    self.image_shape = (config.data.resolution, config.data.resolution, config.model.in_channels)
    self.pixel_shape = self.image_shape  # What users pass and get (text_to_image: VAE pixels).
    self.schedule = diffusion.Schedule.create(self.cfg.schedule, self.cfg.num_timesteps)
    self.predict = {'sample': self.sample, 'inpaint': self.inpaint}
    # What predict['sample'] is conditioned on: 'class' (labels_B), 'none' (num) or 'text'.
    self.conditioning = 'class' if self.num_classes else 'none'
    self.learn_sigma = bool(config.model.get('learn_sigma', False))
    self.timestep_spacing = 'linspace'  # DDPM/DDIM grid (distilled students sample 'trailing').

  def init(self, rng, batch):
    """Boxed (logically partitioned) params for a batch of this shape."""
    x = batch['image']
    if x.shape[1:] != self.image_shape:
      raise ValueError(f'data images are {x.shape[1:]} but the model expects {self.image_shape} '
                       '(config.data.resolution, config.model.in_channels)')
    t = jnp.zeros(x.shape[:1], jnp.int32)
    return self.model.init({'params': rng}, x, t, labels_B=self._labels(batch))['params']

  def _labels(self, batch):
    return batch['label'] if self.num_classes else None

  def loss(self, params, batch, rng, train=True):
    """Mean denoising loss over the batch at uniformly drawn timesteps."""
    x0 = batch['image']
    rng_t, rng_noise, rng_drop, rng_dropout = jax.random.split(rng, 4)
    t = jax.random.randint(rng_t, x0.shape[:1], 0, self.cfg.num_timesteps)
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(self.schedule, x0, t, noise)
    labels = self._labels(batch)
    if labels is not None and train and self.cfg.label_dropout > 0:
      drop = jax.random.bernoulli(rng_drop, self.cfg.label_dropout, labels.shape)
      labels = jnp.where(drop, self.num_classes, labels)
    pred = self.model.apply({'params': params}, x_t, t, labels_B=labels, train=train,
                            rngs={'dropout': rng_dropout})
    return denoising_loss(self, pred, x0, x_t, noise, t)

  def sample(self, params, rng, labels_B=None, *, num=None, sampler=None, steps=None,
             guidance_scale=None, eta=None):
    """Images in [0, 1] (BxHxWxC); `labels_B` for class-conditional models, else `num` images.

    Unset sampler settings come from `config.task`; guidance needs a class-conditional model.
    """
    labels_B, num = self._check_labels(labels_B, num)
    return _sample(self, params, rng, labels_B, num=num,
                   **sampler_settings(self.cfg, sampler, steps, guidance_scale, eta))

  def inpaint(self, params, rng, images, masks, labels_B=None, *, mode='repaint', sampler=None,
              steps=None, guidance_scale=None, eta=None, jump_length=10, jump_n_sample=10):
    """`images` (BxHxWxC in [0, 1]) with the masked pixels (masks BxHxWx1 or HxWx1: 1 =
    generate) regenerated; every other pixel is returned unchanged.

    Training-free (`diffusion.inpaint`: RePaint or blended diffusion) for any run of this
    task; sampler 'ddpm' (the default unless `config.task.sampler` is ddim) or 'ddim'.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(f'images have shape {images.shape}; this model needs Bx{self.image_shape} '
                       '(config.data.resolution, config.model.in_channels)')
    masks = diffusion.check_mask(masks, images.shape)
    labels_B, _ = self._check_labels(labels_B, images.shape[0])
    if labels_B is not None and labels_B.shape[0] != images.shape[0]:
      raise ValueError(f'{labels_B.shape[0]} labels for {images.shape[0]} images')
    settings = inpaint_settings(self.cfg, sampler, steps, guidance_scale, eta)
    out = _inpaint(self, params, rng, jnp.asarray(images * 2.0 - 1.0), jnp.asarray(masks),
                   labels_B, mode=mode, jump_length=jump_length, jump_n_sample=jump_n_sample,
                   **settings)
    return np.where(masks > 0, np.asarray(out), images)

  def _check_labels(self, labels_B, num):
    """(labels_B as int32 or None, batch size): labels for class-conditional models only."""
    if self.num_classes:
      if labels_B is None:
        raise ValueError('this model is class-conditional: pass labels')
      # Checked on the host: a device reduction would wait for work queued before it.
      host = np.asarray(labels_B)
      if host.max() > self.num_classes or host.min() < 0:
        raise ValueError(f'labels must lie in [0, {self.num_classes}] ({self.num_classes} = null)')
      return jnp.asarray(labels_B, jnp.int32), host.shape[0]
    if labels_B is not None:
      raise ValueError('this model is unconditional: labels do not apply')
    if num is None:
      raise ValueError('this model is unconditional: pass num')
    return None, num

  def denoiser(self, params, labels_B, guidance_scale):
    """model_fn(x_t, t_B) -> prediction, with classifier-free guidance for labelled models."""
    def pred_fn(x, t, labels):
      return self.model.apply({'params': params}, x, t, labels_B=labels).astype(jnp.float32)
    if labels_B is None:
      return lambda x, t: pred_fn(x, t, None)
    if guidance_scale == 1.0:
      return lambda x, t: pred_fn(x, t, labels_B)
    null = jnp.full_like(labels_B, self.num_classes)
    return diffusion.classifier_free_guidance(pred_fn, labels_B, null, guidance_scale)

  # Tasks are static arguments of jitted functions: identity hashing is what we want.
  __hash__ = object.__hash__


def denoising_loss(task, pred, x0, x_t, noise, t):
  """(loss, metrics): the mean ε/v/x0 loss, plus the VLB for learned-σ models (iDDPM hybrid)."""
  pred = pred.astype(jnp.float32)
  if not task.learn_sigma:
    loss = diffusion.loss(task.cfg.prediction_type, task.schedule, pred, x0, noise, t,
                          snr_gamma=task.cfg.snr_gamma).mean()
    return loss, {'loss': loss}
  # The VLB's gradient reaches only the variance channels (ε is stop-gradiented inside).
  eps, v = jnp.split(pred, 2, axis=-1)
  mse = diffusion.loss('epsilon', task.schedule, eps, x0, noise, t,
                       snr_gamma=task.cfg.snr_gamma).mean()
  vlb = diffusion.vlb_loss(task.schedule, x0, x_t, t, eps, v).mean()
  return mse + vlb, {'loss': mse + vlb, 'mse': mse, 'vlb': vlb}


def base_run_config(workdir):
  """The config of the diffusion run `workdir` that a task builds on (its config.json)."""
  return zoo_config.run_config(workdir, 'config.task.base_from',
                               'train the base first (experiments/shapes_diffusion.py)')


def check_base_run(config, base, model_name, ours):
  """ValueError unless `base` (a run's config) is a diffusion run of a `model_name` whose fields
  equal `ours` (compute-only fields aside) and whose schedule is this config's."""
  where = f'config.task.base_from={config.task.base_from!r}'
  if base.task.name != 'diffusion':
    raise ValueError(f'{where} is a {base.task.name!r} run; this task builds on a diffusion run')
  if base.model.name != model_name:
    raise ValueError(f'{where} trained a {base.model.name!r}; config.model.name='
                     f'{config.model.name!r} builds on a {model_name!r}')
  theirs = models.fields(model_name) | models.kwargs(base.model)
  differ = [k for k in ours if k not in COMPUTE_FIELDS and ours[k] != theirs.get(k)]
  differ += [f'task.{k}' for k in _SHARED_TASK_KEYS if config.task[k] != base.task[k]]
  if differ:
    raise ValueError(f'config differs from the base run {where} in {differ}: this model is '
                     "initialised from the base's weights and denoises on its schedule")


def check_denoiser_task(config, schema, model_names):
  """The checks every denoising task starts with: its keys, sampler settings, model name and
  the model's config (at the data resolution)."""
  zoo_config.check_keys(config.task, 'task', schema)
  check_sampling(config.task)
  zoo_config.check_choice(config.model.get('name', None), tuple(model_names), 'config.model.name')
  models.check_config(config.model, config.data.resolution)


def check_learned_sigma(config):
  """Learned σ (the iDDPM hybrid loss) needs ε-prediction."""
  if config.model.get('learn_sigma', False) and config.task.prediction_type != 'epsilon':
    raise ValueError('config.model.learn_sigma=True (the iDDPM hybrid loss) needs '
                     f'config.task.prediction_type="epsilon", not {config.task.prediction_type!r}')


def check_sampling(task):
  """Schedule, parameterisation and sampler keys of a diffusion task config."""
  zoo_config.check_choice(task.schedule, diffusion.SCHEDULES, 'config.task.schedule')
  zoo_config.check_choice(task.prediction_type, diffusion.PREDICTION_TYPES,
                          'config.task.prediction_type')
  zoo_config.check_choice(task.sampler, diffusion.SAMPLERS, 'config.task.sampler')
  if task.num_timesteps < 1 or not 1 <= task.sample_steps <= task.num_timesteps:
    raise ValueError(f'config.task.sample_steps={task.sample_steps} must lie in '
                     f'[1, num_timesteps={task.num_timesteps}]')
  if task.snr_gamma < 0:
    raise ValueError(f'config.task.snr_gamma={task.snr_gamma} must be >= 0 (0 = unweighted)')


def sampler_settings(cfg, sampler, steps, guidance_scale, eta):
  """Explicit sampler arguments, falling back to `config.task`; checked."""
  sampler = sampler or cfg.sampler
  zoo_config.check_choice(sampler, diffusion.SAMPLERS, 'sampler')
  steps = steps or cfg.sample_steps
  if not 1 <= steps <= cfg.num_timesteps:
    raise ValueError(f'steps={steps} must lie in [1, {cfg.num_timesteps}]')
  scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
  return dict(sampler=sampler, steps=steps, guidance_scale=float(scale),
              eta=cfg.eta if eta is None else eta)


def inpaint_settings(cfg, sampler, steps, guidance_scale, eta):
  """`sampler_settings` for inpainting: the DDPM chain unless the experiment samples by DDIM."""
  if sampler is None:
    sampler = cfg.sampler if cfg.sampler in diffusion.INPAINT_SAMPLERS else 'ddpm'
  return sampler_settings(cfg, sampler, steps, guidance_scale, eta)


@functools.partial(jax.jit, static_argnames=('task', 'num', 'sampler', 'steps', 'guidance_scale'))
def _sample(task, params, rng, labels_B, *, num, sampler, steps, guidance_scale, eta):
  rng_init, rng_loop = diffusion.split_keys(rng)
  x_T = diffusion.normal(rng_init, (num, *task.image_shape))
  model_fn = task.denoiser(params, labels_B, guidance_scale)
  spacing = task.timestep_spacing if sampler in ('ddpm', 'ddim') else 'linspace'
  x0 = diffusion.sample(model_fn, task.schedule, x_T, rng_loop, sampler=sampler, steps=steps,
                        eta=eta, prediction_type=task.cfg.prediction_type,
                        clip_x0=task.cfg.clip_x0, learned_variance=task.learn_sigma,
                        timestep_spacing=spacing)
  return (jnp.clip(x0, -1.0, 1.0) + 1.0) / 2.0


@functools.partial(jax.jit, static_argnames=('task', 'mode', 'sampler', 'steps', 'guidance_scale',
                                             'jump_length', 'jump_n_sample'))
def _inpaint(task, params, rng, x_known, mask, labels_B, *, mode, sampler, steps, guidance_scale,
             eta, jump_length, jump_n_sample):
  guided = task.denoiser(params, labels_B, guidance_scale)
  channels = task.image_shape[-1]  # Learned-σ models also return v: inpainting uses ε alone.
  x0 = diffusion.inpaint(lambda x, t: guided(x, t)[..., :channels], task.schedule, x_known, mask,
                         rng, mode=mode, sampler=sampler, steps=steps, eta=eta,
                         prediction_type=task.cfg.prediction_type, clip_x0=task.cfg.clip_x0,
                         jump_length=jump_length, jump_n_sample=jump_n_sample)
  return (jnp.clip(x0, -1.0, 1.0) + 1.0) / 2.0
