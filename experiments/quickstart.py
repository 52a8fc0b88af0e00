r"""Class-conditional pixel-space diffusion on scikit-learn's handwritten digits (16x16).

A 2.5M-parameter U-Net predicts the noise of a cosine schedule; labels are dropped 10% of the
time so classifier-free guidance works at sampling time. 900 steps at batch 32 take about
7 minutes on 2 CPU cores and end with a PNG grid, one row per class, in WORKDIR/samples/.

  zoo train --config experiments/quickstart.py --workdir workdirs/quickstart
  zoo train --config experiments/quickstart.py:smoke=True --workdir /tmp/qs_smoke
  zoo sample --workdir workdirs/quickstart --num 40 --label 3 --label 7 --out digits.png

Arguments: smoke (bool, seconds-long run), res (16 or 32), steps (int, 0 = default).
"""

from zoo import config as zoo_config
from zoo import models
from zoo import sharding

ConfigDict = zoo_config.ConfigDict


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, smoke=False, res=16, steps=0)
  config = ConfigDict()
  config.seed = 0

  config.data = ConfigDict(dict(
      name='digits', data_dir=None, resolution=arg.res, image_key='image', label_key='label',
      builder_config='', train_split='train', eval_split='test', features=()))

  config.model = models.config('unet', preset='tiny' if arg.smoke else 'digits',
                               in_channels=1, out_channels=1, num_classes=10)

  config.task = ConfigDict(dict(
      name='diffusion', schedule='cosine', num_timesteps=1000, prediction_type='epsilon',
      label_dropout=0.1, sampler='ddim', sample_steps=50, eta=0.0, guidance_scale=2.0,
      clip_x0=True, snr_gamma=0.0))

  # eval_every=0: the evaluators run once, at the end.
  config.train = ConfigDict(dict(
      steps=arg.steps or (20 if arg.smoke else 900), batch_size=8 if arg.smoke else 32,
      grad_accum=1, log_every=5 if arg.smoke else 50, checkpoint_every=10 if arg.smoke else 300,
      eval_every=0, max_to_keep=2, async_checkpointing=True, progress_bar=not arg.smoke))

  config.optim = ConfigDict(dict(
      name='adamw', lr=2e-3, schedule='cosine', warmup_steps=2 if arg.smoke else 100,
      end_lr_factor=0.05, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
      ema_decay=0.99 if arg.smoke else 0.995))

  config.evals = ConfigDict()
  config.evals.samples = ConfigDict(dict(
      type='sample_grid', labels=tuple(range(10)), per_label=8, sampler='ddim',
      steps=5 if arg.smoke else 50, guidance_scale=2.0, use_ema=True, seed=0, upscale=4))
  config.evals.val = ConfigDict(dict(
      type='loss', num_batches=2 if arg.smoke else 8, batch_size=8 if arg.smoke else 64,
      use_ema=True, seed=0))

  # -1: every device not claimed by the other axes.
  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = ConfigDict(sharding.DEFAULT_RULES)
  config.init_from = ''
  return config
