"""Text-to-image diffusion, in pixel space or in the latent space of a frozen VAE.

Legend: B batch, L tokens, D text width, P pooled width, H/W image, h/w latent, Z latent channels.

The denoiser (a U-Net with cross-attention blocks, or a DiT with cross-attention and pooled
text in adaLN) attends to the text encoder's token features. Params are
{'denoiser', 'text_encoder'[, 'vae']}: the text encoder trains jointly from scratch, or
starts from another run (`text_encoder_from`) and is frozen unless `train_text_encoder`; the
VAE (`vae` non-empty) always comes frozen from a VAE run (`vae_from`), encodes each batch to
scaled latents z = (mean + σ ε - shift) * scale, and decodes samples; with `latent_key` the
posterior moments come pre-computed in the batch (`zoo latents`, zoo/latents.py) and the
encoder is skipped, after a check that they came from this VAE. A fraction
`caption_dropout` of captions is replaced by the empty prompt, so one network gives both
terms of classifier-free guidance; sampling guides against the empty prompt or a negative
prompt.

Optional task keys (absent = the default) carry the conventions of converted Stable Diffusion
pipelines (`zoo convert --from diffusers-sd`): `attend_padding` (the text encoder and the
denoiser see all max_len positions, padding included, as SD's UNet was trained; default False:
padding is masked), and the DDPM/DDIM grid `timestep_spacing` ('linspace'), `steps_offset` (0)
and `set_alpha_to_one` (True), as in diffusers' DDIMScheduler (see `diffusion.sample`).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from data import captions
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import diffusion
from zoo import latents
from zoo import models
from zoo.models import text
from zoo.models import vae as vae_lib
from zoo.tasks import diffusion as diffusion_task

ConfigDict = zoo_config.ConfigDict
log = logging.getLogger('zoo')

SCHEMA = {k: v for k, v in diffusion_task.SCHEMA.items() if k != 'label_dropout'} | {
    'caption_dropout': float, 'negative_prompt': str,
    'text_encoder': ConfigDict, 'text_encoder_from': str, 'train_text_encoder': bool,
    'vae': ConfigDict, 'vae_from': str, 'latent_key': str,
}
OPTIONAL = {'attend_padding': bool, 'timestep_spacing': str, 'steps_offset': int,
            'set_alpha_to_one': bool}


def _text_widths(text_cfg):
  """(token feature width D, pooled width P) of a text encoder config."""
  kw = models.fields('text') | models.kwargs(text_cfg)
  return kw['width'], text.pooled_width(kw)


def _check_text(config):
  task = config.task
  if 'text' not in config.data:
    raise ValueError('the text_to_image task needs captions: set config.data.text '
                     f'({captions.SCHEMA_HINT})')
  zoo_config.check_choice(task.text_encoder.get('name', None), ('text',),
                          'config.task.text_encoder.name')
  models.check_config(task.text_encoder, None)
  max_len = (models.fields('text') | models.kwargs(task.text_encoder))['max_len']
  if config.data.text.max_len > max_len:
    raise ValueError(f'config.data.text.max_len={config.data.text.max_len} exceeds '
                     f'config.task.text_encoder.max_len={max_len}')
  if not task.text_encoder_from and not task.train_text_encoder:
    raise ValueError('config.task.train_text_encoder=False needs text_encoder_from (a run to '
                     'take the frozen text encoder from); a frozen random encoder is useless')
  width, pooled = _text_widths(task.text_encoder)
  model = models.fields(config.model.name) | models.kwargs(config.model)
  if model['context_dim'] != width:
    raise ValueError(f'config.model.context_dim={model["context_dim"]} must equal the text '
                     f'encoder width {width} (config.task.text_encoder.width)')
  if model.get('pooled_dim', 0) not in (0, pooled):
    raise ValueError(f'config.model.pooled_dim={model["pooled_dim"]} must be 0 or the text '
                     f'encoder pooled width {pooled}')


def denoiser_resolution(config):
  """The denoiser's resolution: the image's, or the latent's for a latent model (the VAE
  fields checked)."""
  task, resolution = config.task, config.data.resolution
  if not task.vae:
    if task.vae_from:
      raise ValueError('config.task.vae_from is set but config.task.vae is empty')
    return resolution
  zoo_config.check_choice(task.vae.get('name', None), ('vae',), 'config.task.vae.name')
  models.check_config(task.vae, resolution)
  if not task.vae_from:
    raise ValueError('config.task.vae needs config.task.vae_from: the run that trained it '
                     '(experiments/vae_shapes.py)')
  vae = models.fields('vae') | models.kwargs(task.vae)
  channels = (models.fields(config.model.name) | models.kwargs(config.model))['in_channels']
  if channels != vae['latent_channels']:
    raise ValueError(f'config.model.in_channels={channels} must equal the latent channels '
                     f'config.task.vae.latent_channels={vae["latent_channels"]}')
  return resolution // 2 ** (len(vae['block_out_channels']) - 1)


class TextToImageTask:
  """`init`, `loss` and `predict['sample']` (prompts -> images) for text-to-image diffusion."""

  conditioning = 'text'

  @staticmethod
  def check_config(config):
    task = config.task
    zoo_config.check_keys(task, 'task', SCHEMA | {k: v for k, v in OPTIONAL.items() if k in task})
    diffusion_task.check_sampling(task)
    zoo_config.check_choice(task.get('timestep_spacing', 'linspace'), diffusion.TIMESTEP_SPACINGS,
                            'config.task.timestep_spacing')
    if not 0 <= task.get('steps_offset', 0) < task.num_timesteps:
      raise ValueError(f'config.task.steps_offset={task.steps_offset} must lie in '
                       f'[0, num_timesteps={task.num_timesteps})')
    if not 0.0 <= task.caption_dropout < 1.0:
      raise ValueError(f'config.task.caption_dropout={task.caption_dropout} must lie in [0, 1)')
    zoo_config.check_choice(config.model.get('name', None), diffusion_task.DENOISERS,
                            'config.model.name')
    if config.model.get('num_classes', 0):
      raise ValueError('config.model.num_classes must be 0: this task conditions on text')
    _check_text(config)
    diffusion_task.check_learned_sigma(config)
    models.check_config(config.model, denoiser_resolution(config))
    if task.latent_key:
      if not task.vae:
        raise ValueError('config.task.latent_key needs a latent model: set config.task.vae')
      if task.latent_key not in config.data.features:
        raise ValueError(f'config.task.latent_key={task.latent_key!r} must be one of '
                         f'config.data.features={tuple(config.data.features)}')

  def __init__(self, config):
    task = self.cfg = config.task
    self.model = models.build(config.model)
    self.text_encoder = models.build(task.text_encoder)
    self.vae = models.build(task.vae) if task.vae else None
    self.tokenizer = captions.build_tokenizer(config.data.text)
    self.max_len = config.data.text.max_len
    self.use_pooled = config.model.get('pooled_dim', 0) > 0
    self.attend_padding = task.get('attend_padding', False)
    self.ddim_grid = dict(timestep_spacing=task.get('timestep_spacing', 'linspace'),
                          steps_offset=task.get('steps_offset', 0),
                          set_alpha_to_one=task.get('set_alpha_to_one', True))
    self.learn_sigma = bool(config.model.get('learn_sigma', False))
    res = config.data.resolution
    channels = config.model.in_channels
    # What users pass and get: pixels (the VAE's input when the denoiser runs on latents).
    self.pixel_shape = (res, res, self.vae.in_channels if self.vae is not None else channels)
    if self.vae is not None:
      res //= 2 ** (len(self.vae.block_out_channels) - 1)
    self.image_shape = (res, res, channels)
    self.schedule = diffusion.Schedule.create(task.schedule, task.num_timesteps)
    self.frozen = () if task.train_text_encoder else ('text_encoder',)
    self.pretrained = {}
    if task.text_encoder_from:
      self.pretrained['text_encoder'] = checkpoint.Source(task.text_encoder_from, 'text_encoder')
    if self.vae is not None:
      self.frozen += ('vae',)
      self.pretrained['vae'] = checkpoint.Source(task.vae_from, 'vae')
    self.latents = None  # The record of pre-computed latents, checked against the VAE.
    if task.latent_key:
      self.latents = (latents.check_provenance(config), config.data.data_dir)
    self.predict = {'sample': self.sample, 'encode_text': self.encode_text,
                    'inpaint': self.inpaint}

  def init(self, rng, batch):
    """Boxed params {'denoiser', 'text_encoder'[, 'vae']} for a batch of this shape."""
    rng_d, rng_t, rng_v = jax.random.split(rng, 3)
    params = {'text_encoder': self.text_encoder.init(
        {'params': rng_t}, batch['tokens'], batch['tokens_mask'])['params']}
    x = batch['image']
    if self.vae is not None:
      params['vae'] = self.vae.init({'params': rng_v}, x)['params']
      x = jax.eval_shape(lambda: self._latents(params['vae'], batch, None))
    if tuple(x.shape[1:]) != self.image_shape:
      raise ValueError(f'the denoiser sees {tuple(x.shape[1:])} but expects {self.image_shape} '
                       '(config.data.resolution, config.model.in_channels, the VAE factor)')
    t = jnp.zeros(x.shape[:1], jnp.int32)
    cond = self.encode_text(params, batch['tokens'], batch['tokens_mask'])
    params['denoiser'] = self.model.init({'params': rng_d}, jnp.zeros(x.shape, x.dtype), t,
                                         **cond)['params']
    return params

  def after_pretrained(self, params):
    """Called once the pretrained parts are loaded: pre-computed latents must be this VAE's."""
    if self.latents is not None:
      record, data_dir = self.latents
      latents.check_vae_params(record, params['vae'], data_dir)
    return params

  def _latents(self, vae_params, batch, rng):
    if self.cfg.latent_key:
      mean, logvar = jnp.split(batch[self.cfg.latent_key], 2, axis=-1)
    else:
      mean, logvar = self.vae.apply({'params': vae_params}, batch['image'], method='encode')
    return vae_lib.to_latent(mean, logvar, rng, self.vae.scaling_factor, self.vae.shift_factor)

  def encode_text(self, params, tokens_BxL, mask_BxL):
    """Denoiser conditioning kwargs {context_BxLxD, context_mask_BxL[, pooled_BxD]}."""
    if self.attend_padding:
      mask_BxL = jnp.ones(mask_BxL.shape, bool)
    features_BxLxD, pooled_BxP = self.text_encoder.apply(
        {'params': params['text_encoder']}, tokens_BxL, mask_BxL)
    cond = {'context_BxLxD': features_BxLxD, 'context_mask_BxL': mask_BxL}
    if self.use_pooled:
      cond['pooled_BxD'] = pooled_BxP
    return cond

  def empty_tokens(self, num, prompt=''):
    """Tokens and mask of `prompt` (default the empty prompt) repeated `num` times."""
    ids, mask = self.tokenizer.encode([prompt], self.max_len)
    return jnp.repeat(ids, num, axis=0), jnp.repeat(mask, num, axis=0)

  def loss(self, params, batch, rng, train=True):
    """Mean ε-loss at uniform timesteps; captions dropped to the empty prompt at random."""
    rng_t, rng_noise, rng_drop, rng_z, rng_dropout = jax.random.split(rng, 5)
    tokens, mask = batch['tokens'], batch['tokens_mask']
    if train and self.cfg.caption_dropout > 0:
      drop_B = jax.random.bernoulli(rng_drop, self.cfg.caption_dropout, tokens.shape[:1])
      empty_ids, empty_mask = self.empty_tokens(tokens.shape[0])
      tokens = jnp.where(drop_B[:, None], empty_ids, tokens)
      mask = jnp.where(drop_B[:, None], empty_mask, mask)
    if 'text_encoder' in self.frozen:
      params = {**params, 'text_encoder': jax.lax.stop_gradient(params['text_encoder'])}
    cond = self.encode_text(params, tokens, mask)
    x0 = batch['image']
    if self.vae is not None:
      x0 = jax.lax.stop_gradient(self._latents(params['vae'], batch, rng_z))
    t = jax.random.randint(rng_t, x0.shape[:1], 0, self.cfg.num_timesteps)
    noise = jax.random.normal(rng_noise, x0.shape, x0.dtype)
    x_t = diffusion.q_sample(self.schedule, x0, t, noise)
    pred = self.model.apply({'params': params['denoiser']}, x_t, t, train=train,
                            rngs={'dropout': rng_dropout}, **cond)
    return diffusion_task.denoising_loss(self, pred, x0, x_t, noise, t)

  def sample(self, params, rng, labels_B=None, *, prompts=None, negative_prompts=None,
             num=None, sampler=None, steps=None, guidance_scale=None, eta=None):
    """Images in [0, 1] (BxHxWxC), one per prompt.

    Guidance contrasts each prompt with its negative prompt (default `config.task.
    negative_prompt`, usually the empty prompt the model learned by caption dropout).
    """
    if labels_B is not None or num is not None:
      raise ValueError('this model is text-conditional: pass prompts=[...], not labels or num')
    settings = diffusion_task.sampler_settings(self.cfg, sampler, steps, guidance_scale, eta)
    return _sample(self, params, rng, *self._tokens(prompts, negative_prompts), **settings)

  def _tokens(self, prompts, negative_prompts):
    """(ids, mask, negative ids, negative mask) of the prompts, checked."""
    if not prompts or isinstance(prompts, str):
      raise ValueError('prompts must be a non-empty list of strings')
    prompts = list(prompts)
    if negative_prompts is None:
      negative_prompts = [self.cfg.negative_prompt] * len(prompts)
    if len(negative_prompts) != len(prompts):
      raise ValueError(f'{len(negative_prompts)} negative prompts for {len(prompts)} prompts')
    return (*self.tokenizer.encode(prompts, self.max_len),
            *self.tokenizer.encode(list(negative_prompts), self.max_len))

  def inpaint(self, params, rng, images, masks, labels_B=None, *, prompts=None,
              negative_prompts=None, mode='repaint', sampler=None, steps=None,
              guidance_scale=None, eta=None, jump_length=10, jump_n_sample=10):
    """`images` (BxHxWxC pixels in [0, 1]) regenerated where `masks` is 1, one prompt each.

    Latent runs encode the images with the VAE (posterior mean), inpaint the latents under the
    mask max-pooled to the latent grid (a latent is regenerated if any of its pixels is), decode,
    and paste the known pixels back: pixels outside the mask come back exactly in both spaces.
    """
    if labels_B is not None:
      raise ValueError('this model is text-conditional: pass prompts=[...], not labels')
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != self.pixel_shape:
      raise ValueError(f'images have shape {images.shape}; this model needs Bx{self.pixel_shape}')
    masks = diffusion.check_mask(masks, images.shape)
    tokens = self._tokens(prompts, negative_prompts)
    if len(tokens[0]) != images.shape[0]:
      raise ValueError(f'{len(tokens[0])} prompts for {images.shape[0]} images')
    settings = diffusion_task.inpaint_settings(self.cfg, sampler, steps, guidance_scale, eta)
    full = np.broadcast_to(masks, images.shape[:-1] + (1,))
    out = _inpaint(self, params, rng, jnp.asarray(images * 2.0 - 1.0), jnp.asarray(full), *tokens,
                   mode=mode, jump_length=jump_length, jump_n_sample=jump_n_sample, **settings)
    return np.where(full > 0, np.asarray(out), images)

  # Tasks are static arguments of jitted functions: identity hashing is what we want.
  __hash__ = object.__hash__


def _guided(task, params, ids, mask, neg_ids, neg_mask, guidance_scale):
  """model_fn(x_t, t_B) of the denoiser under the prompts, guided against the negatives."""
  cond = task.encode_text(params, ids, mask)

  def pred_fn(x, t, c):
    return task.model.apply({'params': params['denoiser']}, x, t, **c).astype(jnp.float32)

  if guidance_scale == 1.0:
    return lambda x, t: pred_fn(x, t, cond)
  return diffusion.classifier_free_guidance(
      pred_fn, cond, task.encode_text(params, neg_ids, neg_mask), guidance_scale)


def _to_pixels(task, params, x0):
  if task.vae is not None:
    z = vae_lib.from_latent(x0, task.vae.scaling_factor, task.vae.shift_factor)
    x0 = task.vae.apply({'params': params['vae']}, z, method='decode')
  return (jnp.clip(x0, -1.0, 1.0) + 1.0) / 2.0


@functools.partial(jax.jit, static_argnames=('task', 'sampler', 'steps', 'guidance_scale'))
def _sample(task, params, rng, ids, mask, neg_ids, neg_mask, *, sampler, steps, guidance_scale,
            eta):
  rng_init, rng_loop = diffusion.split_keys(rng)
  x_T = diffusion.normal(rng_init, (ids.shape[0], *task.image_shape))
  model_fn = _guided(task, params, ids, mask, neg_ids, neg_mask, guidance_scale)
  grid = task.ddim_grid if sampler in ('ddpm', 'ddim') else {}
  x0 = diffusion.sample(model_fn, task.schedule, x_T, rng_loop, sampler=sampler, steps=steps,
                        eta=eta, prediction_type=task.cfg.prediction_type,
                        clip_x0=task.cfg.clip_x0 and task.vae is None,
                        learned_variance=task.learn_sigma, **grid)
  return _to_pixels(task, params, x0)


@functools.partial(jax.jit, static_argnames=('task', 'mode', 'sampler', 'steps', 'guidance_scale',
                                             'jump_length', 'jump_n_sample'))
def _inpaint(task, params, rng, x_known, mask, ids, tokens_mask, neg_ids, neg_mask, *, mode,
             sampler, steps, guidance_scale, eta, jump_length, jump_n_sample):
  if task.vae is not None:
    mean, logvar = task.vae.apply({'params': params['vae']}, x_known, method='encode')
    x_known = vae_lib.to_latent(mean, logvar, None, task.vae.scaling_factor,
                                task.vae.shift_factor)
    b, h, w, _ = mask.shape
    f = h // x_known.shape[1]
    mask = jnp.max(mask.reshape(b, h // f, f, w // f, f, 1), axis=(2, 4))
  guided = _guided(task, params, ids, tokens_mask, neg_ids, neg_mask, guidance_scale)
  channels = task.image_shape[-1]  # Learned-σ models also return v: inpainting uses ε alone.
  x0 = diffusion.inpaint(lambda x, t: guided(x, t)[..., :channels], task.schedule, x_known, mask,
                         rng, mode=mode, sampler=sampler, steps=steps, eta=eta,
                         prediction_type=task.cfg.prediction_type,
                         clip_x0=task.cfg.clip_x0 and task.vae is None, jump_length=jump_length,
                         jump_n_sample=jump_n_sample)
  return _to_pixels(task, params, x0)
