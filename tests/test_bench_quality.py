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


def test_attention_stats_of_uniform_and_local_attention():
  from zoo.bench import conditioning
  n = 16  # A 4x4 patch grid.
  uniform = np.full((1, 1, n, n), 1.0 / n)
  entropy, mass = conditioning.attention_stats(uniform)
  assert entropy == pytest.approx(np.log(n))
  # 3x3 neighbourhoods on a 4x4 grid: 4 corners of 4, 8 edges of 6, 4 inner of 9 cells.
  assert mass == pytest.approx((4 * 4 + 8 * 6 + 4 * 9) / n / n)
  self_only = np.eye(n)[None, None]
  assert conditioning.attention_stats(self_only) == pytest.approx((0.0, 1.0))
  with pytest.raises(ValueError, match='not a square patch grid'):
    conditioning.attention_stats(np.full((1, 1, 5, 5), 0.2))


def _schedule_alphas_cumprod(config):
  from zoo.diffusion import schedules
  betas = np.asarray(schedules.make_betas(config.task.schedule, config.task.num_timesteps),
                     np.float64)
  return np.cumprod(1 - betas)


def test_conditioning_report_on_the_smoke_dit(smoke_runs, tmp_path):
  import jax
  from zoo.bench import conditioning
  from zoo.nn import layers
  out = tmp_path / 'conditioning.json'
  conditioning.main(['--workdir', smoke_runs['dit_shapes'], '--num', '4', '--t', '700', '200',
                     '--out', str(out)])
  report = json.loads(out.read_text())
  config = zoo_config.from_json(open(os.path.join(smoke_runs['dit_shapes'],
                                                  'config.json')).read())
  assert [r['t'] for r in report['rows']] == [700, 200]
  for r in report['rows']:
    assert len(r['blocks']) == config.model.depth  # One self-attention per block, in order.
    assert all(0 < b['entropy'] <= r['uniform_entropy'] + 1e-6 for b in r['blocks'])
    assert all(0 < b['neighbourhood'] <= 1 for b in r['blocks'])
    assert r['pred_rms'] > 0 and min(r['swap_+1'], r['swap_+8'], r['null']) >= 0
    # ε-prediction: x0 - x̂0 = (σ_t / α_t)(ε̂ - ε), so the two errors differ by SNR(t) exactly.
    ab = float(_schedule_alphas_cumprod(config)[r['t']])
    assert r['eps_mse'] > 0
    assert r['x0_mse'] == pytest.approx(r['eps_mse'] * (1 - ab) / ab, rel=1e-4)
  # Recording sees eager attention only: under jit the probabilities are tracers, left alone.
  q = np.ones((1, 4, 1, 2), np.float32)
  with layers.recorded_attention() as probs:
    jax.jit(layers.attention_heads)(q, q, q)
    assert probs == []
    layers.attention_heads(q, q, q)
  assert len(probs) == 1 and probs[0].shape == (1, 1, 4, 4)
