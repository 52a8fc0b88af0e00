"""The task's loss on the evaluation split (fixed batches, fixed noise: comparable across steps)."""

import functools

import jax
import numpy as np

import data as data_lib
from zoo import sharding


class EvalLoss:
  """Mean task loss over `num_batches` batches of `config.data.eval_split`."""

  SCHEMA = {'type': str, 'num_batches': int, 'batch_size': int, 'use_ema': bool, 'seed': int}

  @staticmethod
  def check(cfg, config, where):
    if cfg.num_batches < 1 or cfg.batch_size < 1:
      raise ValueError(f'{where}: num_batches and batch_size must be >= 1')
    if cfg.batch_size % jax.process_count():
      raise ValueError(f'{where}.batch_size={cfg.batch_size} is not divisible by the '
                       f'{jax.process_count()} processes')

  def __init__(self, cfg, *, task, config, workdir):
    self.cfg, self.task, self.data_cfg = cfg, task, config.data
    self._loss = jax.jit(functools.partial(task.loss, train=False))

  def run(self, state, step):
    cfg = self.cfg
    params = state['ema_params' if cfg.use_ema else 'params']
    batches = data_lib.get_dataset(
        self.data_cfg, split=self.data_cfg.eval_split, seed=cfg.seed,
        global_batch_size=cfg.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), repeat=True)
    mesh_sharding = sharding.batch_sharding(jax.tree.leaves(params)[0].sharding.mesh)
    rng = jax.random.PRNGKey(cfg.seed)
    losses = []
    for i in range(cfg.num_batches):
      batch = sharding.global_batch(next(batches), mesh_sharding)
      loss, _ = self._loss(params, batch, jax.random.fold_in(rng, i))
      losses.append(float(np.asarray(loss.addressable_data(0))))
    return {'eval_loss': float(np.mean(losses))}
