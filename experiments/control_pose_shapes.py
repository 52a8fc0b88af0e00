r"""ControlNet for pose maps over the shapes diffusion run: experiments/control_shapes.py with
control=pose.

  zoo train --config experiments/shapes_diffusion.py --workdir workdirs/shapes
  zoo train --config experiments/control_pose_shapes.py --workdir workdirs/control_pose
  zoo train --config experiments/control_pose_shapes.py:smoke=True --workdir /tmp/control_smoke

Arguments as control_shapes.py (smoke, base, model, steps).
"""

from zoo import config as zoo_config


def get_config(arg=None):
  return zoo_config.sibling(__file__, 'control_shapes').get_config(arg, control='pose')
