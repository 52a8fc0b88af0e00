"""`zoo generate`: assets independent of batch size and device count, kill -9 and resume,
the manifest, the TFDS copy, and the errors a user can cause."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from zoo.pipelines import generate

from conftest import REPO

NUM = 24


def _command(workdir, out, *extra):
  return [sys.executable, '-m', 'zoo.main', 'generate', '--workdir', str(workdir), '--out',
          str(out), '--num', str(NUM), '--steps', '20', *extra]


def _checksums(out):
  with open(os.path.join(out, generate.MANIFEST)) as f:
    entries = [json.loads(line) for line in f]
  indices = [e['index'] for e in entries]
  assert len(indices) == len(set(indices)), 'an asset was written twice'
  return {e['index']: e['sha256'] for e in entries}


@pytest.fixture(scope='module')
def reference(shapes_diffusion_run, tmp_path_factory):
  """An uninterrupted, pipelined job on this process's 8 devices (2 assets per device)."""
  workdir = shapes_diffusion_run[0]
  out = tmp_path_factory.mktemp('generated') / 'reference'
  summary = generate.generate(str(workdir), str(out), num=NUM, per_device_batch=2, steps=20,
                              host_threads=4)
  return workdir, out, summary


def test_manifest_and_tfds_copy(reference):
  workdir, out, summary = reference
  assert summary['devices'] == 8 and summary['generated'] == NUM
  with open(out / generate.MANIFEST) as f:
    entries = [json.loads(line) for line in f]
  assert sorted(e['index'] for e in entries) == list(range(NUM))
  first = entries[0]
  assert {first['sampler'], first['nfe'], first['seed'], first['step']} == {'ddim', 20, 0}
  assert [e['label'] for e in sorted(entries, key=lambda e: e['index'])] == [
      i % 8 for i in range(NUM)]
  dataset = tfds.builder_from_directory(str(out / 'tfds' / 'zoo_generated' / '1.0.0'))
  records = dataset.as_data_source('train')
  assert len(records) == NUM
  for e in entries[:5]:
    record = records[e['index']]
    png = np.asarray(Image.open(out / e['file']))
    np.testing.assert_array_equal(record['image'], png)
    assert record['label'] == e['label'] and record['index'] == e['index']
  assert len({e['sha256'] for e in entries}) == NUM  # Every asset its own noise.


def test_same_assets_for_a_shorter_job_run_synchronously_on_one_host_thread(reference, tmp_path):
  workdir, out, _ = reference  # The reference wrote its PNGs on 4 host threads.
  summary = generate.generate(str(workdir), str(tmp_path / 'sync'), num=11, per_device_batch=2,
                              steps=20, pipelined=False, write_tfds=False, host_threads=1)
  assert summary['generated'] == 11
  expected = _checksums(out)
  assert _checksums(tmp_path / 'sync') == {i: expected[i] for i in range(11)}


def test_kill_9_then_resume_equals_uninterrupted_run_on_one_device(reference, tmp_path):
  workdir, out, _ = reference
  killed = tmp_path / 'killed'
  cache = tmp_path / 'cache'
  cmd = _command(workdir, killed, '--per-device-batch', '2', '--compile-cache', str(cache),
                 '--no-tfds', '--devices', '1')
  env = dict(os.environ)  # The same 8-device client as the reference, using one device.
  victim = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  manifest = killed / generate.MANIFEST
  deadline = time.time() + 300
  while time.time() < deadline and victim.poll() is None:
    if manifest.exists() and manifest.stat().st_size > 0:
      break
    time.sleep(0.01)
  assert victim.poll() is None, 'the job finished before it could be killed'
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  before = len(manifest.read_text().splitlines())
  assert 0 < before < NUM
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout)
  assert summary['devices'] == 1
  assert summary['resumed_with'] >= before - 1 and summary['generated'] == NUM - summary[
      'resumed_with']
  assert summary['compile_cache_hits'] > 0  # The restart did not compile the sampler again.
  assert _checksums(killed) == _checksums(out)  # 1 device == 8 devices, killed or not.


def test_torn_line_and_corrupt_file_are_regenerated(reference, tmp_path):
  workdir, out, _ = reference
  job = tmp_path / 'job'
  generate.generate(str(workdir), str(job), num=8, per_device_batch=1, steps=20,
                    write_tfds=False)
  lines = (job / generate.MANIFEST).read_text().splitlines(keepends=True)
  corrupt = json.loads(lines[3])
  with open(job / corrupt['file'], 'ab') as f:
    f.write(b'garbage')
  (job / generate.MANIFEST).write_text(''.join(lines[:7]) + lines[7][:20])  # Torn last line.
  summary = generate.generate(str(workdir), str(job), num=8, per_device_batch=1, steps=20,
                              write_tfds=False)
  assert summary['resumed_with'] == 6 and summary['generated'] == 2
  assert _checksums(job)[3] == corrupt['sha256']  # Regenerated bit for bit.


def test_errors(reference, tmp_path):
  workdir, out, _ = reference
  with pytest.raises(ValueError, match=r"differs in \['seed'\]"):
    generate.generate(str(workdir), str(out), num=NUM, per_device_batch=2, steps=20, seed=1)
  with pytest.raises(ValueError, match='per-device-batch'):
    generate.generate(str(workdir), str(tmp_path / 'x'), num=4, per_device_batch=0)
  with pytest.raises(ValueError, match='class-conditional: use --from-dataset'):
    generate.generate(str(workdir), str(tmp_path / 'x'), num=4, prompts=['a'])
  with pytest.raises(ValueError, match='holds 0 of 3'):
    from data import generated
    (tmp_path / 'partial').mkdir()
    (tmp_path / 'partial' / generate.JOB).write_text(json.dumps({'num': 3}))
    (tmp_path / 'partial' / generate.MANIFEST).write_text('')
    generated.read_entries(str(tmp_path / 'partial'))


def test_synthetic_classifier_trains_on_generated_images_and_tests_on_real(reference, tmp_path):
  from zoo import config as zoo_config
  from zoo import metrics
  from zoo import train
  _, out, summary = reference
  config = zoo_config.load(
      os.path.join(REPO, 'experiments', f"synthetic_shapes.py:smoke=True,label=label,"
                   f"data={summary['tfds_data_dir']}"),
      ['--config.train.steps=6', '--config.train.progress_bar=false', '--config.mesh.data=1'])
  train.train_and_evaluate(config, str(tmp_path / 'classifier'))
  rows = metrics.read_jsonl(tmp_path / 'classifier' / 'metrics.jsonl')
  real = [r for r in rows if 'real/accuracy' in r][-1]
  assert real['real/examples'] == 64  # The real tiny32 validation split, not generated data.
  assert 0.0 <= real['real/accuracy'] <= 1.0


def test_a_failing_writer_stops_the_pipeline_and_raises():
  dispatched, finished = [], []

  def dispatch(padded):
    dispatched.append(padded[0])
    return padded

  def finish(kept, rows, images):
    if kept[0] == 4:
      raise OSError('disk full')
    finished.append(kept[0])

  groups = generate._groups(list(range(40)), 2, 2)  # 10 groups of 4 assets.
  with pytest.raises(OSError, match='disk full'):
    generate._run_pipelined(groups, dispatch, finish, queue_size=1)
  assert finished == [0] and len(dispatched) < 10  # Nothing after the failure is written.


def test_groups_keep_whole_device_batches():
  # Missing assets 3 and 8..10 with b = 4 on 2 devices: device-batches 0 and 2 are redone
  # (rows 3 and 0..2 kept), then 2 padded with a copy of itself.
  groups = list(generate._groups([3, 8, 9, 10], 4, 2))
  assert groups == [([3, 8, 9, 10], [3, 4, 5, 6], [0, 1, 2, 3, 8, 9, 10, 11])]
  groups = list(generate._groups([9], 4, 2))
  assert groups == [([9], [1], [8, 9, 10, 11, 8, 9, 10, 11])]


def test_benchmark_times_both_modes_on_the_same_work(reference):
  from zoo.bench import generate as bench_generate
  report = bench_generate.measure(str(reference[0]), num=8, per_device_batch=1, repeats=1,
                                  steps=5)
  assert report['devices'] == 8 and report['ratio'] > 0
  assert report['sync_device_seconds'] > 0 and report['sync_host_seconds'] > 0
  assert 1 < report['ceiling'] <= 2
  assert all(len(v) == 1 and v[0] > 0 for v in report['images_per_sec'].values())
