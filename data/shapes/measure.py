"""Benchmark: shapes build speed and scorer accuracy; prints a table and writes JSON.

  python -m data.shapes.measure [--resolution 64] [--num_train 10000] [--num_score 1000]
                                [--workers N] [--json shapes_measure.json]

1. Builds a train split of --num_train examples through TFDS (array_record, as
   `python -m data.build` does) into a temporary data_dir and times it.
2. Builds --num_score test examples, reads them back through `tfds.data_source`, and
   scores (a) each example's own image, (b) uniform noise, (c) the image of the next
   example (a real scene that ignores the conditions).
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np

from data.shapes import score as score_lib
from zoo import files
from data.shapes import shapes_dataset_builder as builder_lib


def _build(data_dir: str, name: str, workers: int | None, resolution: int, **sizes):
  sizes = {'num_train': 0, 'num_validation': 0, 'num_test': 0, 'num_held_out': 0, **sizes}
  config = builder_lib.ShapesConfig(name=name, resolution=resolution, **sizes)
  builder = builder_lib.Builder(config=config, data_dir=data_dir, num_workers=workers)
  start = time.perf_counter()
  builder.download_and_prepare(file_format='array_record')
  return builder, time.perf_counter() - start


def build_speed(data_dir: str, resolution: int, num_train: int, workers: int | None) -> dict:
  """Seconds to build `num_train` train examples at `resolution`."""
  _, seconds = _build(data_dir, f'speed{resolution}', workers, resolution, num_train=num_train)
  return {'resolution': resolution, 'examples': num_train, 'seconds': round(seconds, 2),
          'examples_per_second': round(num_train / seconds, 1),
          'workers': workers or builder_lib.default_workers()}


def scorer_accuracy(data_dir: str, resolution: int, num: int, workers: int | None) -> dict:
  """Aggregated `score` results on real test renders, noise and mismatched renders."""
  builder, _ = _build(data_dir, f'score{resolution}', workers, resolution, num_test=num)
  source = builder.as_data_source('test')
  examples = [source[i] for i in range(len(source))]
  rng = np.random.default_rng(0)
  images = {
      'renders': [e['image'] for e in examples],
      'noise': [rng.integers(0, 256, e['image'].shape, dtype=np.uint8) for e in examples],
      'mismatched': [examples[(i + 1) % num]['image'] for i in range(num)],
  }
  return {kind: score_lib.aggregate([score_lib.score(img, e) for img, e in zip(imgs, examples)])
          for kind, imgs in images.items()}


def _table(speed: dict, scores: dict) -> str:
  lines = [f'build: {speed["examples"]} examples at {speed["resolution"]}^2 in '
           f'{speed["seconds"]} s ({speed["examples_per_second"]} examples/s, '
           f'{speed["workers"]} workers)', '']
  cols = ('overall', *score_lib.CRITERIA, 'mean_iou', 'keypoint_error')
  lines.append(f'{"test images":<12}' + ''.join(f'{c:>15}' for c in cols))
  for kind, s in scores.items():
    cells = ['-' if s[c] is None else f'{s[c]:.4f}' for c in cols]
    lines.append(f'{kind:<12}' + ''.join(f'{v:>15}' for v in cells))
  judged = scores['renders']['counts']
  lines.append('checks judged: ' + ', '.join(f'{c} {judged[c][1]}' for c in score_lib.CRITERIA))
  return '\n'.join(lines)


def main(argv=None) -> None:
  """CLI entry point."""
  parser = argparse.ArgumentParser(prog='python -m data.shapes.measure',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--resolution', type=int, default=64)
  parser.add_argument('--num_train', type=int, default=10_000)
  parser.add_argument('--num_score', type=int, default=1_000)
  parser.add_argument('--workers', type=int, default=None, help='default: the CPUs available')
  parser.add_argument('--json', default='shapes_measure.json')
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix='shapes_measure_') as data_dir:
    speed = build_speed(data_dir, args.resolution, args.num_train, args.workers)
    scores = scorer_accuracy(data_dir, args.resolution, args.num_score, args.workers)
  print(_table(speed, scores))
  with files.atomic_open(args.json) as f:
    json.dump({'build': speed, 'scores': scores, 'cpus': os.cpu_count()}, f, indent=2)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
