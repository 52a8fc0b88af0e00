r"""The synthetic-data loop: a shapes classifier trained on generated images, tested on real ones.

`zoo generate` writes a class-conditional diffusion run's images (label i mod 64, or the labels of
a real split) as the TFDS dataset `zoo_generated`; this experiment trains the classifier of
experiments/shapes_classifier.py on it and measures accuracy on the real validation split of
`shapes/single32`, beside the same classifier trained on real data (shapes_classifier.py).

  zoo generate --workdir workdirs/shapes_single --from-dataset shapes/single32:train \
      --num 4096 --out workdirs/synthetic
  zoo train --config experiments/synthetic_shapes.py:data=workdirs/synthetic/tfds \
      --workdir workdirs/synthetic_classifier
  zoo train --config experiments/shapes_classifier.py --workdir workdirs/shapes_classifier

The generating run must be class-conditional on `shape_colour` (64 classes) of single32 scenes,
e.g. `experiments/dit_shapes.py` or a distilled student of it.

Arguments: data (the generated dataset's data_dir, OUT/tfds of `zoo generate`), label (the
generating run's label key, default 'shape_colour'), steps (0 = default), smoke (bool: tiny real
evaluation split and a 20-step run).
"""

from zoo import config as zoo_config

ConfigDict = zoo_config.ConfigDict


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, data='workdirs/synthetic/tfds', label='shape_colour', steps=0,
                             smoke=False)
  config = zoo_config.sibling(__file__, 'shapes_classifier').get_config(
      f'smoke={arg.smoke},label={arg.label},steps={arg.steps}')
  real = config.data.builder_config
  config.data.name = 'tfds:zoo_generated'
  config.data.data_dir = arg.data
  config.data.builder_config = ''
  config.data.eval_split = 'train'  # Generated data has one split; evaluation reads real data.
  val = config.evals.val
  config.evals = ConfigDict()
  config.evals.real = ConfigDict(dict(
      type='dataset_accuracy', dataset=f'shapes/{real}', split='validation',
      batch_size=val.batch_size, use_ema=True))
  return config
