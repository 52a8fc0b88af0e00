"""The `zoo` command as a user runs it: train, sample, eval, kill -9 and resume, two processes."""

import os
import socket
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from zoo import checkpoint
from zoo import metrics
from zoo import runs

from conftest import REPO

SMOKE = 'experiments/quickstart.py:smoke=True'
QUIET = ['--config.train.progress_bar=false']


def zoo(*args, env=None, check=True, **kwargs):
  """Runs `python -m zoo.main ARGS` from the repository root."""
  proc = subprocess.run([sys.executable, '-m', 'zoo.main', *args], cwd=REPO, env=env or dict(
      os.environ), capture_output=True, text=True, timeout=600, **kwargs)
  if check and proc.returncode != 0:
    raise AssertionError(f'zoo {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def final_params(workdir):
  _, _, state = runs.load(str(workdir))
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state['params']))]


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('smoke')
  zoo('train', '--config', SMOKE, '--workdir', str(workdir), '--config.mesh.data=1', *QUIET)
  return workdir


def test_smoke_run_leaves_config_metrics_checkpoint_and_png(smoke_run):
  assert (smoke_run / 'config.json').exists()
  rows = metrics.read_jsonl(smoke_run / 'metrics.jsonl')
  assert [r['step'] for r in rows if 'loss' in r] == [5, 10, 15, 20]
  ckpt = checkpoint.Checkpointer(str(smoke_run / 'checkpoints'))
  assert ckpt.latest_step() == 20
  ckpt.close()
  png = Image.open(smoke_run / 'samples' / 'step_000020.png')
  assert png.size[0] > 16 * 4 and png.mode == 'L'
  # The TensorBoard events: every record's framing and CRCs check, and the scalars are the
  # metrics.jsonl rows (read by tensorboardX's own protobuf classes).
  from tensorboardX import record_writer as tbx_crc
  from tensorboardX.proto import event_pb2
  (events,) = (smoke_run / 'tensorboard').iterdir()
  raw, at, logged = events.read_bytes(), 0, {}
  while at < len(raw):
    (n,) = struct.unpack('<Q', raw[at:at + 8])
    assert struct.unpack('<I', raw[at + 8:at + 12])[0] == tbx_crc.masked_crc32c(raw[at:at + 8])
    data = raw[at + 12:at + 12 + n]
    assert struct.unpack('<I', raw[at + 12 + n:at + 16 + n])[0] == tbx_crc.masked_crc32c(data)
    event = event_pb2.Event.FromString(data)
    for value in event.summary.value:
      logged.setdefault(value.tag, {})[event.step] = value.simple_value
    at += 16 + n
  assert event_pb2.Event.FromString(raw[12:12 + struct.unpack('<Q', raw[:8])[0]]).file_version == (
      'brain.Event:2')
  losses = {r['step']: r['loss'] for r in rows if 'loss' in r}
  assert logged['loss'] == pytest.approx(losses, rel=1e-6)


def test_sample_and_eval_commands(smoke_run, tmp_path, capsys):
  from zoo import main as zoo_main  # After the first command: in-process, no JAX start-up.
  out = tmp_path / 'grid.png'
  zoo('sample', '--workdir', str(smoke_run), '--num', '6', '--label', '3', '--label', '7',
      '--steps', '4', '--sampler', 'ddpm', '--guidance', '3', '--out', str(out), '--upscale', '1')
  grid = np.asarray(Image.open(out))
  # Two columns (labels 3 and 7) and three rows of 16x16 images with 1-pixel borders.
  assert grid.shape == (3 * 17 + 1, 2 * 17 + 1)
  for sampler in ('dpmpp_2m', 'heun'):
    assert zoo_main.main(['sample', '--workdir', str(smoke_run), '--num', '2', '--label', '5',
                          '--steps', '3', '--sampler', sampler, '--out',
                          str(tmp_path / f'{sampler}.png'), '--upscale', '1']) == 0
    assert np.asarray(Image.open(tmp_path / f'{sampler}.png')).shape == (2 * 17 + 1, 17 + 1)
  capsys.readouterr()
  assert zoo_main.main(['eval', '--workdir', str(smoke_run)]) == 0
  assert 'val/eval_loss' in capsys.readouterr().out
  assert (smoke_run / 'eval_metrics.jsonl').exists()
  assert zoo_main.main(['sample', '--workdir', str(smoke_run), '--label', '11', '--out',
                        str(out)]) == 2
  assert 'labels must lie in [0, 10]' in capsys.readouterr().err


def test_inpaint_and_outpaint_commands(smoke_run, tmp_path, capsys):
  from zoo import main as zoo_main  # In-process: the same argument parsing, no JAX start-up.
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16), dtype=np.uint8)
  mask = np.zeros((16, 16), np.uint8)
  mask[4:12, 8:] = 255
  Image.fromarray(image).save(tmp_path / 'in.png')
  Image.fromarray(mask).save(tmp_path / 'mask.png')
  common = ['sample', '--workdir', str(smoke_run), '--num', '2', '--label', '3', '--steps', '4',
            '--jump-length', '2', '--jump-n-sample', '2', '--upscale', '1']
  assert zoo_main.main([*common, '--mode', 'inpaint', '--image', str(tmp_path / 'in.png'),
                        '--mask', str(tmp_path / 'mask.png'),
                        '--out', str(tmp_path / 'inpaint.png')]) == 0
  grid = np.asarray(Image.open(tmp_path / 'inpaint.png'))
  assert grid.shape == (17 + 1, 3 * 17 + 1)  # The known pixels, then two results.
  keep = mask == 0
  for k in (1, 2):
    tile = grid[1:17, 1 + 17 * k:17 + 17 * k]
    np.testing.assert_array_equal(tile[keep], image[keep])
    assert np.any(tile[~keep] != image[~keep])
  small = image[4:12, 4:12]
  Image.fromarray(small).save(tmp_path / 'small.png')
  assert zoo_main.main([*common, '--mode', 'outpaint', '--pad', '4', '--method', 'blend',
                        '--image', str(tmp_path / 'small.png'),
                        '--out', str(tmp_path / 'outpaint.png')]) == 0
  tile = np.asarray(Image.open(tmp_path / 'outpaint.png'))[1:17, 18:34]
  np.testing.assert_array_equal(tile[4:12, 4:12], small)
  # Bad input: exit code 2 and a message naming the problem, before any sampling.
  capsys.readouterr()
  for args, message in (
      (['--mode', 'inpaint', '--image', 'in.png', '--mask', 'in.png'], 'binary'),
      (['--mode', 'outpaint', '--image', 'small.png', '--pad', '2'], 'use an image of 12x12'),
      (['--mode', 'inpaint', '--image', 'in.png'], 'needs --mask'),
      (['--image', 'in.png'], 'need --mode inpaint'),
      (['--mode', 'inpaint', '--image', 'in.png', '--mask', 'mask.png', '--prompt', 'a 3'],
       'not text-conditional')):
    args = [str(tmp_path / a) if a.endswith('.png') else a for a in args]
    assert zoo_main.main([*common, *args, '--out', str(tmp_path / 'bad.png')]) == 2
    assert message in capsys.readouterr().err


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
  proc = zoo('train', '--config', SMOKE, '--workdir', str(tmp_path), '--config.train.stepz=3',
             check=False)
  assert proc.returncode == 2
  assert "unknown config key 'train.stepz'" in proc.stderr and 'Traceback' not in proc.stderr


def _device_flags(n):
  flags = [f for f in os.environ['XLA_FLAGS'].split() if 'device_count' not in f]
  return ' '.join([*flags, f'--xla_force_host_platform_device_count={n}'])


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  # SGD for the params comparison: see tests/test_train.py::test_sharded_equals_single_device.
  args = ['train', '--config', 'experiments/shapes_classifier.py:smoke=True,steps=6', *QUIET,
          '--config.train.checkpoint_every=3', '--config.evals={}', '--config.optim.name=sgd',
          '--config.optim.lr=0.05']
  env = dict(os.environ, XLA_FLAGS=_device_flags(2))
  zoo(*args, '--workdir', str(tmp_path / 'one'), env=dict(env, XLA_FLAGS=_device_flags(4)))
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'zoo.main', *args, '--workdir', str(tmp_path / 'two')], cwd=REPO,
      env=dict(env, ZOO_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', ZOO_NUM_PROCESSES='2',
               ZOO_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  one = [r['loss'] for r in metrics.read_jsonl(tmp_path / 'one' / 'metrics.jsonl') if 'loss' in r]
  two = [r['loss'] for r in metrics.read_jsonl(tmp_path / 'two' / 'metrics.jsonl') if 'loss' in r]
  np.testing.assert_allclose(one, two, rtol=1e-4)
  for a, b in zip(final_params(tmp_path / 'one'), final_params(tmp_path / 'two')):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
