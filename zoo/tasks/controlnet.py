"""ControlNet training on top of a frozen diffusion run: structural control (depth, seg, pose).

Legend: B batch, R resolution, K hint channels.

Params are {'base', 'controlnet'}. `base` is the denoiser of the run `base_from` (a `diffusion`
run: U-Net or DiT, class-conditional or not), loaded from its checkpoint (EMA) and frozen;
`controlnet` (config.model, a 'controlnet' or 'dit_controlnet' whose copied fields equal the
base's) starts as a copy of the base's encoder (`controlnet.from_base`) with its zero
convolutions at zero, so step 0 reproduces the base exactly. Each batch's hint is computed
from the data feature of `config.task.control` (data/conditions.py); the loss is the base's
ε-loss with the ControlNet's residuals added. Labels are dropped to the null class with
probability `label_dropout`, as for the base, so guidance keeps working under control.

Sampling takes one hint per image (`hints`, BxRxRxK in [0, 1]) and a `conditioning_scale`;
`others` adds ControlNets of other runs over the same base, each with its own hints and scale,
their residuals summed (diffusers' MultiControlNetModel).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from data import conditions
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import models
from zoo.models import controlnet
from zoo.tasks import diffusion as diffusion_task

SCHEMA = diffusion_task.SCHEMA | {'control': str, 'base_from': str, 'conditioning_scale': float}
BASES = {'controlnet': 'unet', 'dit_controlnet': 'dit'}


def _check_base(config, base):
  """config.model's copied fields and the schedule must equal the base run's."""
  name = config.model.name
  ours = controlnet.base_fields(models.fields(name) | models.kwargs(config.model), name)
  diffusion_task.check_base_run(config, base, BASES[name], ours)


def check_control(config):
  """config.task.control names a hint computed from a data feature the config reads, with the
  ControlNet's conditioning_channels."""
  task = config.task
  control = conditions.get(task.control)
  if control.feature not in tuple(config.data.features):
    raise ValueError(f'config.task.control={task.control!r} is computed from the data feature '
                     f'{control.feature!r}: add it to config.data.features '
                     f'(now {tuple(config.data.features)})')
  if config.model.conditioning_channels != control.channels:
    raise ValueError(f'config.model.conditioning_channels={config.model.conditioning_channels}'
                     f' but the {task.control!r} hint has {control.channels} channel(s)')


class ControlNetTask(diffusion_task.DiffusionTask):
  """`init`, `loss`, `predict['sample' | 'inpaint']` of a ControlNet over a frozen base."""

  @staticmethod
  def check_config(config):
    task = config.task
    diffusion_task.check_denoiser_task(config, SCHEMA, BASES)
    check_control(config)
    if not 0.0 <= task.label_dropout < 1.0:
      raise ValueError(f'config.task.label_dropout={task.label_dropout} must lie in [0, 1)')
    if not task.base_from:
      raise ValueError('config.task.base_from must name the diffusion run to control')
    if os.path.isfile(os.path.join(task.base_from, 'config.json')):
      _check_base(config, diffusion_task.base_run_config(task.base_from))

  def __init__(self, config):
    name = config.model.name
    base = diffusion_task.base_run_config(config.task.base_from)
    _check_base(config, base)
    kwargs = models.kwargs(config.model)
    base_model = zoo_config.ConfigDict(
        {'name': BASES[name], **controlnet.base_fields(kwargs, name)})
    # The diffusion task's setup for the base (schedule, shapes, labels) builds its denoiser.
    super().__init__(zoo_config.ConfigDict(dict(model=base_model, task=config.task,
                                                data=config.data)))
    self.base = self.model
    self.model = models.build(config.model)  # The ControlNet; self.base is the denoiser.
    self.control = config.task.control
    self.feature = conditions.get(self.control).feature
    res = config.data.resolution
    self.hint_shape = (res * getattr(self.model, 'hint_factor', 1),) * 2 + (
        conditions.get(self.control).channels,)
    self.frozen = ('base',)
    self.pretrained = {'base': checkpoint.Source(config.task.base_from, '')}
    self.conditioning = 'control'
    # Training-free inpainting under control would need hints too: not offered yet.
    self.predict = {'sample': self.sample}

  def init(self, rng, batch):
    """Boxed params {'base', 'controlnet'} (the base's are replaced by the checkpoint's)."""
    rng_b, rng_c = jax.random.split(rng)
    x = batch['image']
    if x.shape[1:] != self.image_shape:
      raise ValueError(f'data images are {x.shape[1:]} but the base expects {self.image_shape}')
    t = jnp.zeros(x.shape[:1], jnp.int32)
    labels = self._labels(batch)
    hint = self.hints_of(batch)
    return {'base': self.base.init({'params': rng_b}, x, t, labels_B=labels)['params'],
            'controlnet': self.model.init({'params': rng_c}, x, t, hint, labels_B=labels)[
                'params']}

  def after_pretrained(self, params):
    """Once the base is loaded: the ControlNet's copied parts start as the base's."""
    return {**params, 'controlnet': controlnet.from_base(params['controlnet'], params['base'])}

  def hints_of(self, batch):
    """The batch's BxRxRxK hints, computed from the control's data feature."""
    return conditions.hint(self.control, batch[self.feature])

  def loss(self, params, batch, rng, train=True):
    """The base's ε-loss with the ControlNet's residuals added (only the ControlNet learns)."""
    x0 = batch['image']
    rng_t, rng_noise, rng_drop, rng_dropout = jax.random.split(rng, 4)
    t = jax.random.randint(rng_t, x0.shape[:1], 0, self.cfg.num_timesteps)
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    x_t = diffusion_task.diffusion.q_sample(self.schedule, x0, t, noise)
    labels = self._labels(batch)
    if labels is not None and train and self.cfg.label_dropout > 0:
      drop = jax.random.bernoulli(rng_drop, self.cfg.label_dropout, labels.shape)
      labels = jnp.where(drop, self.num_classes, labels)
    residuals = self.model.apply({'params': params['controlnet']}, x_t, t, self.hints_of(batch),
                                 labels_B=labels, train=train, rngs={'dropout': rng_dropout})
    pred = self.base.apply({'params': jax.lax.stop_gradient(params['base'])}, x_t, t,
                           labels_B=labels, control=residuals, train=train,
                           rngs={'dropout': rng_dropout})
    return diffusion_task.denoising_loss(self, pred, x0, x_t, noise, t)

  def _controls(self, params, hints, conditioning_scale, others, batch):
    """(static ControlNet modules, traced (params, hints, scale) per control), checked."""
    scale = self.cfg.conditioning_scale if conditioning_scale is None else conditioning_scale
    branches = [(self, params, hints, scale), *others]
    modules, values = [], []
    for task, p, h, s in branches:
      if not isinstance(task, ControlNetTask) or task.base != self.base:
        raise ValueError('every control must be a ControlNet run over the same base model')
      h = np.asarray(h, np.float32)
      if h.shape != (batch, *task.hint_shape):
        raise ValueError(f'{task.control!r} hints are {h.shape}; want ({batch}, '
                         f'{", ".join(map(str, task.hint_shape))})')
      modules.append(task.model)
      values.append((p['controlnet'], jnp.asarray(h), jnp.float32(s)))
    return tuple(modules), tuple(values)

  def sample(self, params, rng, labels_B=None, *, hints=None, num=None, conditioning_scale=None,
             others=(), sampler=None, steps=None, guidance_scale=None, eta=None):
    """Images in [0, 1] (BxHxWxC), one per hint (BxRxRxK in [0, 1]).

    `others`: (ControlNetTask, its params, its hints, its scale) of further controls over the
    same base; their residuals add to this run's.
    """
    if hints is None:
      raise ValueError('a ControlNet run samples under control: pass hints (BxRxRxK in [0, 1])')
    num = len(hints)
    labels_B, _ = self._check_labels(labels_B, num)
    if labels_B is not None and labels_B.shape[0] != num:
      raise ValueError(f'{labels_B.shape[0]} labels for {num} hints')
    modules, values = self._controls(params, hints, conditioning_scale, others, num)
    settings = diffusion_task.sampler_settings(self.cfg, sampler, steps, guidance_scale, eta)
    return _sample(self, modules, params['base'], values, rng, labels_B, num=num, **settings)

  def _check_labels(self, labels_B, num):
    if not self.num_classes and labels_B is None:
      return None, num
    return super()._check_labels(labels_B, num)

  def controlled(self, modules, base_params, values, labels_B, guidance_scale):
    """model_fn(x_t, t_B): the base under the summed residuals of every control, guided.

    Both guidance branches see the hints (diffusers' default; only the label is dropped).
    """
    hints = tuple(h for _, h, _ in values)

    def pred_fn(x, t, cond):
      labels, hints = cond
      residuals = controlnet.combine(
          m.apply({'params': p}, x, t, h, labels_B=labels, conditioning_scale=s)
          for m, (p, _, s), h in zip(modules, values, hints))
      return self.base.apply({'params': base_params}, x, t, labels_B=labels,
                             control=residuals).astype(jnp.float32)
    if labels_B is None or guidance_scale == 1.0:
      return lambda x, t: pred_fn(x, t, (labels_B, hints))
    null = jnp.full_like(labels_B, self.num_classes)
    return diffusion_task.diffusion.classifier_free_guidance(
        pred_fn, (labels_B, hints), (null, hints), guidance_scale)

  __hash__ = object.__hash__


@functools.partial(jax.jit, static_argnames=('task', 'modules', 'num', 'sampler', 'steps',
                                             'guidance_scale'))
def _sample(task, modules, base_params, values, rng, labels_B, *, num, sampler, steps,
            guidance_scale, eta):
  rng_init, rng_loop = diffusion_task.diffusion.split_keys(rng)
  x_T = diffusion_task.diffusion.normal(rng_init, (num, *task.image_shape))
  model_fn = task.controlled(modules, base_params, values, labels_B, guidance_scale)
  x0 = diffusion_task.diffusion.sample(
      model_fn, task.schedule, x_T, rng_loop, sampler=sampler, steps=steps, eta=eta,
      prediction_type=task.cfg.prediction_type, clip_x0=task.cfg.clip_x0,
      learned_variance=task.learn_sigma)
  return (jnp.clip(x0, -1.0, 1.0) + 1.0) / 2.0

