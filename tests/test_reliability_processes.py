"""Reliability, whole processes: kill -9 anywhere, a disk that fills, a read-only workdir, a peer lost.

Soak (more kills than CI's ten; the same assertions):
  ZOO_SOAK_KILLS=100 python -m pytest -q tests/test_reliability_processes.py -k kill
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, record_reliability
from zoo import checkpoint
from zoo import metrics
from zoo import runs

CLASSIFIER = 'experiments/shapes_classifier.py:smoke=True'
QUIET = ['--config.train.progress_bar=false', '--config.evals={}']
KILLS = int(os.environ.get('ZOO_SOAK_KILLS', 10))


def zoo(*args, env=None, check=True):
  proc = subprocess.run([sys.executable, '-m', 'zoo.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f'zoo {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def _state(workdir):
  """Every array of the newest checkpoint's train state (params, EMA, optimizer, step)."""
  _, s, _ = runs.load(str(workdir))
  ckpt = checkpoint.Checkpointer(str(workdir / 'checkpoints'))
  state, position = ckpt.restore(s.abstract_state)
  ckpt.close()
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))], position


def _writing(ckpt_dir):
  """Whether an Orbax save is in flight (its temporary directory exists)."""
  try:
    return any('tmp' in name for name in os.listdir(ckpt_dir))
  except FileNotFoundError:
    return False


def _steps(ckpt_dir):
  try:
    return [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()]
  except FileNotFoundError:
    return []


def test_kill_9_at_random_points_then_the_same_command_resumes_bit_equal(tmp_path):
  """Each life is killed either mid-save (an Orbax temporary directory on disk) or a random
  time after its first new checkpoint; the same command is then run again."""
  steps = 4 * KILLS  # A life gets 1-3 steps done: the kills come soon after its first save.
  args = ['train', '--config', CLASSIFIER, *QUIET, f'--config.train.steps={steps}',
          '--config.train.checkpoint_every=1', '--config.train.log_every=1',
          '--config.train.max_to_keep=2', '--config.mesh.data=2', '--config.model.widths=(8,)']
  # The reference saves once (saving does not change the state): Orbax costs ~0.3 s a save here.
  zoo(*args, '--workdir', str(tmp_path / 'whole'), f'--config.train.checkpoint_every={steps}')
  workdir, rng = tmp_path / 'killed', np.random.default_rng(0)
  ckpt_dir = workdir / 'checkpoints'
  kills = mid_save = 0
  while kills < KILLS:
    start = max(_steps(ckpt_dir), default=0)
    victim = subprocess.Popen([sys.executable, '-m', 'zoo.main', *args, '--workdir', str(workdir)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    in_save = kills % 2 == 0
    delay, progressed_at = rng.uniform(0.0, 0.5), None
    deadline = time.time() + 120
    while victim.poll() is None and time.time() < deadline:
      if progressed_at is None and max(_steps(ckpt_dir), default=0) > start:
        progressed_at = time.time()
      if progressed_at is not None and (
          (in_save and _writing(ckpt_dir)) or
          (not in_save and time.time() - progressed_at > delay)):
        break
      time.sleep(0.001)
    assert victim.poll() is None, f'life {kills} ended before its kill: {victim.stderr.read()}'
    mid_save += _writing(ckpt_dir)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stderr.close()
    kills += 1
    assert max(_steps(ckpt_dir)) < steps, 'the run finished: too few steps for the kills'
  zoo(*args, '--workdir', str(workdir))
  assert mid_save >= KILLS // 4, f'only {mid_save} of {kills} kills landed during a save'
  whole, whole_position = _state(tmp_path / 'whole')
  killed, killed_position = _state(workdir)
  assert killed_position == whole_position
  for a, b in zip(whole, killed, strict=True):
    np.testing.assert_array_equal(a, b)
  losses = [[r['loss'] for r in metrics.read_jsonl(d / 'metrics.jsonl')]
            for d in (tmp_path / 'whole', workdir)]
  assert losses[0] == losses[1] and len(losses[0]) == steps
  record_reliability(kills_survived=kills, faults_injected=kills)


def _in_mount_namespace(script, env):
  """Runs a shell `script` as root of a private mount namespace (to mount small tmpfs)."""
  prefix = [] if os.geteuid() == 0 else ['unshare', '--user', '--map-root-user']
  return subprocess.run([*prefix, 'unshare', '--mount', 'sh', '-ec', script], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_a_full_disk_or_a_read_only_workdir_fails_clearly_keeping_the_checkpoints(tmp_path):
  small, out = tmp_path / 'small', tmp_path / 'copied'
  small.mkdir()
  train = [sys.executable, '-m', 'zoo.main', 'train', '--config', CLASSIFIER, *QUIET,
           '--config.train.steps=40', '--config.train.checkpoint_every=1',
           '--config.train.max_to_keep=40', '--config.mesh.data=1']
  command = ' '.join(f"'{a}'" for a in train)
  script = f"""
    mount -t tmpfs -o size=1200k tmpfs {small}
    {command} --workdir {small}/run > {tmp_path}/full.out 2>&1 || echo $? > {tmp_path}/full.rc
    cp -r {small}/run {out}
    mount -o remount,ro {small}
    {command} --workdir {small}/again > {tmp_path}/ro.out 2>&1 || echo $? > {tmp_path}/ro.rc
  """
  proc = _in_mount_namespace(script, dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-3000:]
  full = (tmp_path / 'full.out').read_text()
  assert (tmp_path / 'full.rc').read_text().strip() == '1', full[-3000:]
  assert 'zoo train: failed:' in full and 'no space left on device' in full.lower(), full[-3000:]
  assert 'Traceback' not in full.split('zoo train: failed:')[-1]
  saved = sorted(int(n) for n in os.listdir(out / 'checkpoints') if n.isdigit())
  assert saved and saved[-1] < 40
  _, _, weights = runs.load(str(out))  # The newest complete checkpoint reads back whole.
  assert int(weights['step']) == saved[-1]
  read_only = (tmp_path / 'ro.out').read_text()
  assert (tmp_path / 'ro.rc').read_text().strip() == '2', read_only[-3000:]
  assert f'workdir {small}/again is not writable' in read_only and 'Traceback' not in read_only
  record_reliability(faults_injected=2)


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('victim', [1])
def test_two_processes_one_killed_the_other_exits_with_an_error_within_60_s(tmp_path, victim):
  flags = [f for f in os.environ['XLA_FLAGS'].split() if 'device_count' not in f]
  env = dict(os.environ, XLA_FLAGS=' '.join([*flags, '--xla_force_host_platform_device_count=2']),
             ZOO_COORDINATOR_ADDRESS=f'127.0.0.1:{_free_port()}', ZOO_NUM_PROCESSES='2',
             ZOO_HEARTBEAT_TIMEOUT='10')
  args = ['train', '--config', CLASSIFIER, *QUIET, '--config.train.steps=100000',
          '--config.train.checkpoint_every=50', '--config.train.log_every=1']
  procs = [subprocess.Popen([sys.executable, '-m', 'zoo.main', *args, '--workdir',
                             str(tmp_path / 'run')], cwd=REPO, env=dict(env, ZOO_PROCESS_ID=str(i)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  deadline = time.time() + 300
  while time.time() < deadline and not (tmp_path / 'run' / 'checkpoints' / '50').exists():
    assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
    time.sleep(0.2)
  procs[victim].send_signal(signal.SIGKILL)
  killed_at = time.time()
  survivor = procs[1 - victim]
  try:
    survivor.wait(timeout=60)
  except subprocess.TimeoutExpired:
    survivor.kill()
    pytest.fail('the surviving process still runs 60 s after its peer was killed')
  took = time.time() - killed_at
  err = survivor.stderr.read()
  procs[victim].wait()
  assert survivor.returncode != 0 and took < 60, (took, err[-3000:])
  shutil.rmtree(tmp_path / 'run', ignore_errors=True)
  record_reliability(faults_injected=1)
