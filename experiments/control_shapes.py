r"""ControlNet on the shapes diffusion run: generate scenes that follow a depth map, a colour-coded
segmentation, a pose skeleton or an edge map (the control named by `control`).

Trains a ControlNet (a trainable copy of the base U-Net's encoder, zero convolutions into its
skips) on top of the frozen class-conditional run of experiments/shapes_diffusion.py, which must
exist first. Each batch's hint is computed from the scene's map (data/conditions.py).

  zoo train --config experiments/shapes_diffusion.py --workdir workdirs/shapes
  zoo train --config experiments/control_shapes.py:control=seg --workdir workdirs/control_seg
  zoo sample --workdir workdirs/control_seg --control seg:hint.png --label 2 --out seg.png

Smoke (seconds; trains its own tiny base first):
  zoo train --config experiments/shapes_diffusion.py:smoke=True --workdir /tmp/shapes_smoke
  zoo train --config experiments/control_shapes.py:smoke=True --workdir /tmp/control_smoke

Over the one-object DiT of experiments/dit_shapes.py (64 shape x colour labels, `single32`):

  zoo train --config experiments/dit_shapes.py --workdir workdirs/dit_shapes
  zoo train --config experiments/control_shapes.py:control=seg,on=dit_shapes --workdir W

Held-out hints are sampled with the base's own sampler, steps and guidance.

Arguments: control ('depth', 'seg', 'pose' or 'edges'), smoke (bool: the base is the smoke run
of `on`), base (the base workdir; default workdirs/shapes, smoke /tmp/shapes_smoke; on
dit_shapes workdirs/dit_shapes, smoke /tmp/dit_shapes_smoke),
model (the base's family: 'unet' or 'dit'; a DiT base gets a DiT ControlNet copying its first
half; default: unet on shapes_diffusion, dit on dit_shapes, which has no U-Net), on (the base's
experiment: 'shapes_diffusion', the default, or 'dit_shapes'), steps (0 = default).
"""

from data import conditions
from zoo import config as zoo_config
from zoo import models

ConfigDict = zoo_config.ConfigDict
# The base experiments a ControlNet can sit on: their default (full, smoke) workdirs.
BASE_EXPERIMENTS = {'shapes_diffusion': ('workdirs/shapes', '/tmp/shapes_smoke'),
                    'dit_shapes': ('workdirs/dit_shapes', '/tmp/dit_shapes_smoke')}
# The model families each base experiment trains; the first is its default.
BASE_MODELS = {'shapes_diffusion': ('unet', 'dit'), 'dit_shapes': ('dit',)}


def get_config(arg=None, control='depth'):
  arg = zoo_config.parse_arg(arg, control=control, smoke=False, base='', model='',
                             on='shapes_diffusion', steps=0)
  zoo_config.check_choice(arg.on, BASE_EXPERIMENTS, 'control_shapes on')
  arg.model = arg.model or BASE_MODELS[arg.on][0]
  zoo_config.check_choice(arg.model, BASE_MODELS[arg.on], f'control_shapes on={arg.on} model')
  base = zoo_config.sibling(__file__, arg.on).get_config(
      f'smoke={arg.smoke}' + (f',model={arg.model}' if arg.on == 'shapes_diffusion' else ''))
  hint = conditions.get(arg.control)
  config = base
  config.data.features = (hint.feature,)
  base_model = models.kwargs(base.model)
  if arg.model == 'dit':
    config.model = models.config(
        'dit_controlnet', **base_model, conditioning_channels=hint.channels,
        control_layers=max(1, base_model['depth'] // 2))
  else:
    # Pixel space: the hint is the image's size, so the hint encoder does not downsample.
    config.model = models.config('controlnet', **base_model, conditioning_channels=hint.channels,
                                 conditioning_embedding_out_channels=(16,))
  config.task.name = 'controlnet'
  config.task.control = arg.control
  config.task.base_from = arg.base or BASE_EXPERIMENTS[arg.on][arg.smoke]
  config.task.conditioning_scale = 1.0
  config.train.steps = arg.steps or (20 if arg.smoke else 3000)
  config.optim.lr = 1e-3
  val, config.evals = base.evals.get('val'), ConfigDict()
  config.evals.control = ConfigDict(dict(
      type='control', split='validation', num_samples=8 if arg.smoke else 256,
      batch_size=8 if arg.smoke else 64, sampler=base.task.sampler,
      steps=5 if arg.smoke else base.task.sample_steps,
      guidance_scale=base.task.guidance_scale, use_ema=True, seed=0, grid=8 if arg.smoke else 16,
      upscale=1 if arg.smoke else 4))
  if val is not None:
    config.evals.val = val
  return config
