"""The optax chain from `config.optim`: schedule, clipping, weight decay; plus the params EMA."""

import functools
import re

from flax.core import meta
import jax
import jax.numpy as jnp
import optax

from zoo import checkpoint


def lr_schedule(optim_config, total_steps):
  """Linear warmup, then constant / cosine / linear decay to `end_lr_factor * lr` at the end."""
  cfg = optim_config
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = cfg.lr * cfg.end_lr_factor
  if cfg.schedule == 'constant':
    after = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_factor)
  elif cfg.schedule == 'linear':
    after = optax.linear_schedule(cfg.lr, end, decay_steps)
  else:
    raise ValueError(f'config.optim.schedule={cfg.schedule!r}; allowed: constant, cosine, linear')
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def make(optim_config, total_steps, frozen=()):
  """(optax transformation, schedule) for an experiment's `config.optim` and step count.

  Top-level params entries named in `frozen` (a task's pretrained parts, e.g. the VAE of a
  latent-diffusion run) get zero updates and no optimizer state. `optim.lr_mults` (optional,
  big_vision's `lr_mults`): ((regex, multiplier), ...) scales the updates of the params whose
  '/'-joined path fully matches the regex (the first pattern that matches wins; others keep 1),
  after clipping and weight decay, i.e. their learning rate; e.g. (('vision/.*', 0.1),) trains a
  pretrained tower at a tenth of the rate of the rest.
  """
  cfg = optim_config
  schedule = lr_schedule(cfg, total_steps)
  if cfg.name == 'adamw':
    core = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=decay_mask)
  elif cfg.name == 'adam':
    core = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  elif cfg.name == 'sgd':
    core = optax.sgd(schedule, momentum=cfg.b1 or None)
  else:
    raise ValueError(f'config.optim.name={cfg.name!r}; allowed: adamw, adam, sgd')
  parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
  lr_mults = optim_config.get('lr_mults', ())
  check_lr_mults(lr_mults)
  if lr_mults:
    core = optax.chain(core, scale_by_lr_mults(tuple(tuple(m) for m in lr_mults)))
  tx = optax.chain(*parts, core)
  if frozen:
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               functools.partial(_labels, frozen=tuple(frozen)))
  return tx, schedule


def check_lr_mults(lr_mults):
  """Raises ValueError unless `lr_mults` is ((regex, multiplier >= 0), ...), naming the entry."""
  for i, entry in enumerate(lr_mults):
    pair = isinstance(entry, (tuple, list)) and len(entry) == 2
    if not pair or not isinstance(entry[0], str) or isinstance(entry[1], bool) or (
        not isinstance(entry[1], (int, float))) or entry[1] < 0:
      raise ValueError(f'config.optim.lr_mults[{i}]={entry!r}: want (regex, multiplier >= 0), '
                       "e.g. (('vision/.*', 0.1),)")
    try:
      re.compile(entry[0])
    except re.error as e:
      raise ValueError(f'config.optim.lr_mults[{i}]: {entry[0]!r} is not a regex ({e})') from None


def lr_multipliers(params, lr_mults):
  """{path: multiplier} for every params leaf: the first `lr_mults` regex that fully matches its
  path, else 1.0. Raises ValueError naming a pattern that matches no param (a typo would
  otherwise train everything at the full rate)."""
  boxed = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=boxed)[0]
  paths = [checkpoint.path_str(kp) for kp, _ in flat]
  out, used = {}, set()
  for path in paths:
    for pattern, mult in lr_mults:
      if re.fullmatch(pattern, path):
        out[path] = float(mult)
        used.add(pattern)
        break
    else:
      out[path] = 1.0
  for pattern, _ in lr_mults:
    if pattern in used:
      continue
    if any(re.fullmatch(pattern, path) for path in paths):
      raise ValueError(f'config.optim.lr_mults: every path {pattern!r} matches is taken by an '
                       'earlier pattern (the first match wins): put the narrower one first')
    raise ValueError(f'config.optim.lr_mults: {pattern!r} matches no param path; paths look '
                     f'like {paths[:3]} (all {len(paths)}: zoo.optim.lr_multipliers)')
  return out


def scale_by_lr_mults(lr_mults):
  """An optax transformation multiplying each update by its path's `lr_multipliers` value."""

  def init(params):
    lr_multipliers(params, lr_mults)  # Bad patterns fail at init, before the step compiles.
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    mults = lr_multipliers(updates, lr_mults)

    def scale(kp, u):
      m = mults[checkpoint.path_str(kp)]
      return u if m == 1.0 else u * m
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(init, update)


def decay_mask(params):
  """True for the matrices and kernels that weight decay shrinks; False for the rest.

  Biases, norm gains and learned scalars (CLIP's temperature, SigLIP's bias) are not decayed,
  as in OpenCLIP: decaying the log-temperature would pull the logits' scale towards 1.
  """
  return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def _labels(params, frozen):
  # Boxed params (at init) are labelled per box, so frozen boxes become whole `MaskedNode`s.
  boxed = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
  return {k: jax.tree.map(lambda _, k=k: 'frozen' if k in frozen else 'train', v, is_leaf=boxed)
          for k, v in params.items()}


def ema_decay_at(step, decay):
  """The EMA decay after update `step` (0-based): min(decay, (1 + step) / (10 + step)).

  diffusers' `EMAModel` warm-up: early averages forget the random init quickly, so a short
  run's EMA is not held back by it (0.999 ** 3000 would still weigh the init by 5%).
  """
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params, params, decay):
  """ema <- decay * ema + (1 - decay) * params, leaf by leaf in the params' dtype."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_params, params)
