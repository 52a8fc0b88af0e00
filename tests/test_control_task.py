"""ControlNet training over a frozen diffusion run, its evaluator, and `zoo sample --control`."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from data import conditions
from data import pipeline as data_pipeline
from zoo import config as zoo_config
from zoo import main as zoo_main
from zoo import metrics
from zoo import runs
from zoo import tasks

from conftest import REPO

QUIET = ['--config.train.progress_bar=false', '--config.mesh.data=1']


@pytest.fixture(scope='module')
def control_runs(tmp_path_factory, shapes_diffusion_run):
  """(base workdir, seg ControlNet workdir): the smoke base and 6 ControlNet steps on it."""
  base, seg = shapes_diffusion_run[0], tmp_path_factory.mktemp('control') / 'seg'
  assert zoo_main.main([
      'train', '--config', f'{REPO}/experiments/control_seg_shapes.py:smoke=True,base={base}',
      '--workdir', str(seg), '--config.train.steps=6', '--config.train.checkpoint_every=6',
      '--config.evals.control.steps=2', *QUIET]) == 0
  return base, seg


def test_training_keeps_the_base_and_moves_the_copy(control_runs):
  base, seg = control_runs
  _, _, base_state = runs.load(str(base))
  _, _, state = runs.load(str(seg))
  frozen = jax.tree.leaves(state['params']['base'])
  for a, b in zip(frozen, jax.tree.leaves(base_state['ema_params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  zero_conv = np.asarray(state['params']['controlnet']['controlnet_mid_block']['kernel'])
  assert np.abs(zero_conv).max() > 0  # Started at zero; six steps moved it.
  copied = state['params']['controlnet']['down_blocks_0']['resnets_0']['conv1']['kernel']
  started = base_state['ema_params']['down_blocks_0']['resnets_0']['conv1']['kernel']
  assert 0 < np.abs(np.asarray(copied) - np.asarray(started)).max() < 0.1
  rows = [r for r in metrics.read_jsonl(seg / 'metrics.jsonl') if 'control/overall' in r]
  assert rows and {'control/mean_iou', 'control/mean_iou_base', 'control/silhouette_iou',
                   'control/silhouette_iou_base'} <= set(rows[-1])
  assert (seg / 'control' / 'step_000006.png').exists()


def test_control_cli_single_multi_and_scale_zero(control_runs, tmp_path, capsys):
  base, seg = control_runs
  config = zoo_config.from_json((seg / 'config.json').read_text())
  example = data_pipeline.get_builder(config.data).as_data_source('validation')[0]
  hint = np.asarray(conditions.hint('seg', example['semantic_mask'][None]))[0]
  Image.fromarray(conditions.to_uint8(hint)).save(tmp_path / 'seg.png')
  common = ['sample', '--workdir', str(seg), '--num', '2', '--label', '3', '--steps', '3',
            '--upscale', '1', '--sampler', 'ddim']
  out = tmp_path / 'one.png'
  assert zoo_main.main([*common, '--control', f'seg:{tmp_path}/seg.png', '--out', str(out)]) == 0
  grid = np.asarray(Image.open(out))
  assert grid.shape == (34, 3 * 33 + 1, 3)
  np.testing.assert_array_equal(grid[1:33, 1:33], conditions.to_uint8(hint))
  # Two controls (the second named by its run), both at scale 0: exactly the base's samples.
  assert zoo_main.main([*common, '--control', f'seg:{tmp_path}/seg.png',
                        '--control', f'seg:{tmp_path}/seg.png@{seg}', '--control-scale', '0',
                        '--out', str(tmp_path / 'zero.png')]) == 0
  assert zoo_main.main(['sample', '--workdir', str(base), '--num', '2', '--label', '3',
                        '--steps', '3', '--upscale', '1', '--sampler', 'ddim',
                        '--out', str(tmp_path / 'base.png')]) == 0
  zero = np.asarray(Image.open(tmp_path / 'zero.png')).astype(int)
  plain = np.asarray(Image.open(tmp_path / 'base.png')).astype(int)  # One column.
  for k in range(2):
    tile = zero[1:33, 1 + 33 * (2 + k):33 * (3 + k)]
    assert np.abs(tile - plain[1 + 33 * k:33 * (k + 1), 1:33]).max() <= 1
  capsys.readouterr()
  Image.fromarray(conditions.to_uint8(hint[::2, ::2])).save(tmp_path / 'small.png')
  for args, message in (
      (['--control', f'seg:{tmp_path}/small.png'], "control image is (16, 16, 3) (HxWxC) but"),
      (['--control', f'pose:{tmp_path}/seg.png'], "trained on 'seg' hints"),
      (['--control', f'nope:{tmp_path}/seg.png'], "unknown control 'nope'"),
      (['--control', 'seg'], 'KIND:PATH.png'),
      (['--control', f'seg:{tmp_path}/seg.png', '--control-scale', '1', '--control-scale', '2'],
       '2 --control-scale values for 1 controls'),
      (['--control', f'seg:{tmp_path}/seg.png@{base}'], "is a 'diffusion' run"),
      ([], 'pass --control seg:HINT.png')):
    assert zoo_main.main([*common, *args, '--out', str(tmp_path / 'bad.png')]) == 2
    assert message in capsys.readouterr().err


def test_config_and_hint_errors(control_runs, tmp_path):
  base, seg = control_runs
  load = lambda arg, **kw: zoo_config.load(  # noqa: E731
      f'{REPO}/experiments/control_shapes.py:smoke=True,base={base},{arg}',
      [f'--config.{k}={v}' for k, v in kw.items()])
  with pytest.raises(ValueError, match="data feature 'skeleton'"):
    load('control=pose', **{'data.features': "('depth',)"})
  with pytest.raises(ValueError, match='conditioning_channels=3 but the .depth. hint has 1'):
    load('control=depth', **{'model.conditioning_channels': 3})
  with pytest.raises(ValueError, match=r"differs from the base run .* \['block_out_channels'\]"):
    load('control=depth', **{'model.block_out_channels': '(16, 32)'})
  with pytest.raises(ValueError, match=r"\['task.num_timesteps'\]"):
    load('control=depth', **{'task.num_timesteps': 500, 'task.sample_steps': 50})
  config = load('control=depth', **{'task.base_from': str(tmp_path / 'nothing')})
  with pytest.raises(FileNotFoundError, match='is not a zoo run'):
    tasks.build(config)
  _, s, state = runs.load(str(seg))
  with pytest.raises(ValueError, match=r"'seg' hints are \(1, 16, 16, 3\); want \(1, 32, 32, 3\)"):
    s.task.predict['sample'](state['params'], jax.random.key(0), np.array([1]),
                             hints=np.zeros((1, 16, 16, 3), np.float32))
  with pytest.raises(ValueError, match='pass hints'):
    s.task.predict['sample'](state['params'], jax.random.key(0), np.array([1]))


def test_silhouette_iou_is_one_on_the_real_render_and_low_on_grey(control_runs):
  from zoo.evals import control as control_eval
  _, seg = control_runs
  config = zoo_config.from_json((seg / 'config.json').read_text())
  source = data_pipeline.get_builder(config.data).as_data_source('validation')
  examples = [source[i] for i in range(6)]
  examples = [ex for ex in examples if (np.asarray(ex['semantic_mask']) > 0).any()]
  for ex in examples:
    assert control_eval.silhouette_iou(np.asarray(ex['image']), ex) > 0.9
    grey = np.full_like(np.asarray(ex['image']), 128)
    assert control_eval.silhouette_iou(grey, ex) == 0.0


def test_stored_config_names_the_base(control_runs):
  base, seg = control_runs
  stored = json.loads((seg / 'config.json').read_text())
  assert stored['task']['base_from'] == str(base) and stored['model']['name'] == 'controlnet'


def test_zoo_eval_overrides_change_the_evaluators_only(control_runs, capsys):
  _, seg = control_runs
  log, grid = seg / 'eval_metrics.jsonl', seg / 'control' / 'step_000006.png'
  before = (log.read_text() if log.exists() else None), grid.read_bytes()
  assert zoo_main.main(['eval', '--workdir', str(seg), '--config.evals.control.split=test',
                        '--config.evals.control.num_samples=4', '--config.evals.control.steps=2',
                        '--config.evals.control.grid=2']) == 0
  results = json.loads(capsys.readouterr().out)
  assert 0 <= results['control/mean_iou'] <= 1 and 'control/silhouette_iou_base' in results
  # Not the experiment's record: the log and the training grid stay; this grid goes aside.
  assert ((log.read_text() if log.exists() else None), grid.read_bytes()) == before
  assert (seg / 'eval_overrides' / 'control' / 'step_000006.png').exists()
  for bad, message in ((['--config.model.depth=3'], 'config.evals.NAME.KEY=VALUE overrides only'),
                       (['--config.evals.control.nope=1'], "unknown config key "
                                                            "'evals.control.nope'"),
                       (['--config.evals.control.split=nosuch'], 'nosuch')):
    assert zoo_main.main(['eval', '--workdir', str(seg), *bad]) == 2
    assert message in capsys.readouterr().err
