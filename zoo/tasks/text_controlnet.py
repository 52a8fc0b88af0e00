"""ControlNet over a frozen text-to-image run: Stable Diffusion's ControlNet (prompt + hint).

Legend: B batch, R pixel resolution, K hint channels, L tokens.

Params are {'base', 'controlnet'}. `base` is the whole text_to_image run `base_from` (its
{'denoiser', 'text_encoder', 'vae'}: trained here, or a pipeline converted with `zoo convert
--from diffusers-sd`), loaded from its checkpoint (EMA) and frozen; `controlnet` (config.model,
a 'controlnet' whose U-Net fields equal the base denoiser's and whose hint encoder downsamples by
the VAE's factor, so hints are pixel-sized) starts as a copy of the base encoder with zero
convolutions at zero: step 0 reproduces the base exactly. Training encodes each image with the
base VAE and each caption with its text encoder (dropped to the empty prompt with probability
`caption_dropout`), and the ControlNet, which also cross-attends to the caption, adds its
residuals to the base U-Net's skips. Sampling takes prompts and one hint per prompt; both
guidance branches see the hint (diffusers' StableDiffusionControlNetPipeline without
guess_mode). Everything about the schedule, tokenizer, VAE and text encoder is the base run's.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from data import conditions
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import diffusion
from zoo import models
from zoo.models import controlnet
from zoo.tasks import controlnet as controlnet_task
from zoo.tasks import diffusion as diffusion_task
from zoo.tasks import text_to_image

SCHEMA = {'name': str, 'control': str, 'base_from': str, 'conditioning_scale': float,
          'caption_dropout': float, 'negative_prompt': str, 'sampler': str, 'sample_steps': int,
          'eta': float, 'guidance_scale': float}
# What this run's config.data.text must share with the base's (the token ids mean one thing).
_TEXT_KEYS = ('tokenizer', 'tokenizer_path', 'max_len', 'pad_token')


def base_config(config):
  """The base text_to_image run's config, checked against this ControlNet's."""
  task = config.task
  base = zoo_config.run_config(task.base_from, 'config.task.base_from',
                               'train or convert the text-to-image base first')
  where = f'config.task.base_from={task.base_from!r}'
  if base.task.name != 'text_to_image' or base.model.name != 'unet':
    raise ValueError(f'{where} is a {base.task.name!r} run of a {base.model.name!r}; a text '
                     'ControlNet steers a text_to_image U-Net (latent or pixel)')
  ours = controlnet.base_fields(models.fields('controlnet') | models.kwargs(config.model),
                                'controlnet')
  theirs = models.fields('unet') | models.kwargs(base.model)
  differ = [k for k in ours if k not in diffusion_task.COMPUTE_FIELDS and ours[k] != theirs.get(k)]
  differ += [f'data.text.{k}' for k in _TEXT_KEYS
             if config.data.text.get(k, '') != base.data.text.get(k, '')]
  if config.data.resolution != base.data.resolution:
    differ.append('data.resolution')
  if differ:
    raise ValueError(f'config differs from the base run {where} in {differ}: the ControlNet '
                     "copies the base U-Net and reads the base's tokens and images")
  return base


class TextControlNetTask:
  """`init`, `loss`, `predict['sample']` of a ControlNet over a frozen text-to-image run."""

  conditioning = 'text'

  @staticmethod
  def check_config(config):
    task = config.task
    zoo_config.check_keys(task, 'task', SCHEMA)
    zoo_config.check_choice(config.model.get('name', None), ('controlnet',), 'config.model.name')
    zoo_config.check_choice(task.sampler, diffusion.SAMPLERS, 'config.task.sampler')
    if not 0.0 <= task.caption_dropout < 1.0:
      raise ValueError(f'config.task.caption_dropout={task.caption_dropout} must lie in [0, 1)')
    if 'text' not in config.data:
      raise ValueError('a text ControlNet reads captions: set config.data.text (the base run\'s)')
    controlnet_task.check_control(config)
    if not task.base_from:
      raise ValueError('config.task.base_from must name the text_to_image run to control')
    if os.path.isfile(os.path.join(task.base_from, 'config.json')):
      _check_against_base(config, base_config(config))

  def __init__(self, config):
    base = base_config(config)
    base.task.latent_key = ''  # This run's data has images; the base VAE encodes them.
    self.base = text_to_image.TextToImageTask(base)
    _check_against_base(config, base)
    task = self.cfg = zoo_config.ConfigDict(base.task.to_dict())
    task.update({k: v for k, v in config.task.items() if k != 'name'})
    self.model = models.build(config.model)
    self.control = task.control
    self.feature = conditions.get(self.control).feature
    self.hint_shape = self.base.pixel_shape[:2] + (conditions.get(self.control).channels,)
    self.schedule, self.tokenizer, self.max_len = (self.base.schedule, self.base.tokenizer,
                                                   self.base.max_len)
    self.image_shape, self.pixel_shape = self.base.image_shape, self.base.pixel_shape
    self.learn_sigma = False
    self.frozen = ('base',)
    self.pretrained = {'base': checkpoint.Source(config.task.base_from, '')}
    self.predict = {'sample': self.sample}

  def init(self, rng, batch):
    """Boxed params {'base', 'controlnet'} (the base's are replaced by the checkpoint's)."""
    rng_b, rng_c = jax.random.split(rng)
    base = self.base.init(rng_b, batch)
    x = jax.eval_shape(lambda: self.base._latents(base['vae'], batch, None)) if (
        self.base.vae is not None) else batch['image']
    x = jnp.zeros(x.shape, x.dtype)
    cond = self.base.encode_text(base, batch['tokens'], batch['tokens_mask'])
    t = jnp.zeros(x.shape[:1], jnp.int32)
    return {'base': base, 'controlnet': self.model.init(
        {'params': rng_c}, x, t, self.hints_of(batch), **cond)['params']}

  def after_pretrained(self, params):
    """Once the base is loaded: the ControlNet's copied parts start as the base denoiser's."""
    return {**params, 'controlnet': controlnet.from_base(params['controlnet'],
                                                         params['base']['denoiser'])}

  def hints_of(self, batch):
    return conditions.hint(self.control, batch[self.feature])

  def loss(self, params, batch, rng, train=True):
    """The base's ε-loss with the ControlNet's residuals added (only the ControlNet learns)."""
    rng_t, rng_noise, rng_drop, rng_z, rng_dropout = jax.random.split(rng, 5)
    base = jax.lax.stop_gradient(params['base'])
    tokens, mask = batch['tokens'], batch['tokens_mask']
    if train and self.cfg.caption_dropout > 0:
      drop_B = jax.random.bernoulli(rng_drop, self.cfg.caption_dropout, tokens.shape[:1])
      empty_ids, empty_mask = self.base.empty_tokens(tokens.shape[0])
      tokens = jnp.where(drop_B[:, None], empty_ids, tokens)
      mask = jnp.where(drop_B[:, None], empty_mask, mask)
    cond = self.base.encode_text(base, tokens, mask)
    x0 = batch['image']
    if self.base.vae is not None:
      x0 = self.base._latents(base['vae'], batch, rng_z)
    t = jax.random.randint(rng_t, x0.shape[:1], 0, self.cfg.num_timesteps)
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(self.schedule, x0, t, noise)
    residuals = self.model.apply({'params': params['controlnet']}, x_t, t, self.hints_of(batch),
                                 train=train, rngs={'dropout': rng_dropout}, **cond)
    pred = self.base.model.apply({'params': base['denoiser']}, x_t, t, control=residuals,
                                 train=train, rngs={'dropout': rng_dropout}, **cond)
    return diffusion_task.denoising_loss(self.base, pred, x0, x_t, noise, t)

  def sample(self, params, rng, labels_B=None, *, prompts=None, negative_prompts=None,
             hints=None, conditioning_scale=None, others=(), num=None, sampler=None, steps=None,
             guidance_scale=None, eta=None):
    """Images in [0, 1] (BxRxRx3), one per prompt and hint (BxRxRxK in [0, 1]).

    `others`: (TextControlNetTask, its params, its hints, its scale) of further controls over
    the same base; their residuals add to this run's.
    """
    if labels_B is not None:
      raise ValueError('this model is text-conditional: pass prompts=[...], not labels')
    if hints is None:
      raise ValueError('a ControlNet run samples under control: pass hints (BxRxRxK in [0, 1])')
    tokens = self.base._tokens(prompts, negative_prompts)
    if num is not None and num != len(tokens[0]):
      raise ValueError(f'num={num} but {len(tokens[0])} prompts')
    modules, values = self._controls(params, hints, conditioning_scale, others, len(tokens[0]))
    settings = diffusion_task.sampler_settings(self.cfg, sampler, steps, guidance_scale, eta)
    return _sample(self, modules, params['base'], values, rng, *tokens, **settings)

  def _controls(self, params, hints, conditioning_scale, others, batch):
    """(static ControlNet modules, traced (params, hints, scale) per control), checked."""
    scale = self.cfg.conditioning_scale if conditioning_scale is None else conditioning_scale
    modules, values = [], []
    for task, p, h, s in [(self, params, hints, scale), *others]:
      if not isinstance(task, TextControlNetTask) or task.base.model != self.base.model:
        raise ValueError('every control must be a text ControlNet run over the same base model')
      h = np.asarray(h, np.float32)
      if h.shape != (batch, *task.hint_shape):
        raise ValueError(f'{task.control!r} hints are {h.shape}; want ({batch}, '
                         f'{", ".join(map(str, task.hint_shape))}): one per prompt')
      modules.append(task.model)
      values.append((p['controlnet'], jnp.asarray(h), jnp.float32(s)))
    return tuple(modules), tuple(values)

  __hash__ = object.__hash__


def _check_against_base(config, base):
  factor = 2 ** (len(base.task.vae.block_out_channels) - 1) if base.task.vae else 1
  kw = models.fields('controlnet') | models.kwargs(config.model)
  got = 2 ** (len(kw['conditioning_embedding_out_channels']) - 1)
  if got != factor:
    raise ValueError(f'config.model.conditioning_embedding_out_channels='
                     f'{tuple(kw["conditioning_embedding_out_channels"])} downsamples hints by '
                     f'{got}; the base denoises at 1/{factor} of the pixel size (its VAE), so '
                     f'give it {int(np.log2(factor)) + 1} widths')


@functools.partial(jax.jit, static_argnames=('task', 'modules', 'sampler', 'steps',
                                             'guidance_scale'))
def _sample(task, modules, base_params, values, rng, ids, mask, neg_ids, neg_mask, *, sampler,
            steps, guidance_scale, eta):
  base = task.base
  rng_init, rng_loop = diffusion.split_keys(rng)
  x_T = diffusion.normal(rng_init, (ids.shape[0], *base.image_shape))
  hints = tuple(h for _, h, _ in values)

  def pred_fn(x, t, cond):
    text, hints = cond
    residuals = controlnet.combine(
        m.apply({'params': p}, x, t, h, conditioning_scale=s, **text)
        for m, (p, _, s), h in zip(modules, values, hints))
    return base.model.apply({'params': base_params['denoiser']}, x, t, control=residuals,
                            **text).astype(jnp.float32)

  cond = (base.encode_text(base_params, ids, mask), hints)
  if guidance_scale == 1.0:
    model_fn = lambda x, t: pred_fn(x, t, cond)  # noqa: E731
  else:
    uncond = (base.encode_text(base_params, neg_ids, neg_mask), hints)
    model_fn = diffusion.classifier_free_guidance(pred_fn, cond, uncond, guidance_scale)
  grid = base.ddim_grid if sampler in ('ddpm', 'ddim') else {}
  x0 = diffusion.sample(model_fn, base.schedule, x_T, rng_loop, sampler=sampler, steps=steps,
                        eta=eta, prediction_type=base.cfg.prediction_type,
                        clip_x0=base.cfg.clip_x0 and base.vae is None,
                        learned_variance=base.learn_sigma, **grid)
  return text_to_image._to_pixels(base, base_params, x0)
