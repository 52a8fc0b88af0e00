"""Orbax checkpoints of the train state together with the data-iterator position.

A step directory holds two items: `state` (`{step, params, opt_state, ema_params}`, restored
straight into its shardings) and `data` (the input pipeline's JSON position), so a resumed run
sees exactly the batches an uninterrupted one would. Before any restore the stored tree is
compared with the one this config builds, and a mismatch lists the differing keys and shapes.
"""

import logging
import os
import typing

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger('zoo')


class Source(typing.NamedTuple):
  """Where a task's pretrained part of the params comes from (its `task.pretrained` values).

  `subtree`: the top-level entry of that run's params ('' = all of them); `ignore`: top-level
  entries of that tree the part lacks on purpose (a ViT classifier's `classifier` layer).
  """
  workdir: str
  subtree: str
  use_ema: bool = True
  ignore: tuple = ()


class Checkpointer:
  """An async Orbax CheckpointManager over `workdir/checkpoints`."""

  def __init__(self, directory, *, max_to_keep=3, async_save=True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = _manager(self.directory, options)

  def latest_step(self):
    """The newest finished checkpoint step, or None."""
    return self._manager.latest_step()

  def save(self, step, state, data_state):
    """Starts saving `state` and the data position at `step` (returns once copied to host)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))

  def restore(self, abstract_state, step=None):
    """(state, data_position) of `step` (default latest), laid out as `abstract_state` says."""
    step = self.latest_step() if step is None else step
    stored, where = self.stored_tree(step), f'{self.directory}/{step}'
    # Params first: their names are the readable ones; optimizer slots only mirror them.
    check_compatible(stored['params'], abstract_state['params'], where + '/params')
    check_compatible(stored, abstract_state, where)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored.state, restored.data

  def stored_tree(self, step):
    """Metadata (shape, dtype per leaf) of the state saved at `step`."""
    return self._manager.item_metadata(step).state

  def wait(self):
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


WEIGHTS = ('step', 'params', 'ema_params')


def load_weights(directory, abstract_state, step=None):
  """{step, params, ema_params} of the checkpoint at `step` (default latest), for inference.

  The optimizer state is not read, so a run whose optimizer chain has changed since it was
  saved (another zoo version, another optax) still samples and evaluates; the weights are
  checked against the model as in `Checkpointer.restore`.
  """
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={'state': ocp.PyTreeCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no finished checkpoint in {directory!r}')
  stored = manager.item_metadata(step).state
  item = {k: abstract_state[k] for k in WEIGHTS}
  for key in ('params', 'ema_params'):
    check_compatible(stored[key], item[key], f'{directory}/{step}/{key}')
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  manager.close()
  return restored.state


def load_params(directory, abstract_params, *, use_ema=False, subtree='', ignore=()):
  """Params (or EMA params) of the latest checkpoint of another run, for `config.init_from`.

  With `subtree` only that top-level entry of the run's params is read (e.g. the 'vae' of a
  VAE run, frozen inside a latent-diffusion run); `abstract_params` then describes it alone.
  `ignore` names top-level entries of the stored tree the model lacks on purpose (a ViT
  classifier's `classifier` when its tower goes into a dual encoder): they are left out and
  logged; every other difference still raises.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoint directory at {directory!r}')
  # The PyTree handler reads the same files as the Standard one and can skip the other items.
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={'state': ocp.PyTreeCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no finished checkpoint in {directory!r}')
  key = 'ema_params' if use_ema else 'params'
  stored = manager.item_metadata(step).state[key]
  where = f'{directory}/{step}/{key}'
  if subtree:
    if subtree not in stored:
      raise ValueError(f'checkpoint {where} has no {subtree!r} params; it has {sorted(stored)}')
    stored, where = stored[subtree], f'{where}/{subtree}'
  left_out = sorted(k for k in ignore if k in stored and k not in abstract_params)
  if left_out:
    log.info('%s: leaving out %s (not part of this model)', where, left_out)
    stored = {k: v for k, v in stored.items() if k not in left_out}
  check_compatible(stored, abstract_params, where)
  item = {key: {subtree: abstract_params} if subtree else abstract_params}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  manager.close()
  params = restored.state[key]
  return params[subtree] if subtree else params


def _manager(directory, options):
  handlers = {'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def check_compatible(stored, abstract, where):
  """Raises ValueError listing keys missing, unexpected or of another shape in `stored`."""
  have = _shapes(stored)
  want = _shapes(abstract)
  problems = [f'  shape mismatch:        {k} checkpoint {have[k]} vs model {want[k]}'
              for k in sorted(want.keys() & have.keys()) if have[k] != want[k]]
  problems += [f'  missing in checkpoint: {k} {want[k]}' for k in sorted(want.keys() - have.keys())]
  problems += [f'  not in this model:     {k} {have[k]}' for k in sorted(have.keys() - want.keys())]
  if problems:
    shown = problems[:40] + ([f'  ... and {len(problems) - 40} more'] if len(problems) > 40 else [])
    raise ValueError(f'checkpoint {where} does not fit this model ({len(problems)} differences):\n'
                     + '\n'.join(shown))


def _shapes(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {path_str(p): tuple(x.shape) if hasattr(x, 'shape') else np.shape(x) for p, x in flat}


def path_str(path):
  """'params/down_blocks_0/conv1/kernel' for a key path (NamedTuple, dict and list alike)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)
