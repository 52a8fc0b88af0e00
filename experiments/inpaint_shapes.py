r"""Inpainting-trained diffusion on shapes scenes: the U-Net also reads the mask and the masked
image (Stable Diffusion inpainting's 2C + 1 input channels), trained on random boxes, borders
(outpainting) and full masks; starts from the shapes_diffusion run with its first convolution
zero-extended.

  zoo train --config experiments/shapes_diffusion.py --workdir workdirs/shapes
  zoo train --config experiments/inpaint_shapes.py --workdir workdirs/inpaint
  zoo sample --workdir workdirs/inpaint --mode inpaint --image in.png --mask mask.png --label 2
  zoo sample --workdir workdirs/inpaint --mode outpaint --image small.png --pad 8 --label 2
  zoo train --config experiments/inpaint_shapes.py:smoke=True --workdir /tmp/inpaint_smoke

Arguments: smoke (bool: tiny model and data, trained from scratch unless `base` is given),
base (the diffusion run to start from; default workdirs/shapes, smoke ''), steps (0 = default).
"""

from zoo import config as zoo_config
from zoo import models


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, smoke=False, base='', steps=0)
  config = zoo_config.sibling(__file__, 'shapes_diffusion').get_config(f'smoke={arg.smoke}')
  base_model = models.kwargs(config.model)
  channels = base_model['out_channels']
  config.model = models.config('unet', **(base_model | dict(in_channels=2 * channels + 1)))
  config.task.name = 'inpaint'
  config.task.base_from = arg.base or ('' if arg.smoke else 'workdirs/shapes')
  config.train.steps = arg.steps or (20 if arg.smoke else 3000)
  config.evals.inpaint = zoo_config.ConfigDict(dict(
      type='inpaint', split='validation', num_samples=8 if arg.smoke else 256,
      batch_size=8 if arg.smoke else 64, sampler='ddim', steps=5 if arg.smoke else 50,
      guidance_scale=2.0, use_ema=True, seed=0, method='', pad=4 if arg.smoke else 8,
      grid=8 if arg.smoke else 16, upscale=1 if arg.smoke else 4))
  return config
