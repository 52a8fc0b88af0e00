r"""VQA on shapes with mid-fusion: experiments/vlm_shapes.py with fusion='mid' (its docstring
lists the arguments and commands).

  zoo train --config experiments/vlm_mid_shapes.py --workdir workdirs/vlm_mid
  zoo train --config experiments/vlm_mid_shapes.py:smoke=True --workdir /tmp/vlm_mid_smoke
"""

from zoo import config as zoo_config


def get_config(arg=None):
  return zoo_config.sibling(__file__, 'vlm_shapes').get_config(arg, fusion='mid')
