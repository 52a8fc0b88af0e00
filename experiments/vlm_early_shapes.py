r"""VQA on shapes with early-fusion: experiments/vlm_shapes.py with fusion='early' (its docstring
lists the arguments and commands).

  zoo train --config experiments/vlm_early_shapes.py --workdir workdirs/vlm_early
  zoo train --config experiments/vlm_early_shapes.py:smoke=True --workdir /tmp/vlm_early_smoke
"""

from zoo import config as zoo_config


def get_config(arg=None):
  return zoo_config.sibling(__file__, 'vlm_shapes').get_config(arg, fusion='early')
