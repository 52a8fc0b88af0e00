"""Orbax checkpoints of the train state together with the data-iterator position.

A step directory holds two items: `state` (`{step, params, opt_state, ema_params}`, restored
straight into its shardings) and `data` (the input pipeline's JSON position), so a resumed run
sees exactly the batches an uninterrupted one would. Before any restore the stored tree is
compared with the one this config builds, and a mismatch lists the differing keys and shapes.

A third item, `integrity`, holds a checksum of every array (the mod-2^32 sum of its 32-bit
words: independent of sharding, it changes with any flipped bit). Orbax itself loads flipped
bits without complaint, so every restore recomputes the sums; a checkpoint that fails to read or
to match is moved aside to `checkpoints/corrupt/STEP` and training falls back to the previous
one with a warning naming both steps. A save that fails (a full disk) raises an OSError naming
the step and the directory; Orbax writes into a temporary directory and renames it only when
complete, so the previous checkpoints stay intact.
"""

import contextlib
import json
import logging
import os
import re
import typing

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger('zoo')


class Source(typing.NamedTuple):
  """Where a task's pretrained part of the params comes from (its `task.pretrained` values).

  `subtree`: the top-level entry of that run's params ('' = all of them); `ignore`: entries
  (top-level names or '/'-paths) of that tree the part lacks on purpose (a ViT classifier's
  `classifier` layer, the layers past a truncated tower's depth).
  """
  workdir: str
  subtree: str
  use_ema: bool = True
  ignore: tuple = ()


class _OrphanedWrites(logging.Filter):
  """Drops asyncio's '(Task|Future|...) exception was never retrieved' records about our checkpoint
  directories: Orbax's per-array write tasks outlive a failed save (a full disk), and its read
  futures a corrupt checkpoint, and log their copies of the error when collected, after
  `Checkpointer` has reported it once (or fallen back with a warning)."""

  def __init__(self):
    super().__init__()
    self.directories = set()

  def filter(self, record):
    if not re.match(r'\w+ exception was never retrieved', str(record.msg)):
      return True
    text = f'{record.msg} {record.exc_info[1] if record.exc_info else ""}'
    return not any(d in text for d in self.directories)


_ORPHANED_WRITES = _OrphanedWrites()
logging.getLogger('asyncio').addFilter(_ORPHANED_WRITES)


class Checkpointer:
  """An async Orbax CheckpointManager over `workdir/checkpoints`, with checksums and fallback."""

  def __init__(self, directory, *, max_to_keep=3, async_save=True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = _manager(self.directory, options)
    self._saving = None
    _ORPHANED_WRITES.directories.add(self.directory)

  def latest_step(self):
    """The newest finished checkpoint step, or None."""
    return self._manager.latest_step()

  def save(self, step, state, data_state):
    """Starts saving `state` and the data position at `step` (returns once copied to host)."""
    self.wait()  # Orbax's save waits for the previous one too: this names the step that failed.
    self._saving = step
    with self._failures(step):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          integrity=ocp.args.JsonSave({'word_sums': word_sums(state), 'shapes': _shapes(state)})))

  def restore(self, abstract_state, step=None):
    """(state, data_position) of `step` (default: the newest readable one), laid out as
    `abstract_state` says. A corrupt newest checkpoint is moved aside with a warning and the
    one before it restored; a checkpoint of another model raises the difference at once."""
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    for i, s in enumerate(steps):
      where = f'{self.directory}/{s}'
      try:
        stored = stored_shapes(self._manager, s)
      except Exception as e:  # pylint: disable=broad-except
        stored, error = None, e
      if stored is not None:
        # Params first: their names are the readable ones; optimizer slots only mirror them.
        check_compatible(_subtree(stored, 'params'), abstract_state['params'], where + '/params')
        check_compatible(stored, abstract_state, where)
        try:
          restored = _restore_verified(self._manager, s, where, {
              'state': ocp.args.StandardRestore(abstract_state), 'data': ocp.args.JsonRestore()})
          return restored.state, restored.data
        except CorruptCheckpoint as e:
          error = e
      if step is not None:
        raise CorruptCheckpoint(f'checkpoint {where} is unreadable: {error}') from error
      fallback = f'falling back to step {steps[i + 1]}' if i + 1 < len(steps) else 'none left'
      log.warning('checkpoint step %d in %s is corrupt (%s); moved to %s; %s', s,
                  self.directory, _short(error), self._quarantine(s), fallback)
    raise CorruptCheckpoint(f'no readable checkpoint in {self.directory}: the steps {steps} '
                            f'are all corrupt (moved to {self.directory}/corrupt/)')

  def wait(self):
    """Blocks until pending async saves are on disk; raises if the last one failed."""
    with self._failures(self._saving):
      self._manager.wait_until_finished()
      self._manager.check_for_errors()

  def close(self):
    try:
      self.wait()
    finally:
      with contextlib.suppress(Exception):  # A failed save was reported by `wait`.
        self._manager.close()

  @contextlib.contextmanager
  def _failures(self, step):
    try:
      yield
    except (OSError, ValueError, RuntimeError) as e:
      if isinstance(e, CorruptCheckpoint):
        raise
      kept = [s for s in self._manager.all_steps() if s != step]
      full = 'No space left on device' in str(e) or "os_error_code='28'" in str(e)
      raise OSError(f'checkpoint step {step} could not be written to {self.directory}: '
                    f'{"no space left on device" if full else _short(e)}; the checkpoints '
                    f'already there ({kept or "none"}) are untouched') from e

  def _quarantine(self, step):
    """Moves step `step`'s directory to `corrupt/STEP` (kept for a post-mortem)."""
    target = os.path.join(self.directory, 'corrupt', str(step))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    n, first = 0, target
    while os.path.exists(target):  # An earlier corrupt copy of this step stays too.
      n += 1
      target = f'{first}.{n}'
    os.replace(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target


class CorruptCheckpoint(OSError):
  """A checkpoint whose files do not read back as what was saved."""


def word_sums(tree):
  """{leaf path: the sum of the leaf's 32-bit words mod 2^32}, the same for any sharding.

  Narrower dtypes sum their 8- or 16-bit words. On several processes each sums the shards it
  holds (replica 0 only) and the partial sums are added across processes.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = np.array([_word_sum(x) for _, x in flat], np.uint64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    partial = multihost_utils.process_allgather(sums.astype(np.uint32).view(np.int32))
    sums = np.asarray(partial).view(np.uint32).astype(np.uint64).sum(0)
  return {path_str(p): int(v % 2**32) for (p, _), v in zip(flat, sums)}


def _word_sum(x):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    parts = [np.asarray(s.data) for s in x.addressable_shards if s.replica_id == 0]
  else:
    parts = [np.asarray(x)]
  total = 0
  for a in parts:
    a = np.ascontiguousarray(a)
    a = a.view(np.uint8) if a.dtype == bool else a
    words = a.reshape(-1).view({1: np.uint8, 2: np.uint16}.get(a.dtype.itemsize, np.uint32))
    total += int(np.sum(words, dtype=np.uint64))
  return total % 2**32


def _restore_verified(manager, step, where, items):
  """`manager.restore` of `items` at `step`, checked against the saved word sums.

  Raises CorruptCheckpoint for files that do not read, or read back other values.
  """
  has_sums = os.path.isdir(os.path.join(manager.directory, str(step), 'integrity'))
  if has_sums:
    items = {**items, 'integrity': ocp.args.JsonRestore()}
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # pylint: disable=broad-except
    raise CorruptCheckpoint(f'{where} does not read: {_short(e)}') from e
  if not has_sums:
    log.info('%s predates checksums: not verified', where)
    return restored
  saved = (restored.integrity or {}).get('word_sums')
  if not isinstance(saved, dict):
    raise CorruptCheckpoint(f'{where}/integrity holds no word sums')
  key = next(iter(k for k in items if k != 'integrity'))
  got = word_sums(restored[key])
  bad = [k for k, v in got.items() if saved.get(k) != v]
  if bad:
    raise CorruptCheckpoint(f'{where}: {len(bad)} arrays differ from what was saved '
                            f'(checksum), e.g. {bad[:3]}')
  return restored


def _short(error):
  text = str(error).strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


WEIGHTS = ('step', 'params', 'ema_params')


def load_weights(directory, abstract_state, step=None):
  """{step, params, ema_params} of the checkpoint at `step` (default latest), for inference.

  The optimizer state is not read, so a run whose optimizer chain has changed since it was
  saved (another zoo version, another optax) still samples and evaluates; the weights are
  checked against the model as in `Checkpointer.restore`, and against their checksums: a
  corrupt latest checkpoint gives way to the one before it, with a warning (files untouched).
  """
  directory = os.path.abspath(directory)
  manager = _reader(directory)
  steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
  if not steps:
    raise FileNotFoundError(f'no finished checkpoint in {directory!r}')
  item = {k: abstract_state[k] for k in WEIGHTS}
  try:
    for i, s in enumerate(steps):
      stored = stored_shapes(manager, s)
      for key in ('params', 'ema_params'):
        check_compatible(_subtree(stored, key), item[key], f'{directory}/{s}/{key}')
      try:
        return _restore_verified(manager, s, f'{directory}/{s}', {
            'state': _partial_restore(item)}).state
      except CorruptCheckpoint as e:
        if i + 1 == len(steps):
          raise
        log.warning('checkpoint step %d in %s is corrupt (%s); using step %d', s, directory,
                    _short(e), steps[i + 1])
  finally:
    manager.close()


def _reader(directory):
  # The PyTree handler reads the same files as the Standard one and can skip the other items.
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'integrity': ocp.JsonCheckpointHandler()})


def _partial_restore(item):
  return ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)


def load_params(directory, abstract_params, *, use_ema=False, subtree='', ignore=()):
  """Params (or EMA params) of the latest checkpoint of another run, for `config.init_from`.

  With `subtree` only that top-level entry of the run's params is read (e.g. the 'vae' of a
  VAE run, frozen inside a latent-diffusion run); `abstract_params` then describes it alone.
  `ignore` names entries of the stored tree the model lacks on purpose, top-level names or
  '/'-paths (a ViT classifier's `classifier` when its tower goes into a dual encoder; a
  tower's `encoder/layers_3` when the model keeps its first three layers): they are left out
  and logged; every other difference still raises.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoint directory at {directory!r}')
  manager = _reader(directory)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no finished checkpoint in {directory!r}')
  key = 'ema_params' if use_ema else 'params'
  stored = _subtree(stored_shapes(manager, step), key)
  where = f'{directory}/{step}/{key}'
  if subtree:
    if subtree not in _top_level(stored):
      raise ValueError(f'checkpoint {where} has no {subtree!r} params; it has '
                       f'{sorted(_top_level(stored))}')
    stored, where = _subtree(stored, subtree), f'{where}/{subtree}'
  wanted = _shapes(abstract_params)
  under = lambda path, prefix: path == prefix or path.startswith(prefix + '/')  # noqa: E731
  left_out = sorted(p for p in ignore if any(under(k, p) for k in stored)
                    and not any(under(k, p) for k in wanted))
  if left_out:
    log.info('%s: leaving out %s (not part of this model)', where, left_out)
    stored = {k: v for k, v in stored.items() if not any(under(k, p) for p in left_out)}
  check_compatible(stored, abstract_params, where)
  item = {key: {subtree: abstract_params} if subtree else abstract_params}
  try:
    restored = _restore_verified(manager, step, f'{directory}/{step}',
                                 {'state': _partial_restore(item)})
  finally:
    manager.close()
  params = restored.state[key]
  return params[subtree] if subtree else params


def _manager(directory, options):
  handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
              'integrity': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def stored_shapes(manager, step):
  """{leaf path: shape} of the state saved at `step`.

  Read from the step's `integrity` JSON where it lists them (one small file; Orbax's own
  metadata opens every array's TensorStore, ~1 ms each), else from Orbax's metadata.
  """
  path = os.path.join(manager.directory, str(step), 'integrity', 'metadata')  # JsonSave's file.
  try:
    with open(path) as f:
      shapes = json.load(f)['shapes']
    return {k: tuple(v) for k, v in shapes.items()}
  except (OSError, ValueError, KeyError, TypeError):
    return _shapes(manager.item_metadata(step).state)


def _subtree(shapes, key):
  """The `{path: shape}` entries under top-level `key`, with paths relative to it."""
  return {k[len(key) + 1:]: v for k, v in shapes.items() if k.startswith(key + '/')}


def _top_level(shapes):
  return {k.split('/')[0] for k in shapes}


def check_compatible(stored, abstract, where):
  """Raises ValueError listing keys missing, unexpected or of another shape in `stored` (a
  tree, or a `{path: shape}` dict as `stored_shapes` gives)."""
  have = stored if _is_flat_shapes(stored) else _shapes(stored)
  want = _shapes(abstract)
  problems = [f'  shape mismatch:        {k} checkpoint {have[k]} vs model {want[k]}'
              for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
  problems += [f'  missing in checkpoint: {k} {want[k]}' for k in sorted(want.keys() - have.keys())]
  problems += [f'  not in this model:     {k} {have[k]}' for k in sorted(have.keys() - want.keys())]
  if problems:
    shown = problems[:40] + ([f'  ... and {len(problems) - 40} more'] if len(problems) > 40 else [])
    raise ValueError(f'checkpoint {where} does not fit this model ({len(problems)} differences):\n'
                     + '\n'.join(shown))


def _is_flat_shapes(tree):
  return isinstance(tree, dict) and all(isinstance(v, tuple) for v in tree.values())


def _shapes(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {path_str(p): tuple(x.shape) if hasattr(x, 'shape') else np.shape(x) for p, x in flat}


def path_str(path):
  """'params/down_blocks_0/conv1/kernel' for a key path (NamedTuple, dict and list alike)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)
