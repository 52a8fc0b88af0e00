r"""VQA on shapes with late-fusion: experiments/vlm_shapes.py with fusion='late' (its docstring
lists the arguments and commands).

  zoo train --config experiments/vlm_late_shapes.py --workdir workdirs/vlm_late
  zoo train --config experiments/vlm_late_shapes.py:smoke=True --workdir /tmp/vlm_late_smoke
"""

from zoo import config as zoo_config


def get_config(arg=None):
  return zoo_config.sibling(__file__, 'vlm_shapes').get_config(arg, fusion='late')
