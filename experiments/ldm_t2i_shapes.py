r"""Latent text-to-image on the shapes scenes (64x64 RGB): a cross-attention U-Net over the
16x16x4 latents of the frozen VAE of experiments/vae_shapes.py, conditioned on captions by a
text transformer trained jointly from scratch.

First train the VAE, then this (the VAE's params are read from its workdir once, frozen, and
saved in this run's checkpoints, so sampling needs only this workdir):

  zoo train --config experiments/vae_shapes.py --workdir workdirs/vae_shapes
  zoo train --config experiments/ldm_t2i_shapes.py --workdir workdirs/ldm_t2i_shapes
  zoo sample --workdir workdirs/ldm_t2i_shapes --prompt "a red star left of a blue circle." \
      --num 8 --guidance 4 --out t2i.png
  zoo train --config experiments/ldm_t2i_shapes.py:smoke=True,vae=/tmp/vae_smoke \
      --workdir /tmp/ldm_smoke

With the latents encoded once (the VAE encoder then never runs during training):

  zoo latents --config experiments/ldm_t2i_shapes.py --out latents/shapes64
  zoo train --config experiments/ldm_t2i_shapes.py:latents=latents/shapes64 \
      --workdir workdirs/ldm_t2i_shapes

Arguments: smoke (bool, seconds-long, on `tiny64`, with the smoke VAE), steps (int, 0 =
default), vae (the VAE run's workdir; default workdirs/vae_shapes), model ('unet' or 'dit':
a DiT over 2x2 latent patches with cross-attention and pooled text in adaLN; see
experiments/dit_t2i_shapes.py), latents (a `zoo latents --out` directory to read the
pre-computed posteriors from; '' = encode every batch).
"""


from zoo import config as zoo_config
from zoo import latents as zoo_latents
from zoo import models
from zoo import sharding

ConfigDict = zoo_config.ConfigDict
PROMPTS = ('one shape: a red circle.', 'one shape: a blue square.',
           'a green star left of a yellow heart.', 'two shapes: a purple cross and an orange '
           'triangle.')
# 1 / std of the VAE's latents on shapes (its `recon` evaluator reports latent_std), so the
# diffusion sees roughly unit-variance latents, as SD's 0.18215. Measured on the default
# 600-step vae_shapes run: latent std 2.10 (EMA params, validation) -> 0.4755.
LATENT_SCALE = 0.48
RESOLUTION = 64


def vae_model(smoke):
  """The VAE architecture of experiments/vae_shapes.py (this run loads its params)."""
  return zoo_config.sibling(__file__, 'vae_shapes').get_config(f'smoke={smoke}').model


def denoiser(kind, smoke, text_width, vae):
  """The latent denoiser: a cross-attention U-Net or a text-conditioned DiT."""
  latent_channels = vae.latent_channels
  if kind == 'dit':
    size = dict(hidden_size=32, depth=2, num_heads=4) if smoke else dict(
        hidden_size=192, depth=6, num_heads=4)
    latent_size = RESOLUTION // 2 ** (len(vae.block_out_channels) - 1)
    return models.config('dit', input_size=latent_size, patch_size=2,
                         in_channels=latent_channels, num_classes=0, learn_sigma=False,
                         context_dim=text_width, pooled_dim=text_width, **size)
  return models.config(
      'unet', preset='tiny-t2i', in_channels=latent_channels, out_channels=latent_channels,
      context_dim=text_width, **({} if smoke else dict(
          block_out_channels=(64, 128), layers_per_block=2, num_attention_heads=4,
          norm_num_groups=16)))


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, smoke=False, steps=0, vae='workdirs/vae_shapes', model='unet',
                             latents='')
  zoo_config.check_choice(arg.model, ('unet', 'dit'), 'ldm_t2i_shapes model')
  config = ConfigDict()
  config.seed = 0

  config.data = ConfigDict(dict(
      name='shapes', data_dir=None, resolution=RESOLUTION, image_key='image', label_key='',
      builder_config='tiny64' if arg.smoke else 'res64', train_split='train',
      eval_split='validation', features=()))
  config.data.text = ConfigDict(dict(caption_key='captions', tokenizer='shapes',
                                     tokenizer_path='', max_len=32))

  text = models.config('text', preset='tiny')
  vae = vae_model(arg.smoke)
  vae.scaling_factor = LATENT_SCALE
  config.model = denoiser(arg.model, arg.smoke, text.width, vae)

  config.task = ConfigDict(dict(
      name='text_to_image', schedule='cosine', num_timesteps=1000, prediction_type='epsilon',
      caption_dropout=0.1, negative_prompt='', sampler='dpmpp_2m', sample_steps=20, eta=0.0,
      guidance_scale=4.0, clip_x0=True, snr_gamma=0.0, text_encoder=text, text_encoder_from='',
      train_text_encoder=True, vae=vae, vae_from=arg.vae, latent_key=''))
  if arg.latents:
    config.data = zoo_latents.latents_data(config.data, arg.latents)
    config.task.latent_key = zoo_latents.MOMENTS

  config.train = ConfigDict(dict(
      steps=arg.steps or (20 if arg.smoke else 4000), batch_size=8 if arg.smoke else 32,
      grad_accum=1, log_every=5 if arg.smoke else 100, checkpoint_every=10 if arg.smoke else 500,
      eval_every=0 if arg.smoke else 1000, max_to_keep=2, async_checkpointing=True,
      progress_bar=not arg.smoke))

  config.optim = ConfigDict(dict(
      name='adamw', lr=1e-3, schedule='cosine', warmup_steps=2 if arg.smoke else 200,
      end_lr_factor=0.05, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
      ema_decay=0.99 if arg.smoke else 0.999))

  config.evals = ConfigDict()
  config.evals.samples = ConfigDict(dict(
      type='prompt_grid', prompts=PROMPTS[:2] if arg.smoke else PROMPTS,
      per_prompt=2 if arg.smoke else 6, negative_prompt='', sampler='dpmpp_2m',
      steps=5 if arg.smoke else 20, guidance_scale=4.0, use_ema=True, seed=0,
      upscale=1 if arg.smoke else 2))
  if not arg.smoke:
    # The shapes scorer judges samples prompted by the first caption of real examples:
    # validation holds training compositions, held_out the pairs training never shows.
    for name, split in (('adherence', 'validation'), ('adherence_held_out', 'held_out')):
      config.evals[name] = ConfigDict(dict(
          type='adherence', split=split, num_samples=128, batch_size=64, sampler='dpmpp_2m',
          steps=20, guidance_scale=4.0, use_ema=True, seed=0, grid=32, upscale=2))

  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = ConfigDict(sharding.DEFAULT_RULES)
  config.init_from = ''
  return config
