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

Arguments: control ('depth', 'seg', 'pose' or 'edges'), smoke (bool: the base is the smoke run
/tmp/shapes_smoke), base (the base workdir; default workdirs/shapes, smoke /tmp/shapes_smoke),
model ('unet' or 'dit': a DiT base gets a DiT ControlNet copying its first half), steps (0 =
default).
"""

from data import conditions
from zoo import config as zoo_config
from zoo import models

ConfigDict = zoo_config.ConfigDict


def get_config(arg=None, control='depth'):
  arg = zoo_config.parse_arg(arg, control=control, smoke=False, base='', model='unet', steps=0)
  base = zoo_config.sibling(__file__, 'shapes_diffusion').get_config(
      f'smoke={arg.smoke},model={arg.model}')
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
  config.task.base_from = arg.base or ('/tmp/shapes_smoke' if arg.smoke else 'workdirs/shapes')
  config.task.conditioning_scale = 1.0
  config.train.steps = arg.steps or (20 if arg.smoke else 3000)
  config.optim.lr = 1e-3
  val, config.evals = base.evals.val, ConfigDict()
  config.evals.control = ConfigDict(dict(
      type='control', split='validation', num_samples=8 if arg.smoke else 256,
      batch_size=8 if arg.smoke else 64, sampler='ddim', steps=5 if arg.smoke else 50,
      guidance_scale=2.0, use_ema=True, seed=0, grid=8 if arg.smoke else 16,
      upscale=1 if arg.smoke else 4))
  config.evals.val = val
  return config
