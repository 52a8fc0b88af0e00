r"""Class-conditional pixel-space diffusion on the procedural shapes dataset (RGB, 32x32).

The label is the shape of each scene's largest object (8 classes); structural conditioning
(masks, depth, pose) comes with ControlNet. The shapes dataset is generated offline on first
use (res32: 13,000 examples in well under a minute).

  zoo train --config experiments/shapes_diffusion.py --workdir workdirs/shapes
  zoo train --config experiments/shapes_diffusion.py:model=dit --workdir workdirs/shapes_dit
  zoo train --config experiments/shapes_diffusion.py:smoke=True --workdir /tmp/shapes_smoke
  zoo sample --workdir workdirs/shapes --num 32 --label 2 --label 5 --out shapes.png

Arguments: smoke (bool, a seconds-long run on the 512-example `tiny32` config), steps (int,
0 = default), model ('unet' or 'dit': a U-Net, or a DiT with adaLN-Zero blocks over 4x4 patches).
"""

from zoo import config as zoo_config
from zoo import models
from zoo import sharding

ConfigDict = zoo_config.ConfigDict


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, smoke=False, steps=0, model='unet')
  config = ConfigDict()
  config.seed = 0

  config.data = ConfigDict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key='label',
      builder_config='tiny32' if arg.smoke else 'res32', train_split='train',
      eval_split='validation', features=()))

  if arg.model == 'dit':
    config.model = models.config(
        'dit', input_size=32, patch_size=4, in_channels=3, num_classes=8, learn_sigma=False,
        **(dict(hidden_size=32, depth=2, num_heads=4) if arg.smoke else
           dict(hidden_size=192, depth=6, num_heads=3)))
  else:
    config.model = models.config('unet', preset='tiny' if arg.smoke else 'digits',
                                 in_channels=3, out_channels=3, num_classes=8)

  config.task = ConfigDict(dict(
      name='diffusion', schedule='cosine', num_timesteps=1000, prediction_type='epsilon',
      label_dropout=0.1, sampler='ddim', sample_steps=50, eta=0.0, guidance_scale=2.0,
      clip_x0=True, snr_gamma=0.0))

  config.train = ConfigDict(dict(
      steps=arg.steps or (20 if arg.smoke else 3000), batch_size=8 if arg.smoke else 32,
      grad_accum=1, log_every=5 if arg.smoke else 50, checkpoint_every=10 if arg.smoke else 500,
      eval_every=0 if arg.smoke else 1000, max_to_keep=2, async_checkpointing=True,
      progress_bar=not arg.smoke))

  config.optim = ConfigDict(dict(
      name='adamw', lr=2e-3, schedule='cosine', warmup_steps=2 if arg.smoke else 100,
      end_lr_factor=0.05, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
      ema_decay=0.99 if arg.smoke else 0.999))

  config.evals = ConfigDict()
  config.evals.samples = ConfigDict(dict(
      type='sample_grid', labels=tuple(range(8)), per_label=4 if arg.smoke else 8,
      sampler='ddim', steps=5 if arg.smoke else 50, guidance_scale=2.0, use_ema=True, seed=0,
      upscale=1 if arg.smoke else 4))
  config.evals.val = ConfigDict(dict(
      type='loss', num_batches=2 if arg.smoke else 8, batch_size=8 if arg.smoke else 32,
      use_ema=True, seed=0))

  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = ConfigDict(sharding.DEFAULT_RULES)
  config.init_from = ''
  return config
