"""`zoo generate`: batched, sharded, pipelined, resumable generation of a synthetic dataset.

Legend: N assets, D devices, b assets per device and dispatch (`per_device_batch`).

Asset i is drawn from its own key fold_in(PRNGKey(seed), i) (the samplers take one key per
example), under the condition of index i: class label, prompt, or nothing. So asset i is the
same whatever the batch size, the device count, or the order the assets are made in, and a
restarted job generates exactly the assets that are missing. And asset i is always computed
at row i mod b of one device's batch of assets b·(i // b) ... b·(i // b) + b - 1: XLA's float
rounding depends on the shapes a device computes, so this is what makes the PNGs bit-identical,
not just close, for 1 or 8 devices and across restarts.

The device samples batch k+1 while a host thread turns batch k into PNG files, checksums and
manifest lines (the PNGs on a pool of `host_threads`); a bounded queue (`queue_size` batches)
keeps the device from running ahead of the disk. With `pipelined=False` the same work runs
batch after batch, the device idle while the host writes (the benchmark `zoo.bench.generate`
compares the two).

OUT holds:
  generate.json   the job (run, checkpoint step, sampler, NFE, guidance, seed, num, source):
                  a restart with other settings is refused;
  manifest.jsonl  one line per finished asset: index, file, condition, seed and key, sampler,
                  NFE, guidance, checkpoint step, sha256 of the PNG; appended and fsync'ed after
                  the batch's PNGs are in place (written to a temporary name, then renamed);
  images/shard-SSSSS/IIIIIIII.png   `shard_size` assets per directory;
  tfds/           the TFDS dataset `zoo_generated` (data/generated.py), written once all N
                  assets are there; read it as `tfds:zoo_generated` with data_dir=OUT/tfds.

Bit-identity holds within one JAX client: the same process layout with 1 or 8 of its devices
(`devices`). Two processes started with different device counts can round reductions
differently (XLA's CPU client, ~1 ulp), and a diffusion sampler grows that into visible noise.

Killed at any point (kill -9 included) and restarted, the job keeps every asset whose manifest
line is complete and whose file matches its checksum, drops a torn last line, and makes the
rest. The persistent compilation cache (`compile_cache`) lets a restarted job skip compiling.
"""

import hashlib
import io
import json
import logging
import os
import queue
import threading
import time
from concurrent import futures

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zoo import embedding
from zoo import runs
from zoo import sharding
from zoo.evals import generation

log = logging.getLogger(__name__)

JOB = 'generate.json'
MANIFEST = 'manifest.jsonl'
IMAGES = 'images'
DEFAULT_CACHE = os.path.join('~', '.cache', 'zoo', 'jax_compilation_cache')
_CACHE_HITS = '/jax/compilation_cache/cache_hits'
_cache_hits = [0]


def enable_compilation_cache(path=None):
  """Turns on JAX's persistent compilation cache in `path`; returns the directory.

  Default: the cache JAX is already configured with (JAX_COMPILATION_CACHE_DIR), else
  ~/.cache/zoo/jax_compilation_cache.
  """
  path = path or jax.config.jax_compilation_cache_dir or DEFAULT_CACHE
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  if not getattr(enable_compilation_cache, 'listening', False):
    jax.monitoring.register_event_listener(
        lambda event, **kw: _cache_hits.__setitem__(0, _cache_hits[0] + (event == _CACHE_HITS)))
    enable_compilation_cache.listening = True
  return path


def asset_keys(seed, indices):
  """(B, 2) uint32 keys fold_in(PRNGKey(seed), i), one per asset index."""
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed),
                                                 np.asarray(indices, np.uint32))


def conditions(task, config, num, *, prompts=None, dataset=None):
  """(kind, per-index conditions, source description): labels (N,), prompts [N] or None.

  Class runs take the labels of `dataset` records i mod its size (default: class i mod K); text
  runs the prompts (line i mod their count) or the dataset's first captions; unconditional runs
  take neither.
  """
  kind = generation.conditioning(task)
  if prompts is not None and dataset is not None:
    raise ValueError('give at most one of --prompts FILE and --from-dataset name[/config]:split')
  if kind == 'none':
    if prompts is not None or dataset is not None:
      raise ValueError('this run is unconditional: --prompts and --from-dataset do not apply')
    return kind, None, {'kind': 'none'}
  if kind == 'class':
    if prompts is not None:
      raise ValueError('this run is class-conditional: use --from-dataset, not --prompts')
    if dataset is None:
      return kind, np.arange(num) % task.num_classes, {'kind': 'classes'}
    if not config.data.label_key:
      raise ValueError('a class-conditional run needs config.data.label_key')
    data_cfg, split = embedding.dataset_config(config.data, dataset)
    reader = embedding.SplitReader(data_cfg, split)
    records = np.arange(num) % len(reader)
    labels = np.array([ex[config.data.label_key] for ex in
                       reader.source.__getitems__([int(r) for r in np.unique(records)])])
    lookup = dict(zip(np.unique(records).tolist(), labels.tolist()))
    return kind, np.array([lookup[r] for r in records], np.int32), {
        'kind': 'dataset', 'dataset': dataset, 'feature': config.data.label_key}
  if dataset is not None:
    data_cfg, split = embedding.dataset_config(config.data, dataset)
    reader = embedding.SplitReader(data_cfg, split)
    size = min(num, len(reader))
    firsts = [embedding.first_caption(ex, 'captions') for ex in
              reader.source.__getitems__(list(range(size)))]
    return kind, [firsts[i % size] for i in range(num)], {'kind': 'dataset', 'dataset': dataset,
                                                          'feature': 'captions'}
  if not prompts:
    raise ValueError('this run is text-conditional: pass --prompts FILE or --from-dataset')
  return kind, [prompts[i % len(prompts)] for i in range(num)], {'kind': 'prompts',
                                                                 'count': len(prompts)}


def read_prompts(path):
  """The non-empty lines of a prompts file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--prompts {path!r} not found')
  with open(path, encoding='utf-8') as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f'--prompts {path!r} holds no prompt')
  return prompts


def read_manifest(out):
  """{index: entry} of the complete, checksum-verified manifest lines of `out`.

  A torn last line (a kill mid-append) is cut off the file; entries whose PNG is missing or
  differs from its sha256 are dropped (the manifest is rewritten without them).
  """
  path = os.path.join(out, MANIFEST)
  if not os.path.isfile(path):
    return {}
  with open(path, 'rb') as f:
    raw = f.read()
  entries, good_bytes, dropped = {}, 0, 0
  for line in raw.splitlines(keepends=True):
    try:
      entry = json.loads(line) if line.endswith(b'\n') else None
    except json.JSONDecodeError:
      entry = None
    if entry is None:
      break  # Only the last line can be torn: everything before it was fsync'ed whole.
    good_bytes += len(line)
    file = os.path.join(out, entry['file'])
    if entry['index'] in entries or not os.path.isfile(file) or _sha256(file) != entry['sha256']:
      dropped += 1
      continue
    entries[entry['index']] = entry
  if good_bytes != len(raw) or dropped:
    log.info('manifest: kept %d assets, dropped %d, cut %d torn bytes', len(entries), dropped,
             len(raw) - good_bytes)
    _rewrite_manifest(out, entries)
  return entries


def _rewrite_manifest(out, entries):
  tmp = os.path.join(out, MANIFEST + '.tmp')
  with open(tmp, 'w') as f:
    for i in sorted(entries):
      f.write(json.dumps(entries[i], sort_keys=True) + '\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(out, MANIFEST))


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _check_job(out, job):
  """Writes OUT/generate.json, or checks a restart against it."""
  path = os.path.join(out, JOB)
  if os.path.isfile(path):
    with open(path) as f:
      before = json.load(f)
    differ = sorted(k for k in set(before) | set(job) if before.get(k) != job.get(k))
    if differ:
      raise ValueError(f'{out} holds another generation job (it differs in {differ}); '
                       'rerun with its settings to resume, or choose another --out')
    return
  os.makedirs(out, exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(job, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


class _Writer:
  """Host side: uint8 PNGs into their shard directory, then the batch's manifest lines.

  PNG encoding, checksums and file writes run on `threads` host threads (zlib and file I/O
  release the GIL); the manifest lines are appended in index order, once per batch.
  """

  def __init__(self, out, job, conds, keys, shard_size, threads=1):
    self.out, self.job, self.conds, self.shard_size = out, job, conds, shard_size
    self.keys = keys
    self.manifest = open(os.path.join(out, MANIFEST), 'a')
    self.pool = futures.ThreadPoolExecutor(threads, 'zoo-generate-png') if threads > 1 else None
    self.shards = set()

  def _save(self, i, image):
    """Writes asset i's PNG (temporary name, then renamed); returns (relative path, sha256)."""
    from PIL import Image
    rel = os.path.join(IMAGES, f'shard-{i // self.shard_size:05d}', f'{i:08d}.png')
    path = os.path.join(self.out, rel)
    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, 'PNG')
    with open(path + '.tmp', 'wb') as f:
      f.write(buf.getvalue())
    os.replace(path + '.tmp', path)
    return rel, hashlib.sha256(buf.getvalue()).hexdigest()

  def write(self, indices, images_BxHxWxC):
    pixels = generation.to_uint8(np.asarray(images_BxHxWxC, np.float32))
    indices = [int(i) for i in indices]
    for shard in {i // self.shard_size for i in indices} - self.shards:
      os.makedirs(os.path.join(self.out, IMAGES, f'shard-{shard:05d}'), exist_ok=True)
      self.shards.add(shard)
    saved = (self.pool.map(self._save, indices, pixels) if self.pool
             else map(self._save, indices, pixels))
    lines = []
    for i, (rel, sha), key in zip(indices, saved, self.keys[np.asarray(indices)]):
      entry = {'index': i, 'file': rel, 'sha256': sha,
               'seed': self.job['seed'], 'key': [int(k) for k in key],
               'sampler': self.job['sampler'], 'nfe': self.job['steps'],
               'guidance': self.job['guidance'], 'step': self.job['step']}
      if self.conds is not None:
        value = _plain(self.conds[i])
        entry['label' if isinstance(value, int) else 'prompt'] = value
      lines.append(json.dumps(entry, sort_keys=True) + '\n')
    self.manifest.write(''.join(lines))
    self.manifest.flush()
    os.fsync(self.manifest.fileno())

  def close(self):
    if self.pool:
      self.pool.shutdown()
    self.manifest.close()


def _groups(todo, per_device, devices):
  """(kept indices, their rows, the padded index batch) per dispatch.

  Asset i always sits at row i mod b of device-batch i // b (b = `per_device`): each device
  computes whole device-batches, so what a device computes for asset i does not depend on the
  device count, the batches around it, or which assets a restart still misses.
  """
  wanted = set(todo)
  blocks = sorted({i // per_device for i in todo})
  for start in range(0, len(blocks), devices):
    group = blocks[start:start + devices]
    group += [group[-1]] * (devices - len(group))  # Padding devices repeat a block; dropped.
    padded = [block * per_device + j for block in group for j in range(per_device)]
    rows = [r for r, i in enumerate(padded[:len(set(group)) * per_device]) if i in wanted]
    yield [padded[r] for r in rows], rows, padded


def generate(workdir, out, *, num, prompts=None, dataset=None, per_device_batch=8, seed=0,
             sampler=None, steps=None, guidance_scale=None, shard_size=1000, pipelined=True,
             queue_size=2, compile_cache=None, use_ema=True, write_tfds=True, devices=None,
             host_threads=None):
  """Generates assets 0..num-1 of the run `workdir` into `out` (resuming); returns a summary.

  Every dispatch samples `per_device_batch` assets on each of `devices` devices (default all
  of this process's). Assets are bit-identical for any number of devices, pipelined or not,
  interrupted or not; `per_device_batch` is part of the job because XLA's float rounding
  depends (by ~1e-6) on the shapes a device computes. `host_threads` (default: up to 8 of
  the host's cores) encode and write the PNGs; they change the speed, never the output.
  """
  host_threads = host_threads or min(8, os.cpu_count() or 1)
  if min(num, per_device_batch, shard_size, queue_size, host_threads) < 1:
    raise ValueError('--num, --per-device-batch, --shard-size, --queue-size and --host-threads '
                     'must be >= 1')
  if jax.process_count() > 1:
    raise ValueError('zoo generate runs in one process (it shards over all of its devices)')
  if compile_cache != '':
    enable_compilation_cache(compile_cache)
  out = os.path.abspath(out)
  config, s, state = runs.load(workdir)
  task = s.task
  if 'sample' not in task.predict:
    raise ValueError(f'the {config.task.name!r} run in {workdir} does not generate images')
  if generation.conditioning(task) not in ('none', 'class', 'text'):
    raise ValueError(f'{workdir}: {config.task.name!r} runs are not generated from here yet')
  available = len(jax.devices())
  devices = devices or available
  if not 1 <= devices <= available:
    raise ValueError(f'--devices={devices}: this process has {available}')
  mesh = sharding.make_mesh({'data': devices, 'fsdp': 1, 'tensor': 1})
  # Conditions for whole device-batches: the last one's rows past `num` are sampled, not kept.
  padded_num = -(-num // per_device_batch) * per_device_batch
  kind, conds, source = conditions(task, config, padded_num, prompts=prompts, dataset=dataset)
  settings = _settings(task, sampler, steps, guidance_scale)
  job = {'workdir': os.path.abspath(workdir), 'step': int(np.asarray(state['step'])),
         'use_ema': use_ema, 'seed': seed, 'num': num, 'shard_size': shard_size,
         'per_device_batch': per_device_batch, 'conditioning': kind, 'source': source,
         **settings, 'conditions_sha256': hashlib.sha256(json.dumps(
             None if conds is None else list(map(_plain, conds[:num]))).encode()).hexdigest()}
  _check_job(out, job)
  done = read_manifest(out)
  todo = [i for i in range(num) if i not in done]
  params = jax.device_put(state['ema_params' if use_ema else 'params'],
                          NamedSharding(mesh, P()))  # Replicated: sampling shards the batch.
  batch_sharding = sharding.batch_sharding(mesh)
  # Every key on the host once: the writer thread must never wait on the device's queue.
  keys_Nx2 = np.asarray(asset_keys(seed, np.arange(padded_num)))
  writer = _Writer(out, job, conds, keys_Nx2, shard_size, host_threads)

  def dispatch(padded):
    keys = jax.device_put(keys_Nx2[np.asarray(padded)], batch_sharding)
    kw = dict(sampler=settings['sampler'], steps=settings['steps'],
              guidance_scale=settings['guidance'])
    if kind == 'class':
      labels = jax.device_put(np.asarray([conds[i] for i in padded], np.int32), batch_sharding)
      return task.predict['sample'](params, keys, labels, **kw)
    if kind == 'text':
      return task.predict['sample'](params, keys, prompts=[conds[i] for i in padded], **kw)
    return task.predict['sample'](params, keys, num=len(padded), **kw)

  # Seconds spent dispatching (a sampler's host loop) and waiting for the device, and seconds
  # spent writing. Run synchronously, the first is the sampling time, and overlapping the two
  # can gain at most (device + write) / max(device, write).
  timers = {'device_seconds': 0.0, 'host_write_seconds': 0.0}

  def finish(kept, rows, images):
    t0 = time.perf_counter()
    images = sharding.host_gather(images)
    t1 = time.perf_counter()
    writer.write(kept, images[np.asarray(rows, np.int64)])
    timers['device_seconds'] += t1 - t0
    timers['host_write_seconds'] += time.perf_counter() - t1

  start, hits0 = time.perf_counter(), _cache_hits[0]
  try:
    groups = _groups(todo, per_device_batch, devices)
    if pipelined:
      _run_pipelined(groups, dispatch, finish, queue_size)
    else:
      for kept, rows, padded in groups:
        t0 = time.perf_counter()
        images = dispatch(padded)
        timers['device_seconds'] += time.perf_counter() - t0
        finish(kept, rows, images)
  finally:
    writer.close()
  seconds = time.perf_counter() - start
  summary = {'out': out, 'num': num, 'resumed_with': len(done), 'generated': len(todo),
             'seconds': seconds, 'images_per_sec': len(todo) / seconds if todo else 0.0,
             'pipelined': pipelined, 'compile_cache_hits': _cache_hits[0] - hits0,
             'devices': devices, **timers}
  if write_tfds:
    from data import generated
    summary['tfds_data_dir'] = generated.write(out, config, task.pixel_shape)
  return summary


def _plain(value):
  return int(value) if isinstance(value, (int, np.integer)) else value


def _settings(task, sampler, steps, guidance_scale):
  """The sampler settings written in the manifest: the task's defaults where unset."""
  cfg = task.cfg
  return {'sampler': sampler or cfg.sampler, 'steps': int(steps or cfg.sample_steps),
          'guidance': float(cfg.guidance_scale if guidance_scale is None else guidance_scale)}


def _run_pipelined(groups, dispatch, finish, queue_size):
  """Dispatches groups on this thread while a writer thread finishes them, `queue_size` ahead.

  JAX dispatch is asynchronous: `dispatch` returns as soon as the computation is enqueued, so
  the device works on group k+1 while the writer waits for group k's result and writes it.
  """
  pending = queue.Queue(maxsize=queue_size)
  failed = []

  def work():
    while (item := pending.get()) is not None:
      if not failed:
        try:
          finish(*item)
        except BaseException as e:  # Re-raised on the main thread.
          failed.append(e)

  thread = threading.Thread(target=work, name='zoo-generate-writer', daemon=True)
  thread.start()
  try:
    for kept, rows, padded in groups:
      if failed:
        break
      pending.put((kept, rows, dispatch(padded)))
  finally:
    pending.put(None)
    thread.join()
  if failed:
    raise failed[0]
