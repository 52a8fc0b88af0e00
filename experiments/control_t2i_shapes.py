r"""A text ControlNet: prompt + hint (depth, segmentation, pose or edges) over a frozen
text-to-image run, as Stable Diffusion's ControlNets steer SD.

The base is a text_to_image U-Net run: experiments/ldm_t2i_shapes.py trained here, or a Stable
Diffusion pipeline converted with `zoo convert --from diffusers-sd`. It must exist before
training; the ControlNet copies its U-Net, tokenizer and resolution (from its config.json, or
from experiments/ldm_t2i_shapes.py while the default base is not trained yet).

  zoo train --config experiments/vae_shapes.py --workdir workdirs/vae_shapes
  zoo train --config experiments/ldm_t2i_shapes.py --workdir workdirs/ldm_t2i_shapes
  zoo train --config experiments/control_t2i_shapes.py:control=seg --workdir workdirs/ctl_seg
  zoo sample --workdir workdirs/ctl_seg --control seg:hint.png --prompt "a red circle." --num 4 \
      --out ctl.png
  zoo eval --workdir workdirs/ctl_seg     # the `control` evaluator: held-out hints + captions

The `control` evaluator (at the last step, or `zoo eval`) samples held-out validation hints
under their scenes' first captions with and without the ControlNet and scores both with the
shapes scorer (mask IoU, depth order, keypoints: zoo/evals/control.py).

A public SD ControlNet over a converted pipeline:
  zoo convert --from diffusers-sd --in path/to/sd15 --out workdirs/sd15
  zoo convert --from diffusers-controlnet --in path/to/controlnet-seg --base workdirs/sd15 \
      --out workdirs/sd15_seg

Smoke (seconds; the smoke VAE and LDM of experiments/ldm_t2i_shapes.py first):
  zoo train --config experiments/control_t2i_shapes.py:smoke=True --workdir /tmp/ctl_t2i_smoke

Arguments: base (the text_to_image workdir; default workdirs/ldm_t2i_shapes, smoke
/tmp/ldm_smoke), control ('depth', 'seg', 'pose' or 'edges'), smoke (bool: 20 steps on the
tiny64 scenes), steps (0 = default).
"""

from data import conditions
from zoo import config as zoo_config
from zoo import models
from zoo import sharding

ConfigDict = zoo_config.ConfigDict
# SD's hint encoder widths (8x: 512² hints for 64² latents); other factors double from 16.
SD_HINT_WIDTHS = (16, 32, 96, 256)


def hint_widths(factor):
  """Hint-encoder widths that downsample a pixel-sized hint to the denoiser's size."""
  n = factor.bit_length()
  return SD_HINT_WIDTHS if n == len(SD_HINT_WIDTHS) else tuple(16 * 2 ** i for i in range(n))


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, base='', control='depth', smoke=False, steps=0)
  arg.base = arg.base or ('/tmp/ldm_smoke' if arg.smoke else 'workdirs/ldm_t2i_shapes')
  # The base run's config when it exists (a converted SD pipeline has no experiment file), else
  # the experiment that trains the default base (training then checks the run is there).
  base = zoo_config.existing_run_config(arg.base) or zoo_config.sibling(
      __file__, 'ldm_t2i_shapes').get_config(f'smoke={arg.smoke}')
  hint = conditions.get(arg.control)
  config = ConfigDict()
  config.seed = 0
  config.data = ConfigDict(dict(
      name='shapes', data_dir=None, resolution=base.data.resolution, image_key='image',
      label_key='', builder_config='tiny64' if arg.smoke else '', train_split='train',
      eval_split='validation', features=(hint.feature,)))
  config.data.text = ConfigDict(base.data.text.to_dict())
  factor = 2 ** (len(base.task.vae.block_out_channels) - 1) if base.task.vae else 1
  config.model = models.config('controlnet', **models.kwargs(base.model),
                               conditioning_channels=hint.channels,
                               conditioning_embedding_out_channels=hint_widths(factor))
  # ControlNet (Zhang et al. 2023) replaces half the prompts by the empty one in training.
  config.task = ConfigDict(dict(
      name='text_controlnet', control=arg.control, base_from=arg.base, conditioning_scale=1.0,
      caption_dropout=0.5, negative_prompt='', sampler=base.task.sampler,
      sample_steps=base.task.sample_steps, eta=0.0, guidance_scale=base.task.guidance_scale))
  config.train = ConfigDict(dict(
      steps=arg.steps or (20 if arg.smoke else 3000), batch_size=8 if arg.smoke else 32,
      grad_accum=1, log_every=5 if arg.smoke else 100, checkpoint_every=10 if arg.smoke else 500,
      eval_every=0, max_to_keep=2, async_checkpointing=True, progress_bar=not arg.smoke))
  config.optim = ConfigDict(dict(
      name='adamw', lr=1e-3 if arg.smoke else 1e-4, schedule='constant',
      warmup_steps=2 if arg.smoke else 200, end_lr_factor=1.0, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0, grad_clip_norm=1.0, ema_decay=0.99 if arg.smoke else 0.999))
  # Held-out hints and their scenes' first captions, with and without control (zoo/evals/control).
  config.evals = ConfigDict()
  config.evals.control = ConfigDict(dict(
      type='control', split='validation', num_samples=4 if arg.smoke else 128,
      batch_size=4 if arg.smoke else 32, sampler=base.task.sampler,
      steps=3 if arg.smoke else base.task.sample_steps, guidance_scale=base.task.guidance_scale,
      use_ema=True, seed=0, grid=4 if arg.smoke else 16, upscale=1 if arg.smoke else 2))
  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = ConfigDict(sharding.DEFAULT_RULES)
  config.init_from = ''
  return config
