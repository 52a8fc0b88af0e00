"""Builds a builtin dataset offline: `python -m data.build digits [--data_dir D] [--config res16]`.

For example `python -m data.build shapes --config res64` (the procedural shapes dataset).

This needs only zoo's own dependencies; `tfds build data/shapes --file_format array_record`
does the same but needs the `tfds` extra (the tfds CLI imports TensorFlow, Beam and
Croissant at start-up). The pipeline also builds builtins on first use. Without --config
every config of the dataset is built.
"""

import argparse
from collections.abc import Sequence

from data import pipeline


def build(name: str, data_dir: str | None = None, configs: Sequence[str] = ()) -> list[str]:
  """Prepares `configs` (all when empty) of builtin `name`; returns their directories."""
  if name not in pipeline.BUILTINS:
    raise ValueError(f'dataset {name!r} is not a builtin; builtins: {sorted(pipeline.BUILTINS)}.')
  configs = list(configs) or [c.name for c in pipeline.BUILTINS[name].BUILDER_CONFIGS] or ['']
  return [pipeline.prepare_builtin(name, data_dir, c).data_dir for c in configs]


def main(argv: Sequence[str] | None = None) -> None:
  """CLI entry point."""
  parser = argparse.ArgumentParser(prog='python -m data.build', description=__doc__.splitlines()[0])
  parser.add_argument('name', choices=sorted(pipeline.BUILTINS))
  parser.add_argument('--data_dir', default=None,
                      help=f'default: ${pipeline.DATA_DIR_ENV} or {pipeline.DEFAULT_DATA_DIR}')
  parser.add_argument('--config', action='append', default=[],
                      help='builder config to build (repeatable); default: all')
  args = parser.parse_args(argv)
  try:
    dirs = build(args.name, args.data_dir, args.config)
  except ValueError as e:
    parser.error(str(e))
  for d in dirs:
    print(d)


if __name__ == '__main__':
  main()
