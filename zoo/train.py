"""The one training loop every model of the zoo runs through: `train_and_evaluate`.

State `{step, params, opt_state, ema_params}` is born sharded (`eval_shape` -> shardings ->
`jit(init, out_shardings=...)`; on CPU the params are drawn op by op first), updated by the
module-level `train_step` (jitted once with the state donated), checkpointed with the data
position, and resumed by running the same command on the same workdir.
"""

import contextlib
import dataclasses
import errno
import functools
import logging
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

import data as data_lib
from data import text_tokenizers
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import eager
from zoo import evals
from zoo import files
from zoo import metrics as metrics_lib
from zoo import optim
from zoo import sharding
from zoo import tasks
from zoo.nn import stack

log = logging.getLogger('zoo')


def train_step(state, batch, rng, *, loss_fn, tx, schedule, grad_accum, ema_decay,
               pass_step=False):
  """One optimizer update: accumulated gradients, clipping (in `tx`), EMA; returns metrics.

  The EMA decays with `optim.ema_decay_at` (diffusers' warm-up, capped at `ema_decay`).

  Randomness is `fold_in(rng, step)`, so a resumed run draws exactly what an uninterrupted
  one would. With `pass_step` the loss also gets `step=` (e.g. a GAN term that starts late).
  """
  step_rng = jax.random.fold_in(rng, state['step'])
  if pass_step:
    loss_fn = functools.partial(loss_fn, step=state['step'])
  grad_fn = stack.value_and_grad(loss_fn, has_aux=True)  # Layer stacks scanned.
  if grad_accum == 1:
    (loss, aux), grads = grad_fn(state['params'], batch, step_rng)
  else:
    loss, aux, grads = _accumulate(grad_fn, state['params'], batch, step_rng, grad_accum)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new_state = {
      'step': state['step'] + 1,
      'params': params,
      'opt_state': opt_state,
      'ema_params': optim.ema_update(state['ema_params'], params,
                                     optim.ema_decay_at(state['step'], ema_decay)),
  }
  metrics = {**aux, 'loss': loss, 'grad_norm': optax.tree.norm(grads),
             'param_norm': optax.tree.norm(params), 'lr': schedule(state['step'])}
  return new_state, metrics


def _accumulate(grad_fn, params, batch, rng, n):
  """Mean loss, metrics and gradients over `n` micro-batches, scanned to bound memory."""
  # Micro-batch i takes every n-th example, so the leading (sharded) axis stays contiguous.
  micro = jax.tree.map(lambda x: x.reshape(-1, n, *x.shape[1:]).swapaxes(0, 1), batch)
  first = jax.tree.map(lambda x: x[0], micro)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(grad_fn, params, first, rng))

  def body(carry, i_and_batch):
    i, mb = i_and_batch
    out = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, out), None

  ((loss, aux), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(n), micro))
  return jax.tree.map(lambda x: x / n, (loss, aux, grads))


def init_state(rng, batch, *, task, tx):
  """The boxed train state; params carry their logical axis names."""
  return _state_around(task.init(rng, batch), tx)


def _state_around(params, tx):
  return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'opt_state': tx.init(params),
      'ema_params': jax.tree.map(lambda x: x, params),
  }


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the first step; shared by train, eval and sample."""
  config: object
  mesh: jax.sharding.Mesh
  task: object
  tx: optax.GradientTransformation
  schedule: object
  batch_sharding: jax.sharding.NamedSharding
  abstract_batch: dict
  state_shardings: dict
  abstract_state: dict
  init_jaxpr: object  # task.init(rng, batch) traced once (`setup`), boxed params out.

  def init(self, rng, skip=()):
    """A fresh state laid out as `state_shardings`.

    Top-level params in `skip` (about to be loaded: pretrained parts, `init_from`) come out as
    zeros without being drawn; the other params are the same values either way (optimizer
    state is zeros whatever the params; EMA follows the loaded params). On accelerators one
    jitted program creates each array directly on its devices; on CPU the params are drawn op
    by op first (`zoo/eager.py`: XLA:CPU compiles a jitted init several times slower).
    """
    boxed = self.abstract_state['params']
    paths, tree = jax.tree_util.tree_flatten_with_path(boxed)
    keep = [path[0].key not in skip for path, _ in paths]

    def draw(r):
      # The batch only gave the init its shapes: zeros, made if a kept equation reads them.
      batch = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.tree.leaves(self.abstract_batch)]
      drawn = eager.run(self.init_jaxpr, [r, *batch], keep)
      return jax.tree.unflatten(tree, [x if k else jnp.zeros(a.shape, a.dtype)
                                       for x, k, (_, a) in zip(drawn, keep, paths)])

    def assemble(params):
      return {'step': jnp.zeros((), jnp.int32), 'params': params,
              'opt_state': self.tx.init(params), 'ema_params': jax.tree.map(jnp.copy, params)}

    if self.mesh.devices.flat[0].platform == 'cpu':
      return jax.jit(assemble, out_shardings=self.state_shardings)(draw(rng))
    return jax.jit(lambda r: assemble(draw(r)), out_shardings=self.state_shardings)(rng)


def setup(config, batch_spec):
  """Mesh, task, optimizer and the abstract sharded state for a per-process `batch_spec`."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  task = tasks.build(config)
  tx, schedule = optim.make(config.optim, config.train.steps, frozen=getattr(task, 'frozen', ()))
  batch_sh = sharding.batch_sharding(mesh)
  per_process = next(iter(batch_spec.values()))[0][0]
  abstract_batch = {
      k: jax.ShapeDtypeStruct((per_process * jax.process_count(), *shape[1:]), dtype,
                              sharding=batch_sh)
      for k, (shape, dtype) in batch_spec.items()}
  # One trace of the init serves the shapes here and the draws of `Setup.init`.
  init_jaxpr, params = jax.make_jaxpr(task.init, return_shape=True)(
      jax.random.PRNGKey(0), abstract_batch)
  boxed = jax.eval_shape(functools.partial(_state_around, tx=tx), params)
  state_sh = sharding.tree_shardings(boxed, mesh, rules)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), state_sh)
  return Setup(config, mesh, task, tx, schedule, batch_sh, abstract_batch, state_sh,
               abstract_state, init_jaxpr)


def _check_devices(config):
  """The mesh must fit the devices and the global batch split over its batch axes."""
  shape = dict(zip(sharding.AXES, sharding.mesh_shape(config.mesh, jax.device_count())))
  devices = math.prod(shape[a] for a in sharding.BATCH_AXES)
  if config.train.batch_size % devices:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} does not split over '
                     f"the {devices} devices of config.mesh's batch axes {shape}")


def _train_data(config):
  return data_lib.get_dataset(
      config.data, split=config.data.train_split, seed=config.seed,
      global_batch_size=config.train.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), repeat=True)


def _first_state(s, ckpt, data, rng):
  """Restores the latest checkpoint, or initialises (optionally from `config.init_from`)."""
  if ckpt.latest_step() is not None:
    state, position = ckpt.restore(s.abstract_state)
    data.set_state(position)
    log.info('resumed from step %d', int(state['step']))
    return state
  pretrained = getattr(s.task, 'pretrained', {})
  skip = tuple(s.abstract_state['params']) if s.config.get('init_from', '') else tuple(pretrained)
  state = s.init(rng, skip)
  params = state['params']
  if s.config.get('init_from', ''):
    params = checkpoint.load_params(os.path.join(s.config.init_from, 'checkpoints'),
                                    s.abstract_state['params'])
    log.info('initialised params from %s', s.config.init_from)
  for key, source in pretrained.items():
    params = {**params, key: checkpoint.load_params(
        os.path.join(source.workdir, 'checkpoints'), s.abstract_state['params'][key],
        use_ema=source.use_ema, subtree=source.subtree, ignore=source.ignore)}
    log.info('params[%r] from %s (%s)', key, source.workdir, source.subtree)
  if hasattr(s.task, 'after_pretrained'):
    params = s.task.after_pretrained(params)
  if params is not state['params']:
    state = {**state, 'params': params, 'ema_params': jax.tree.map(jnp.copy, params)}
  return state


FINITE_METRICS = ('loss', 'grad_norm', 'param_norm')


class _Monitor:
  """Host side of the loop: finite checks, logging, throughput, the progress bar."""

  def __init__(self, config, workdir, start):
    self.config, self.pending = config, None
    self.is_main = jax.process_index() == 0
    self.writer = metrics_lib.MetricWriter(workdir, enabled=self.is_main,
                                           resume_step=start if start else None)
    self.bar = tqdm.tqdm(total=config.train.steps, initial=start, disable=not (
        self.is_main and config.train.progress_bar), dynamic_ncols=True)
    self.last_time, self.last_step = time.perf_counter(), start

  def push(self, step, device_metrics):
    """Queues step `step`'s metrics and finishes the previous step's (already computed)."""
    self.flush()
    self.pending = (step, device_metrics)

  def flush(self):
    if self.pending is None:
      return
    step, device_metrics = self.pending
    self.pending = None
    values = {k: float(np.asarray(v.addressable_data(0))) for k, v in device_metrics.items()}
    # A finite loss over non-finite gradients would still poison the params it updates.
    for name in FINITE_METRICS:
      if not np.isfinite(values[name]):
        raise FloatingPointError(f'non-finite {name} {values[name]} at step {step}')
    self.bar.update(step - self.bar.n)
    if step % self.config.train.log_every == 0 or step == self.config.train.steps:
      now = time.perf_counter()
      rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
      self.last_time, self.last_step = now, step
      values |= {'steps_per_sec': rate, 'examples_per_sec': rate * self.config.train.batch_size}
      self.writer.write(step, values)
      self.bar.set_postfix(loss=f'{values["loss"]:.4f}')

  def close(self):
    self.bar.close()
    self.writer.close()


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the final state."""
  zoo_config.validate(config)
  sharding.maybe_initialize_distributed(config.get('distributed', None))
  _check_devices(config)
  try:
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
      files.write_text(os.path.join(workdir, 'config.json'), zoo_config.to_json(config))
      # A workdir carries the tokenizer its checkpoints' ids come from (captions', else QA's).
      language = [config.data[k] for k in ('text', 'qa') if k in config.data]
      if language:
        text_tokenizers.save_to_workdir(workdir, language[0])
  except OSError as e:
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
      raise PermissionError(e.errno, f'workdir {workdir} is not writable: {e.strerror}') from e
    raise
  train_cfg = config.train
  data = _train_data(config)
  s = setup(config, data.spec())
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 max_to_keep=train_cfg.max_to_keep,
                                 async_save=train_cfg.async_checkpointing)
  init_rng, rng = jax.random.split(jax.random.PRNGKey(config.seed))
  state = _first_state(s, ckpt, data, init_rng)
  sharding.check_sharded(state, s.state_shardings)
  log.info('mesh %s; params %s', dict(s.mesh.shape), sharding.describe(state['params']))
  step_fn = jax.jit(
      functools.partial(train_step, loss_fn=s.task.loss, tx=s.tx, schedule=s.schedule,
                        grad_accum=train_cfg.grad_accum, ema_decay=config.optim.ema_decay,
                        pass_step=getattr(s.task, 'loss_takes_step', False)),
      in_shardings=(s.state_shardings, s.batch_sharding, None),
      out_shardings=(s.state_shardings, None), donate_argnums=0)
  evaluators = evals.build(config, s.task, workdir)
  start = int(np.asarray(state['step'].addressable_data(0)))
  monitor = _Monitor(config, workdir, start)
  try:
    for step in range(start + 1, train_cfg.steps + 1):
      batch = sharding.global_batch(next(data), s.batch_sharding)
      state, step_metrics = step_fn(state, batch, rng)
      monitor.push(step, step_metrics)
      last = step == train_cfg.steps
      if step % train_cfg.checkpoint_every == 0 or last:
        monitor.flush()  # Never checkpoint a state whose loss we have not seen finite.
        ckpt.save(step, state, data.get_state())
      if (train_cfg.eval_every and step % train_cfg.eval_every == 0) or last:
        monitor.flush()
        for name, evaluator in evaluators.items():
          monitor.writer.write(step, {f'{name}/{k}': v for k, v in
                                      evaluator.run(state, step).items()})
    monitor.flush()
  except FloatingPointError as e:
    _close_quietly(monitor)
    with contextlib.suppress(Exception):
      ckpt.wait()
    last = ckpt.latest_step()
    _close_quietly(ckpt)
    raise FloatingPointError(f'{e}; nothing after it was saved, the newest checkpoint is '
                             f'{"step " + str(last) if last is not None else "none"} in '
                             f'{ckpt.directory}') from None
  except BaseException:
    _close_quietly(monitor, ckpt)  # The error that stopped the run stays the one reported.
    raise
  monitor.close()
  ckpt.close()
  return state


def _close_quietly(*closables):
  for c in closables:
    try:
      c.close()
    except Exception as e:  # pylint: disable=broad-except
      log.warning('while stopping: %s', e)
