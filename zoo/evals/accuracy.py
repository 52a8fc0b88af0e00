"""Top-1 accuracy of a classification task's `predict['logits']` on a whole split."""

import jax

import data as data_lib
from zoo import embedding
from zoo import sharding


class Accuracy:
  """Accuracy over every full batch of `split` (the last partial global batch is dropped)."""

  SCHEMA = {'type': str, 'split': str, 'batch_size': int, 'use_ema': bool}

  @staticmethod
  def check(cfg, config, where):
    if config.task.name != 'classification':
      raise ValueError(f'{where}.type=accuracy needs config.task.name=classification, '
                       f'not {config.task.name!r}')
    if not cfg.split:
      raise ValueError(f'{where}.split must name a split (e.g. validation)')
    if cfg.batch_size < 1 or cfg.batch_size % jax.process_count():
      raise ValueError(f'{where}.batch_size={cfg.batch_size} must be a positive multiple of the '
                       f'{jax.process_count()} processes')

  def __init__(self, cfg, *, task, config, workdir):
    self.cfg, self.task, self.data_cfg = cfg, task, config.data

  def run(self, state, step):
    cfg = self.cfg
    params = state['ema_params' if cfg.use_ema else 'params']
    batches = data_lib.get_dataset(
        self.data_cfg, split=cfg.split, seed=0, global_batch_size=cfg.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(), repeat=False)
    mesh_sharding = sharding.batch_sharding(jax.tree.leaves(params)[0].sharding.mesh)
    correct = total = 0
    for local in batches:
      batch = sharding.global_batch(local, mesh_sharding)
      hits = self.task.predict['logits'](params, batch['image']).argmax(-1) == batch['label']
      correct += int(sharding.host_gather(hits).sum())
      total += hits.shape[0]
    return {'accuracy': correct / total, 'examples': total}


class DatasetAccuracy(Accuracy):
  """Accuracy on a split of another dataset: `dataset` = 'name[/config]' (e.g. a classifier
  trained on generated images, tested on the real `shapes/single32`), read like the run's data
  (resolution, image key, label key) from the default data dir ($ZOO_DATA_DIR), not the run's."""

  SCHEMA = Accuracy.SCHEMA | {'dataset': str}

  @staticmethod
  def check(cfg, config, where):
    Accuracy.check(cfg, config, where)
    embedding.parse_dataset(f'{cfg.dataset}:{cfg.split}')

  def __init__(self, cfg, *, task, config, workdir):
    super().__init__(cfg, task=task, config=config, workdir=workdir)
    data_cfg, _ = embedding.dataset_config(config.data, f'{cfg.dataset}:{cfg.split}')
    data_cfg.label_key = config.data.label_key
    data_cfg.data_dir = None
    self.data_cfg = data_cfg
