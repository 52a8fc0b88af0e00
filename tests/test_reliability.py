"""Reliability, in process: malformed configs, corrupt checkpoints, NaN, bad records, atomic files.

The fault-injection half that needs whole processes (kill -9, a full disk, a lost peer) is in
tests/test_reliability_processes.py. Each test records what it injected (`record_reliability`);
the run's summary line adds them up and the README quotes it.
"""

import ast
import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import shutil

import jax
import numpy as np
import pytest

from conftest import REPO, assert_same, record_reliability
from data import pipeline
from data import records
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import metrics
from zoo import runs
from zoo import sharding
from zoo import train

QUIET = ['--config.train.progress_bar=false']
CLASSIFIER = os.path.join(REPO, 'experiments', 'shapes_classifier.py') + ':smoke=True'
EXPERIMENTS = ['quickstart.py', 'shapes_classifier.py', 'dit_shapes.py', 'vlm_mid_shapes.py',
               'clip_shapes.py']


def _experiment(name, *overrides):
  return zoo_config.load(os.path.join(REPO, 'experiments', name) + ':smoke=True',
                         [*QUIET, *overrides], validate_config=False)


def _wrong_value(value):
  """A value of another type than `value` (what a typo in a config file gives)."""
  if isinstance(value, bool):
    return 'yes'
  if isinstance(value, (int, float)):
    return 'three'
  if isinstance(value, str):
    return 3.5
  return None


def _malformed_configs():
  """(what, config, text the error must contain) for >= 50 broken experiment configs."""
  cases = []
  for name in EXPERIMENTS:  # An unknown key in every section of every experiment.
    for section in ('train', 'optim', 'model', 'task', 'data', 'mesh'):
      config = _experiment(name)
      with config[section].ignore_type(), config[section].unlocked():
        config[section]['lerning_rate'] = 1.0
      cases.append((f'{name}: unknown key in {section}', config, 'lerning_rate'))
  for section in ('train', 'optim'):  # A value of the wrong type for every key.
    for key, value in _experiment('quickstart.py')[section].items():
      wrong = _wrong_value(value)
      if wrong is not None:
        config = _experiment('quickstart.py')
        with config[section].ignore_type():
          config[section][key] = wrong
        cases.append((f'{section}.{key}={wrong!r}', config, f'{section}.{key}'))
  named = [
      ('quickstart.py', 'model.name', 'unet3000', 'model.name'),
      ('quickstart.py', 'task.name', 'difusion', 'task.name'),
      ('quickstart.py', 'task.sampler', 'ddim2', 'sampler'),
      ('quickstart.py', 'optim.name', 'adamw2', 'optim.name'),
      ('quickstart.py', 'optim.schedule', 'cosin', 'optim.schedule'),
      ('vlm_mid_shapes.py', 'model.fusion', 'middle', 'fusion'),
      ('dit_shapes.py', 'data.resolution', 30, 'resolution=30'),
      ('dit_shapes.py', 'model.patch_size', 5, 'patch_size'),
      ('quickstart.py', 'train.steps', -5, 'train.steps'),
      ('quickstart.py', 'train.batch_size', 0, 'train.batch_size'),
      ('quickstart.py', 'train.grad_accum', 3, 'grad_accum'),
      ('quickstart.py', 'mesh.data', 0, 'config.mesh'),
      ('quickstart.py', 'mesh.data', 16, 'config.mesh'),
      ('quickstart.py', 'train.batch_size', 12, 'config.train.batch_size=12'),
      ('quickstart.py', 'data.name', 'imagenet_typo', 'data.name'),
      ('quickstart.py', 'data.resolution', -16, 'resolution'),
  ]
  for name, key, value, match in named:
    config = _experiment(name)
    section, leaf = key.split('.')
    with config[section].ignore_type():
      config[section][leaf] = value
    cases.append((f'{name}: {key}={value!r}', config, match))
  config = _experiment('quickstart.py')
  with config.unlocked():
    config.trian = config.train
  cases.append(('unknown top-level key', config, 'trian'))
  config = _experiment('quickstart.py')
  del config.optim['lr']
  cases.append(('missing key', config, 'optim.lr'))
  return cases


@contextlib.contextmanager
def _count_compiles():
  """Counts XLA lowerings and compilations (cached or not) inside the block."""
  from jax._src import dispatch
  events = []

  def listener(event, duration, **kwargs):
    if event in (dispatch.JAXPR_TO_MLIR_MODULE_EVENT, dispatch.BACKEND_COMPILE_EVENT):
      events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_malformed_configs_fail_naming_the_key_before_compiling(tmp_path):
  cases = _malformed_configs()
  assert len(cases) >= 50
  wrong = []
  with _count_compiles() as compiles:
    for i, (what, config, match) in enumerate(cases):
      try:
        train.train_and_evaluate(config, str(tmp_path / str(i)))
        wrong.append(f'{what}: accepted')
      except (ValueError, FileNotFoundError, PermissionError) as e:
        if match not in str(e):
          wrong.append(f'{what}: {type(e).__name__} without {match!r}: {e}')
  assert not wrong, '\n'.join(wrong)
  assert not compiles, f'compiled before rejecting a config: {compiles}'
  record_reliability(configs_rejected=len(cases))


def _train(workdir, steps, *overrides):
  config = zoo_config.load(CLASSIFIER, [
      *QUIET, f'--config.train.steps={steps}', '--config.train.checkpoint_every=1',
      '--config.train.max_to_keep=3', '--config.train.log_every=1', '--config.evals={}',
      '--config.mesh.data=2', *overrides])
  return train.train_and_evaluate(config, str(workdir))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('whole')
  return workdir, _train(workdir, 5)


def _array_files(step_dir):
  return [os.path.join(r, f) for r, _, fs in os.walk(step_dir / 'state') for f in fs
          if os.sep + 'd' + os.sep in os.path.join(r, f)]


def _largest_array_file(step_dir):
  return max(_array_files(step_dir), key=os.path.getsize)


def _flip_bytes(path, offsets=(0.5,)):
  raw = bytearray(open(path, 'rb').read())
  for at in offsets:
    raw[int(at * (len(raw) - 1))] ^= 0x10
  with open(path, 'wb') as f:
    f.write(raw)


def test_a_corrupt_newest_checkpoint_falls_back_and_the_run_ends_where_it_would(
    uninterrupted, tmp_path, caplog):
  whole_dir, whole = uninterrupted
  workdir = tmp_path / 'run'
  _train(workdir, 3)
  ckpt_dir = workdir / 'checkpoints'
  # Bits flipped (Orbax alone restores these silently): the checksums or the reader object.
  _flip_bytes(_largest_array_file(ckpt_dir / '3'), offsets=(0.2, 0.4, 0.6, 0.8))
  with caplog.at_level(logging.WARNING, logger='zoo'):
    state = _train(workdir, 5)
  assert re.search(r'checkpoint step 3 in .* is corrupt \(.*\); moved to .*corrupt/3; falling '
                   'back to step 2', caplog.text), caplog.text
  assert (ckpt_dir / 'corrupt' / '3').is_dir()  # Kept for a post-mortem, out of the way.
  assert_same(state, whole)
  # Truncated files do not read at all: the fallback is the same. (Every data file: which
  # arrays share the largest one varies with the order of Orbax's writes.)
  for path in _array_files(ckpt_dir / '5'):
    with open(path, 'r+b') as f:
      f.truncate(10)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger='zoo'):
    _, _, weights = runs.load(str(workdir))
  assert int(weights['step']) == 4 and 'checkpoint step 5' in caplog.text
  # Every checkpoint corrupt: a clear error, never garbage.
  left = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  assert left == [3, 4, 5]
  for step in left:
    _flip_bytes(_largest_array_file(ckpt_dir / str(step)), offsets=(0.3, 0.7))
  with pytest.raises(checkpoint.CorruptCheckpoint, match='no readable checkpoint'):
    _train(workdir, 6)
  assert sorted(os.listdir(ckpt_dir / 'corrupt')) == ['3', '3.1', '4', '5']
  rows = metrics.read_jsonl(workdir / 'metrics.jsonl')
  whole_rows = metrics.read_jsonl(whole_dir / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5]  # Steps logged after a fallback dropped.
  assert [r['loss'] for r in rows] == [r['loss'] for r in whole_rows]
  # Orbax's read futures keep their copies of the errors; collected, asyncio must not print them.
  gc.collect()
  assert not [r for r in caplog.records if 'never retrieved' in r.getMessage()]
  record_reliability(faults_injected=4)


def test_a_checkpoint_of_another_model_reports_the_differing_keys(uninterrupted, tmp_path):
  whole_dir, _ = uninterrupted
  workdir = tmp_path / 'other'
  shutil.copytree(whole_dir / 'checkpoints', workdir / 'checkpoints')
  config = zoo_config.load(CLASSIFIER, [*QUIET, '--config.model.widths=(8, 24)',
                                        '--config.evals={}', '--config.mesh.data=2'])
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config, str(workdir))
  message = str(e.value)
  assert 'does not fit this model' in message and 'shape mismatch' in message
  assert 'checkpoints/5/params does not fit this model' in message
  assert 'conv1/kernel checkpoint (3, 3, 8, 16) vs model (3, 3, 8, 24)' in message
  config.init_from = str(whole_dir)  # Starting a new run from it: the same list.
  with pytest.raises(ValueError, match=r'5/params does not fit this model \(11 differences\)'):
    train.train_and_evaluate(config, str(tmp_path / 'init_from'))
  record_reliability(faults_injected=2)


def test_stored_shapes_come_from_the_integrity_record_and_equal_orbaxs_metadata(
    uninterrupted, tmp_path):
  whole_dir, _ = uninterrupted
  shutil.copytree(whole_dir / 'checkpoints', tmp_path / 'checkpoints')
  manager = checkpoint._reader(str(tmp_path / 'checkpoints'))
  orbax = checkpoint._shapes(manager.item_metadata(5).state)
  recorded = checkpoint.stored_shapes(manager, 5)
  assert recorded == orbax and recorded['params/conv_in/kernel'] == (3, 3, 3, 8)
  # A record without shapes (a run saved before they were recorded): Orbax's metadata.
  path = tmp_path / 'checkpoints' / '5' / 'integrity' / 'metadata'
  record = json.loads(path.read_text())
  path.write_text(json.dumps({'word_sums': record['word_sums']}))
  assert checkpoint.stored_shapes(manager, 5) == orbax
  manager.close()


def _poison_batch_at(monkeypatch, step):
  """Makes the training loop's `step`-th batch NaN (counted from the process's first)."""
  calls = []
  real = sharding.global_batch

  def poisoned(local, sh):
    calls.append(None)
    if len(calls) == step:
      local = {**local, 'image': np.full_like(local['image'], np.nan)}
    return real(local, sh)
  monkeypatch.setattr(sharding, 'global_batch', poisoned)


def test_nan_in_a_batch_or_a_gradient_stops_naming_the_step_and_keeps_the_checkpoints(
    uninterrupted, tmp_path, monkeypatch):
  whole_dir, _ = uninterrupted
  workdir = tmp_path / 'nan'
  _poison_batch_at(monkeypatch, 3)
  with pytest.raises(FloatingPointError, match=r'non-finite loss nan at step 3; .*newest '
                     r'checkpoint is step 2'):
    _train(workdir, 5)
  monkeypatch.undo()
  _, _, weights = runs.load(str(workdir))
  assert int(weights['step']) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(weights['params'])))
  # A gradient that is NaN under a finite loss (d/dx sqrt(x) at 0): caught by its norm.
  real_setup = train.setup

  def nan_gradient_setup(*args):
    s = real_setup(*args)
    loss = s.task.loss

    def poisoned_loss(params, *a, **kw):
      value, aux = loss(params, *a, **kw)
      first = jax.tree.leaves(params)[0]
      return value + 0.0 * jax.numpy.sqrt(first.ravel()[0] - first.ravel()[0]), aux
    s.task.loss = poisoned_loss
    return s
  monkeypatch.setattr(train, 'setup', nan_gradient_setup)
  with pytest.raises(FloatingPointError, match=r'non-finite grad_norm nan at step 3; .*step 2'):
    _train(workdir, 5)
  monkeypatch.undo()
  state = _train(workdir, 5)  # The same command afterwards resumes and finishes as if unhurt.
  assert int(state['step']) == 5
  rows = metrics.read_jsonl(workdir / 'metrics.jsonl')
  assert [r['loss'] for r in rows] == [r['loss'] for r in metrics.read_jsonl(
      whole_dir / 'metrics.jsonl')]
  record_reliability(faults_injected=2)


def _digits(data_dir=None):
  return zoo_config.ConfigDict(dict(
      name='digits', data_dir=data_dir, resolution=16, image_key='image', label_key='label',
      builder_config='res16', train_split='train', eval_split='test', features=()))


def test_corrupt_or_misshapen_records_name_the_record(zoo_data_dir, tmp_path, monkeypatch):
  batches = pipeline.get_dataset(_digits(), split='test', seed=0, global_batch_size=8,
                                 repeat=False, prefetch=0)
  real_read, bad = records.Source.read, []

  def misshapen(self, indices):  # One RGB image in a grayscale dataset.
    examples = real_read(self, indices)
    bad.append(int(indices[3]))
    examples[3] = {**examples[3], 'image': np.zeros((16, 16, 3), np.uint8)}
    return examples
  monkeypatch.setattr(records.Source, 'read', misshapen)
  with pytest.raises(ValueError, match=r"record (\d+) of dataset 'digits/res16.*split 'test'.*"
                     r'shape \(16, 16, 3\).*HxWx1') as e:
    next(batches)
  assert f'record {bad[0]} of' in str(e.value)

  def float_image(self, indices):  # Pixels stored as floats.
    examples = real_read(self, indices)
    bad.append(int(indices[0]))
    examples[0] = {**examples[0], 'image': examples[0]['image'].astype(np.float32)}
    return examples
  monkeypatch.setattr(records.Source, 'read', float_image)
  with pytest.raises(ValueError, match=r"record (\d+) of dataset 'digits/res16.*dtype float32"):
    next(pipeline.get_dataset(_digits(), split='test', seed=1, global_batch_size=8,
                              repeat=False, prefetch=0))
  monkeypatch.undo()
  # Flipped bytes in the stored records: the batch read fails, then the failing record is named.
  shutil.copytree(os.path.join(zoo_data_dir, 'digits', 'res16'), tmp_path / 'digits' / 'res16')
  shard = tmp_path / 'digits/res16/1.0.0/digits-test.array_record-00000-of-00001'
  raw = bytearray(shard.read_bytes())
  for i in range(len(raw) // 3, len(raw) // 2, 5):
    raw[i] ^= 0x5A
  shard.write_bytes(bytes(raw))
  with pytest.raises(RuntimeError, match=r"Failed reading record \d+ of dataset 'digits/res16.* "
                     f'split .test. in {tmp_path}'):
    list(pipeline.get_dataset(_digits(str(tmp_path)), split='test', seed=0,
                              global_batch_size=99, repeat=False, prefetch=0))
  record_reliability(faults_injected=3)


# Logs that are appended to: a kill tears at most the last line, which their readers drop and a
# resumed run cuts (metrics.MetricWriter, the generation manifest's `read_manifest`).
APPEND_ONLY_LOGS = {('metrics.py', 'path'), ('generate.py', 'os.path.join(out, MANIFEST)')}


def test_nothing_the_zoo_writes_is_written_in_place_and_nothing_unpickles():
  """Every `open(..., 'w')` and safetensors save in zoo/ and data/ goes through a temporary name
  (zoo/files.py) and a rename; no code path can load a pickle."""
  offenders = []
  for root in ('zoo', 'data'):
    for dirpath, _, names in os.walk(os.path.join(REPO, root)):
      for name in names:
        if not name.endswith('.py') or name == 'files.py':
          continue
        path = os.path.join(dirpath, name)
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
          if isinstance(node, ast.Call) and len(node.args) >= 2:
            func, target = ast.unparse(node.func), ast.unparse(node.args[0 if 'open' in (
                ast.unparse(node.func)) else 1])
            mode = node.args[1].value if isinstance(node.args[1], ast.Constant) else None
            writes = (func in ('open', 'tf.io.gfile.GFile') and mode in ('w', 'wb', 'a') or
                      func.endswith('save_file'))
            if writes and 'tmp' not in target and not (
                mode == 'a' and (name, target) in APPEND_ONLY_LOGS):
              offenders.append(f'{path}:{node.lineno}: {ast.unparse(node)[:80]}')
          if isinstance(node, (ast.Import, ast.ImportFrom)):
            names_ = [a.name for a in node.names] + [getattr(node, 'module', '') or '']
            if any(n.split('.')[0] in ('pickle', 'cloudpickle', 'dill') for n in names_):
              offenders.append(f'{path}:{node.lineno}: imports pickle')
          if isinstance(node, ast.keyword) and node.arg == 'allow_pickle' and (
              not isinstance(node.value, ast.Constant) or node.value.value):
            offenders.append(f'{path}:{node.lineno}: allow_pickle')
  assert not offenders, '\n'.join(offenders)


def test_atomic_writes_replace_whole_files_with_the_usual_permissions(tmp_path):
  from zoo import files
  plain, atomic = tmp_path / 'plain.json', tmp_path / 'atomic.json'
  plain.write_text('{}')
  files.write_text(atomic, 'old')
  with pytest.raises(RuntimeError), files.atomic_open(atomic) as f:
    f.write('half')
    raise RuntimeError('killed mid-write')
  assert atomic.read_text() == 'old' and [p.name for p in tmp_path.iterdir()].count(
      'atomic.json') == 1 and len(list(tmp_path.iterdir())) == 2  # No temporary file left.
  files.write_text(atomic, 'new')
  assert atomic.read_text() == 'new'
  assert os.stat(atomic).st_mode == os.stat(plain).st_mode  # Not mkstemp's owner-only 0600.


def test_orphaned_orbax_write_errors_are_not_logged_again(tmp_path, caplog):
  # After a failed save, Orbax's per-array write tasks are collected with their copy of the
  # error; asyncio would log each one after `zoo train: failed:` has reported it.
  gc.collect()  # Orphans of earlier tests in this process are theirs to check.
  ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints')

  async def write(directory):
    raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing "{directory}/5/d/0": No space left')

  loop = asyncio.new_event_loop()
  for directory in (ckpt.directory, str(tmp_path / 'elsewhere')):
    task = loop.create_task(write(directory))
    loop.run_until_complete(asyncio.sleep(0.01))
    del task
    gc.collect()
  # A read future (a corrupt checkpoint's) is dropped the same way.
  future = loop.create_future()
  future.set_exception(ValueError(f'DATA_LOSS: Error reading "{ckpt.directory}/5/state/d/0"'))
  del future
  gc.collect()
  loop.close()
  ckpt.close()
  logged = [r.exc_info[1] for r in caplog.records
            if 'never retrieved' in r.getMessage() and str(tmp_path) in r.getMessage()]
  assert len(logged) == 1 and 'elsewhere' in str(logged[0]), logged
