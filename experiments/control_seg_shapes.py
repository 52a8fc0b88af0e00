r"""ControlNet for seg maps over the shapes diffusion run: experiments/control_shapes.py with
control=seg.

  zoo train --config experiments/shapes_diffusion.py --workdir workdirs/shapes
  zoo train --config experiments/control_seg_shapes.py --workdir workdirs/control_seg
  zoo train --config experiments/control_seg_shapes.py:smoke=True --workdir /tmp/control_smoke

Over the one-object class-conditional DiT of experiments/dit_shapes.py instead:

  zoo train --config experiments/dit_shapes.py --workdir workdirs/dit_shapes
  zoo train --config experiments/control_seg_shapes.py:on=dit_shapes --workdir workdirs/seg_dit

Arguments as control_shapes.py (smoke, base, model, on, steps).
"""

from zoo import config as zoo_config


def get_config(arg=None):
  return zoo_config.sibling(__file__, 'control_shapes').get_config(arg, control='seg')
