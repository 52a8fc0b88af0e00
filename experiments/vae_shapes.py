r"""A small KL autoencoder (SD's AutoencoderKL, f=4) on the procedural shapes scenes (RGB, 64x64).

The first stage of latent diffusion: 64x64x3 images <-> 16x16x4 latents (12x fewer numbers),
trained with L1 reconstruction + KL (weight 1e-6, as SD) and, with `disc=True`, a PatchGAN
hinge adversary (GroupNorm; weight 0.5 from step 0: the loop does not pass the step, so
there is no warm-up). No LPIPS term (it needs downloaded weights). The EMA (decay 0.99: a
short run must not keep its init) is what the evaluators and latent diffusion runs use
(experiments/ldm_t2i_shapes.py loads `ema_params['vae']`). The reconstruction evaluator
reports PSNR and the latent std, whose inverse is the scaling factor to put in
`model.scaling_factor` for a latent diffusion run.
The shapes dataset (res64) is generated offline on first use (about 2 minutes).

Measured on the shared 2-core CPU box (load ~10): a 300-step run took 7.5 minutes with its
evaluations (1.0-1.7 s a step at batch 8), so the default 600 steps take about 15. At step
300 the EMA params reach validation PSNR 17.7 dB, L1 0.075 (images in [0, 1]) and latent std
1.92 (scaling factor ~0.52; the raw params: 18.3 dB, 0.067, 2.07). Reconstructions are still
blurred there, so train longer (`steps=`) for a sharp first stage.

  zoo train --config experiments/vae_shapes.py --workdir workdirs/vae_shapes
  zoo train --config experiments/vae_shapes.py:disc=True --workdir workdirs/vae_shapes_gan
  zoo train --config experiments/vae_shapes.py:smoke=True --workdir /tmp/vae_smoke

Arguments: smoke (bool, a seconds-long run on the 512-example `tiny64` config with a
two-level VAE), steps (int, 0 = default), disc (bool, add the PatchGAN discriminator).
"""

from zoo import config as zoo_config
from zoo import models
from zoo import sharding

ConfigDict = zoo_config.ConfigDict


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, smoke=False, steps=0, disc=False)
  config = ConfigDict()
  config.seed = 0

  config.data = ConfigDict(dict(
      name='shapes', data_dir=None, resolution=64, image_key='image', label_key='',
      builder_config='tiny64' if arg.smoke else 'res64', train_split='train',
      eval_split='validation', features=()))

  # Three levels (f=4) give 16x16x4 latents; 16 channels at 64x64 keep a step near a second.
  config.model = models.config(
      'vae', **(dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
                if arg.smoke else
                dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8)))

  config.task = ConfigDict(dict(
      name='vae', recon='l1', kl_weight=1e-6, disc_weight=0.5 if arg.disc else 0.0,
      disc_start=0, disc_channels=8 if arg.smoke else 32, disc_layers=2 if arg.smoke else 3))

  config.train = ConfigDict(dict(
      steps=arg.steps or (20 if arg.smoke else 600), batch_size=8,
      grad_accum=1, log_every=5 if arg.smoke else 50, checkpoint_every=10 if arg.smoke else 300,
      eval_every=0 if arg.smoke else 300, max_to_keep=2, async_checkpointing=True,
      progress_bar=not arg.smoke))

  config.optim = ConfigDict(dict(
      name='adamw', lr=1e-3, schedule='cosine', warmup_steps=2 if arg.smoke else 50,
      end_lr_factor=0.05, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
      ema_decay=0.99))

  config.evals = ConfigDict()
  config.evals.recon = ConfigDict(dict(
      type='reconstruction', num_batches=1 if arg.smoke else 4, batch_size=8 if arg.smoke else 32,
      use_ema=True, seed=0, num_images=8 if arg.smoke else 16, pairs_per_row=4,
      upscale=1 if arg.smoke else 2))
  config.evals.val = ConfigDict(dict(
      type='loss', num_batches=1 if arg.smoke else 4, batch_size=8 if arg.smoke else 32,
      use_ema=True, seed=0))

  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = ConfigDict(sharding.DEFAULT_RULES)
  config.init_from = ''
  return config
