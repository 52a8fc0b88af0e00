"""LoRA fine-tuning of any task's model: `config.lora` wraps the experiment's task.

  config.lora = ConfigDict(dict(rank=4, alpha=4.0, targets=lora.DEFAULT_TARGETS,
                                base_from='workdirs/shapes'))

The params become {'base': the task's params, loaded from `base_from`'s EMA and frozen (zero
updates, no optimizer state), 'lora': the adapters}; the loss and every `predict` function
run the wrapped task on `merge(base, lora)`. Everything else (sampling settings, the
conditioning contract) is the wrapped task's. `zoo export` / `zoo sample` of such a run see the
merged model through `merged_params`.
"""

import os

from zoo import checkpoint
from zoo import config as zoo_config
from zoo.nn import lora

SCHEMA = {'rank': int, 'alpha': (float, int), 'targets': str, 'base_from': str}


def check_config(config):
  """Keys and types of `config.lora`, and that its base run trained this very model."""
  zoo_config.check_keys(config.lora, 'lora', SCHEMA)
  base = config.lora.base_from
  if not base:
    raise ValueError('config.lora.base_from must name the run whose model LoRA adapts')
  theirs = zoo_config.existing_run_config(base)
  if theirs is None:  # Not trained yet: loading its checkpoint at step 0 names the path.
    return
  if theirs.model.to_dict() != config.model.to_dict():
    differ = sorted(k for k in set(theirs.model) | set(config.model)
                    if theirs.model.get(k) != config.model.get(k))
    raise ValueError(f'config.model differs from the base run {base!r} in {differ}: LoRA '
                     'adapts the base model as it is')
  if theirs.task.name != config.task.name:
    raise ValueError(f'config.task.name={config.task.name!r} but the base run {base!r} is a '
                     f'{theirs.task.name!r} run')


class LoRATask:
  """The wrapped task with params {'base', 'lora'} and LoRA-merged losses and predictions."""

  def __init__(self, task, lora_config):
    self.inner = task
    self.rank, self.targets = lora_config.rank, lora_config.targets
    self.scale = float(lora_config.alpha) / lora_config.rank
    self.frozen = ('base',)
    self.pretrained = {'base': checkpoint.Source(os.path.abspath(lora_config.base_from), '')}
    self.predict = {name: self._merged(fn) for name, fn in task.predict.items()}

  def __getattr__(self, name):  # Sampling settings, conditioning, models: the wrapped task's.
    if name in ('after_pretrained', 'inner'):  # The inner task's hook would see {'base', 'lora'}.
      raise AttributeError(name)
    return getattr(self.inner, name)

  def init(self, rng, batch):
    import jax  # The loop's; kept local so the module imports without initialising JAX.
    import flax.linen as nn
    rng_task, rng_lora = jax.random.split(rng)
    base = self.inner.init(rng_task, batch)
    lora.check(nn.unbox(base), self.rank, self.targets)
    return {'base': base, 'lora': lora.init(rng_lora, nn.unbox(base), self.rank, self.targets)}

  def merged_params(self, params):
    """The plain params of the adapted model (what export and inference use)."""
    return lora.merge(params['base'], params['lora'], self.scale)

  def loss(self, params, batch, rng, *args, **kwargs):
    return self.inner.loss(self.merged_params(params), batch, rng, *args, **kwargs)

  def _merged(self, fn):
    def call(params, *args, **kwargs):
      return fn(self.merged_params(params), *args, **kwargs)
    return call
