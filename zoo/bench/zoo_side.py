"""zoo's side of the speed benchmark: the jitted train step and forward of a case.

The train step is the loss of `cases` (same math as the peers'), its gradient and an AdamW
update (optax, lr 1e-4), params and optimizer state donated; the forward is the loss's model
call(s) without gradients, at batch 1. Bytes come from XLA's memory analysis of the compiled
step, FLOPs from its cost analysis of the lowered step with layer stacks unrolled
(`bench.model_flops`).
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from zoo import bench
from zoo import models
from zoo.bench import cases as cases_lib
from zoo.diffusion import objectives
from zoo.diffusion import schedules
from zoo.models import dual_encoder
from zoo.models import text as text_lib
from zoo.models import vit
from zoo.nn import stack

KL_WEIGHT = 1e-6
LEARNING_RATE = 1e-4


def module(case):
  """The flax module a case trains (the tower alone for 'vit' / 'text')."""
  if case.family == 'vit':
    return vit.ViT(**case.kwargs['image'])
  if case.family == 'text':
    return text_lib.TextTransformer(**case.kwargs['text'])
  return models.MODELS[case.model].module(**case.kwargs)


def _vae_loss(m, x, e):
  mean, logvar = m.encode(x)
  rec = m.decode(mean + jnp.exp(0.5 * logvar) * e)
  kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.mean((rec - x) ** 2) + KL_WEIGHT * kl


def contrastive_loss(kind, logits_BxB):
  """CLIP's symmetric softmax cross-entropy or SigLIP's sigmoid loss (mean over pairs)."""
  n = logits_BxB.shape[0]
  if kind == 'clip':
    labels = jnp.arange(n)
    ce = lambda lg: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, labels))
    return 0.5 * (ce(logits_BxB) + ce(logits_BxB.T))
  signs = 2.0 * jnp.eye(n) - 1.0
  return -jnp.mean(jax.nn.log_sigmoid(signs * logits_BxB))


def loss_fn(case, mod):
  """loss(params, batch) -> scalar, the case's objective through the zoo module."""
  apply = lambda params, *args, **kw: mod.apply({'params': params}, *args, **kw)
  objective = case.objective
  if objective == 'diffusion':
    sched = schedules.Schedule.create('linear', 1000)
    channels = cases_lib.image_shape(case)[-1]

    def diffusion(params, b):
      cond = {}
      if 'context' in b:
        cond['context_BxLxD'] = b['context']
      if 'labels' in b:
        cond['labels_B'] = b['labels']
      x_t = objectives.q_sample(sched, b['x0'], b['t'], b['noise'])
      pred = apply(params, x_t, b['t'], train=True, rngs={'dropout': jax.random.key(0)},
                   **cond)
      return jnp.mean((pred[..., :channels] - b['noise']) ** 2)
    return diffusion
  if objective == 'vae':
    return lambda params, b: apply(params, b['x'], b['e'], method=_vae_loss)
  if case.family == 'vit':
    return lambda params, b: jnp.mean(apply(params, b['images']) * b['r'])
  if case.family == 'text':
    return lambda params, b: jnp.mean(apply(params, b['tokens'])[1] * b['r'])
  if objective == 'contrastive':
    kind = case.kwargs['kind']
    return lambda params, b: contrastive_loss(
        kind, dual_encoder.logits(apply(params, b['images'], b['tokens'], train=True)))

  def lm(params, b):
    logits = apply(params, b['images'], b['tokens'])[:, :-1]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b['tokens'][:, 1:]))
  return lm


def init_params(case, mod, batch):
  """Params of the module (unboxed), initialised on the batch's shapes."""
  one = {k: v[:1] for k, v in batch.items()}
  if case.objective == 'diffusion':
    args, kw = (one['x0'], one['t']), {k2: one[k1] for k1, k2 in
                                       (('context', 'context_BxLxD'), ('labels', 'labels_B'))
                                       if k1 in one}
  elif case.objective == 'vae':
    args, kw = (one['x'],), {}
  elif case.family in ('vit', 'text'):
    args, kw = (one['images' if case.family == 'vit' else 'tokens'],), {}
  else:
    args, kw = (one['images'], one['tokens']), {}
  return nn.unbox(jax.jit(lambda r: mod.init(r, *args, **kw))(jax.random.key(0)))['params']


def train_step_fn(loss, tx):
  def step(params, opt_state, batch):
    value, grads = stack.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  return step


def measure(case, repeats=5, warmup=2, forward=True, budget=None):
  """Compile seconds, FLOPs and bytes of the train step; its median seconds; the forward's.

  `budget` = (FLOP/s, seconds): the step is timed only if its FLOPs at that rate take at most
  that long ('estimated_s' says what it would have).
  """
  mod = module(case)
  batch = jax.tree.map(jnp.asarray, cases_lib.inputs(case))
  loss = loss_fn(case, mod)
  params = init_params(case, mod, batch)
  tx = optax.adamw(LEARNING_RATE)
  opt_state = tx.init(params)
  step_fn = train_step_fn(loss, tx)
  start = time.perf_counter()
  compiled = jax.jit(step_fn, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
  compile_s = time.perf_counter() - start
  flops = bench.model_flops(step_fn, params, opt_state, batch)
  out = {'compile_s': compile_s, **bench.xla_stats(compiled, flops),
         'params': sum(x.size for x in jax.tree.leaves(params))}
  state = [params, opt_state]

  def train():
    state[0], state[1], value = compiled(state[0], state[1], batch)
    return value
  if budget:
    out['estimated_s'] = out['flops'] / budget[0]
  if not budget or out['estimated_s'] <= budget[1]:
    out['train_s'] = bench.median_seconds(train, repeats, warmup)
    out['examples_per_s'] = case.batch / out['train_s']
  if forward:
    one = jax.tree.map(lambda x: x[:1], batch)
    fwd = jax.jit(loss_fn(case.with_batch(1), mod)).lower(state[0], one).compile()
    out['forward_s'] = bench.median_seconds(lambda: fwd(state[0], one), repeats, warmup)
  return out


def matmul_peak(n=2048, repeats=5):
  """FLOP/s of an nxn float32 matmul (XLA), the machine's measured peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  seconds = bench.median_seconds(lambda: f(a, a), repeats, warmup=2)
  return 2 * n ** 3 / seconds
