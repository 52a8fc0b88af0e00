r"""Class-conditional DiT on single-object shapes (RGB 32x32, 64 classes = colour x shape).

Each image holds one object on a plain grey background; the label is its (shape, colour)
pair (`shape_colour`, 56 of the 64 pairs occur in train: the held-out pairs never do). The
DiT predicts ε over 4x4 pixel patches (64 tokens) with adaLN-Zero blocks; classifier-free
guidance comes from 10% label dropout. The samples are judged from their pixels by the shapes
scorer (`data.shapes.score.judge_single`).

  zoo train --config experiments/dit_shapes.py --workdir workdirs/dit_shapes
  zoo train --config experiments/dit_shapes.py:smoke=True --workdir /tmp/dit_shapes_smoke
  zoo sample --workdir workdirs/dit_shapes --num 32 --label 0 --label 9 --guidance 4 \
      --out dit_shapes.png

Arguments: smoke (bool, a seconds-long run on `tinysingle32`), steps (int, 0 = default),
size ('T' = 4 blocks of width 128, the default; 'S' = 6 blocks of width 256), patch (int,
4 = the default; 2 gives 256 tokens and ~4.5x slower steps: 3000 steps took 54 minutes here,
reached a training loss of 0.009 against 0.025, yet its samples were no better judged by the
scorer: colours right, shapes still amorphous), builder_config ('' = single32 / tinysingle32;
`single32_noheart` trains the base that experiments/lora_shapes.py teaches hearts).
"""

from zoo import config as zoo_config
from zoo import models
from zoo import sharding

ConfigDict = zoo_config.ConfigDict
SIZES = {'S': dict(hidden_size=256, depth=6, num_heads=4),
         'T': dict(hidden_size=128, depth=4, num_heads=4)}
# One seen class of each shape, cycling colours: (shape i, colour i) for i < 8.
GRID_LABELS = tuple(i * 8 + i for i in range(8))


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, smoke=False, steps=0, size='T', patch=4, builder_config='')
  zoo_config.check_choice(arg.size, SIZES, 'dit_shapes size')
  config = ConfigDict()
  config.seed = 0

  config.data = ConfigDict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key='shape_colour',
      builder_config=arg.builder_config or ('tinysingle32' if arg.smoke else 'single32'),
      train_split='train',
      eval_split='validation', features=()))

  config.model = models.config(
      'dit', input_size=32, patch_size=arg.patch, in_channels=3, num_classes=64, learn_sigma=False,
      **(dict(hidden_size=32, depth=2, num_heads=4) if arg.smoke else SIZES[arg.size]))

  config.task = ConfigDict(dict(
      name='diffusion', schedule='cosine', num_timesteps=1000, prediction_type='epsilon',
      label_dropout=0.1, sampler='dpmpp_2m', sample_steps=20, eta=0.0, guidance_scale=4.0,
      clip_x0=True, snr_gamma=0.0))

  config.train = ConfigDict(dict(
      steps=arg.steps or (20 if arg.smoke else 4000), batch_size=8 if arg.smoke else 32,
      grad_accum=1, log_every=5 if arg.smoke else 100, checkpoint_every=10 if arg.smoke else 500,
      eval_every=0 if arg.smoke else 2000, max_to_keep=2, async_checkpointing=True,
      progress_bar=not arg.smoke))

  config.optim = ConfigDict(dict(
      name='adamw', lr=1e-3, schedule='cosine', warmup_steps=2 if arg.smoke else 200,
      end_lr_factor=0.05, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
      ema_decay=0.99 if arg.smoke else 0.999))

  config.evals = ConfigDict()
  config.evals.samples = ConfigDict(dict(
      type='sample_grid', labels=GRID_LABELS, per_label=4 if arg.smoke else 8,
      sampler='dpmpp_2m', steps=5 if arg.smoke else 20, guidance_scale=4.0, use_ema=True,
      seed=0, upscale=1 if arg.smoke else 4))

  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = ConfigDict(sharding.DEFAULT_RULES)
  config.init_from = ''
  return config
