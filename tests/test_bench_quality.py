"""The sample-quality benchmark: its metrics' arithmetic and one end-to-end table on smoke runs."""

import json
import os

import numpy as np
import pytest

from zoo import config as zoo_config
from zoo import train
from zoo.bench import quality

from conftest import REPO


def test_nfe_and_settings():
  assert quality.nfe('heun', 10) == 19 and quality.nfe('dpmpp_2m', 20) == 20
  assert quality.parse_setting('ddim:50', 4.0) == ('ddim', 50, 4.0)
  assert quality.parse_setting('ddpm:1000:1', 4.0) == ('ddpm', 1000, 1.0)
  with pytest.raises(ValueError, match='sampler:steps'):
    quality.parse_setting('plms:20', 4.0)


def test_diversity_is_the_mean_within_group_distance():
  feats = np.array([[0, 0], [3, 4], [0, 0], [0, 0], [1, 0]], np.float32)
  groups = np.array([0, 0, 1, 1, 2])  # Group 2 has one sample: not counted.
  assert quality.diversity(feats, groups) == pytest.approx((5.0 + 0.0) / 2)


@pytest.fixture(scope='module')
def smoke_runs(tmp_path_factory):
  """{'dit_shapes': W, 'shapes_classifier': W} of two smoke runs."""
  tmp_path = tmp_path_factory.mktemp('bench_runs')
  runs_ = {}
  for name, arg in (('dit_shapes', 'smoke=True'), ('shapes_classifier', 'smoke=True')):
    config = zoo_config.load(os.path.join(REPO, 'experiments', f'{name}.py') + f':{arg}',
                             ['--config.train.progress_bar=false'])
    config.evals = zoo_config.ConfigDict()
    runs_[name] = str(tmp_path / name)
    train.train_and_evaluate(config, runs_[name])
  return runs_


def test_table_on_smoke_runs(smoke_runs, tmp_path):
  runs_ = smoke_runs
  out = tmp_path / 'quality.json'
  quality.main(['--workdir', runs_['dit_shapes'], '--classifier', runs_['shapes_classifier'],
                '--settings', 'ddim:2', 'heun:2', '--sweep', '1', '3', '--sweep-setting',
                'ddim:2', '--num', '8', '--batch_size', '8', '--out', str(out)])
  report = json.loads(out.read_text())
  rows = report['rows']
  assert [(r['sampler'], r['steps'], r['guidance']) for r in rows] == [
      ('ddim', 2, 4.0), ('heun', 2, 4.0), ('ddim', 2, 1.0), ('ddim', 2, 3.0)]
  assert rows[1]['nfe'] == 3 and all(r['fd_zoo'] > 0 for r in rows)
  assert all(0.0 <= r['accuracy'] <= 1.0 and r['num'] == 8 for r in rows)
  assert report['real_scorer_accuracy'] == 1.0  # The scorer on real renders.


def test_distillation_table_on_smoke_students(smoke_runs, tmp_path):
  from zoo.bench import distill
  teacher = smoke_runs['dit_shapes']
  students = {}
  for name, arg in (('progressive_distill_shapes', 'steps=2'), ('consistency_distill_shapes', '')):
    config = zoo_config.load(
        os.path.join(REPO, 'experiments', f'{name}.py') + f':smoke=True,teacher={teacher},'
        f'train_steps=2{"," + arg if arg else ""}', ['--config.train.progress_bar=false'])
    config.evals = zoo_config.ConfigDict()
    students[name] = str(tmp_path / name)
    train.train_and_evaluate(config, students[name])
  out = tmp_path / 'distill.json'
  distill.main(['--teacher', teacher, '--classifier', smoke_runs['shapes_classifier'],
                '--progressive', students['progressive_distill_shapes'], '--consistency',
                students['consistency_distill_shapes'], '--nfe', '1', '2', '--num', '8',
                '--batch_size', '8', '--out', str(out)])
  rows = json.loads(out.read_text())['rows']
  assert [(r['model'].split(' ')[0], r['sampler'], r['nfe']) for r in rows] == [
      ('teacher', 'ddim', 1), ('teacher', 'dpmpp_2m', 1), ('teacher', 'ddim', 2),
      ('teacher', 'dpmpp_2m', 2), ('teacher', 'dpmpp_2m', 20), ('progressive', 'ddim', 2),
      ('consistency', 'consistency', 1), ('consistency', 'consistency', 2)]
  assert rows[4]['fd_ratio'] == 1.0 and all(r['fd_zoo'] > 0 for r in rows)
