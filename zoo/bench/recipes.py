"""Training recipes of one diffusion experiment side by side: scorer accuracy against step.

Run: `python -m zoo.bench.recipes [--recipes base snr5 ...] [--jobs 9] [--out recipes.json]`

Each recipe is the experiment (`--config`, default `experiments/dit_shapes.py`) with an
argument and `--config.a.b=V` overrides (RECIPES); its step count is what this 2-core machine
trains in about an hour. The whole training split is held on the device and batches are drawn
there (uniform with replacement, K optimizer steps per jitted scan, the zoo's own task,
optimizer and `train.train_step`), so one GPU trains many recipes at once (`--jobs`: one process
each) and a deadline (`--train-seconds`) stops them all. Every `eval_every` steps the EMA
params sample the labels of `num` validation examples (DPM-Solver++ 20 steps, guidance 4) and
the shapes scorer judges them; the last evaluation adds guidance 2 and 7 and the raw params.

'oracle' trains nothing: its denoiser is the closed-form optimal one for the training set
(`oracle_denoiser`: the posterior mean over the training images of the requested class), so
its row is what the sampler, guidance and scorer give when the network is exact.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from zoo import config as zoo_config
from zoo import files

# name: (experiment argument, overrides, eval_every); step counts fit ~1 hour on 2 CPU cores.
RECIPES = {
    'base': ('', ['train.steps=14000'], 2000),
    'snr5': ('', ['task.snr_gamma=5.0', 'train.steps=14000'], 2000),
    'snr2': ('', ['task.snr_gamma=2.0', 'train.steps=14000'], 2000),
    'snr5_lr2': ('', ['task.snr_gamma=5.0', 'optim.lr=0.002', 'train.steps=14000'], 2000),
    'snr5_b64': ('', ['task.snr_gamma=5.0', 'train.batch_size=64', 'optim.lr=0.0015',
                      'train.steps=8000'], 1000),
    'snr5_b256': ('', ['task.snr_gamma=5.0', 'train.batch_size=256', 'train.steps=3000'], 1000),
    'snr5_S': ('size=S', ['task.snr_gamma=5.0', 'train.steps=2800'], 700),
    'snr5_p2': ('patch=2', ['task.snr_gamma=5.0', 'train.steps=3000'], 1000),
    'snr5_d8': ('', ['task.snr_gamma=5.0', 'model.depth=8', 'train.steps=5000'], 1000),
    'v_snr5': ('', ['task.prediction_type=v', 'task.snr_gamma=5.0', 'optim.lr=0.002',
                    'train.steps=14000'], 2000),
    'x0_snr5': ('', ['task.prediction_type=x0', 'task.snr_gamma=5.0', 'optim.lr=0.002',
                     'train.steps=14000'], 2000),
    # Longer than an hour here: where more steps lead.
    'snr5_long': ('', ['task.snr_gamma=5.0', 'train.steps=40000'], 5000),
    'snr5_S_long': ('size=S', ['task.snr_gamma=5.0', 'train.steps=14000'], 2000),
    'snr5_p2_long': ('patch=2', ['task.snr_gamma=5.0', 'train.steps=14000'], 2000),
    'oracle': ('', [], 0),
}
GUIDANCE = 4.0
FINAL_GUIDANCE = (2.0, 4.0, 7.0)
SCAN_STEPS = 100


def oracle_denoiser(images_NxD, labels_N, schedule, null_label):
  """pred_fn(x_t, t_B, labels_B) -> ε of the optimal denoiser of the empirical distribution.

  E[x0 | x_t, label] is the softmax-weighted mean of the training images of that label
  (weights ∝ exp(-|x_t - a·x_i|² / 2s²)); `null_label` pools every image (the unconditional
  term of guidance). Fractional t (the solvers' σ grid) interpolates log σ like the solvers.
  """
  import jax
  import jax.numpy as jnp
  log_sigma = jnp.log(schedule.sqrt_one_minus_alphas_cumprod / schedule.sqrt_alphas_cumprod)
  sq_norms = jnp.sum(jnp.square(images_NxD), axis=1)

  def pred_fn(x, t, labels):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    lo = jnp.floor(t).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, log_sigma.shape[0] - 1)
    sigma = jnp.exp((1.0 - (t - lo)) * log_sigma[lo] + (t - lo) * log_sigma[hi])[:, None]
    a = 1.0 / jnp.sqrt(1.0 + jnp.square(sigma))
    s = sigma * a
    xf = x.reshape(x.shape[0], -1)
    dist = (jnp.sum(jnp.square(xf), 1, keepdims=True) - 2.0 * a * (xf @ images_NxD.T)
            + jnp.square(a) * sq_norms[None])
    allowed = (labels_N[None] == labels[:, None]) | (labels[:, None] == null_label)
    weights = jax.nn.softmax(jnp.where(allowed, -dist / (2.0 * jnp.square(s)), -jnp.inf), 1)
    return ((xf - a * (weights @ images_NxD)) / s).reshape(x.shape)

  return pred_fn


def _load_split(data_cfg, split):
  """The examples of `split` (all but a last partial batch of 100) as numpy arrays."""
  import data as data_lib
  from data import pipeline
  size = pipeline.get_builder(data_cfg).info.splits[split].num_examples
  batches = data_lib.get_dataset(data_cfg, split=split, seed=0,
                                 global_batch_size=min(100, size), repeat=False, prefetch=0)
  parts = list(batches)
  return {k: np.concatenate([b[k] for b in parts]) for k in ('image', 'label')}


def run_recipe(config_spec, name, *, train_seconds, num, steps=0, overrides=(), emit=print):
  """Trains (or, for 'oracle', samples from the optimal denoiser) one recipe; emits row dicts.

  `overrides` ('a.b=V') apply to every recipe, after the recipe's own.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from zoo import diffusion
  from zoo import optim
  from zoo import tasks
  from zoo import train
  from zoo.evals import adherence
  from zoo.evals import generation

  arg, recipe_overrides, eval_every = RECIPES[name]
  path, _, base_arg = config_spec.partition(':')
  spec = f'{path}:{",".join(filter(None, (base_arg, arg)))}'
  config = zoo_config.load(spec, [f'--config.{o}' for o in (*recipe_overrides, *overrides)] +
                           ([f'--config.train.steps={steps}'] if steps else []))
  steps = config.train.steps
  eval_every = min(eval_every, steps) if eval_every else 0
  task = tasks.build(config)
  train_data = _load_split(config.data, config.data.train_split)
  labels = np.asarray(_load_split(config.data, config.data.eval_split)['label'][:num])
  images = jnp.asarray(train_data['image'])
  train_labels = jnp.asarray(train_data['label'])
  start = time.perf_counter()

  def judge(sample_fn, guidance):
    imgs = generation.to_uint8(np.asarray(sample_fn(guidance)))
    return adherence.judge_classes(imgs, labels)

  if name == 'oracle':
    pred_fn = oracle_denoiser(images.reshape(images.shape[0], -1), train_labels, task.schedule,
                              task.num_classes)
    lab = jnp.asarray(labels)

    null = jnp.full_like(lab, task.num_classes)

    @jax.jit
    def oracle_sample(g):
      model_fn = diffusion.classifier_free_guidance(pred_fn, lab, null, g)
      x_T = jax.random.normal(jax.random.key(7), (len(labels), *task.image_shape))
      x0 = diffusion.sample(model_fn, task.schedule, x_T, jax.random.key(8), sampler='dpmpp_2m',
                            steps=20, eta=0.0, prediction_type='epsilon', clip_x0=True)
      return (x0 + 1.0) / 2.0

    row = {'recipe': name, 'step': 0, 'steps': 0, 'train_s': 0.0}
    for g in (1.0, *FINAL_GUIDANCE):
      row[f'g{g:g}'] = judge(oracle_sample, g)['accuracy']
    emit(row)
    return

  tx, schedule = optim.make(config.optim, steps)
  k = min(SCAN_STEPS, eval_every or steps)
  batch_size = config.train.batch_size
  rng = jax.random.key(config.seed)

  def batch_at(step):
    idx = jax.random.randint(jax.random.fold_in(jax.random.key(1), step), (batch_size,), 0,
                             images.shape[0])
    return {'image': images[idx], 'label': train_labels[idx]}

  state = jax.jit(lambda r: nn.unbox(train.init_state(r, batch_at(0), task=task, tx=tx)))(rng)

  def one(state, _):
    state, metrics = train.train_step(
        state, batch_at(state['step']), rng, loss_fn=task.loss, tx=tx, schedule=schedule,
        grad_accum=1, ema_decay=config.optim.ema_decay)
    return state, metrics['loss']

  run_k = jax.jit(lambda s: jax.lax.scan(one, s, None, length=k), donate_argnums=0)
  losses = []
  step = 0
  while step < steps:
    state, loss = run_k(state)
    losses.append(float(jnp.mean(loss)))
    step += k
    last = step >= steps or time.perf_counter() - start > train_seconds
    if not (last or (eval_every and step % eval_every == 0)):
      continue
    row = {'recipe': name, 'step': step, 'steps': steps,
           'train_s': round(time.perf_counter() - start, 1), 'loss': float(np.mean(losses[-10:]))}
    for g in FINAL_GUIDANCE if last else (GUIDANCE,):
      for which, tag in (('ema_params', ''), ('params', '_raw')):
        if which == 'params' and not last:
          continue
        sample = lambda g, p=state[which]: task.sample(  # noqa: E731
            p, jax.random.key(7), labels, sampler='dpmpp_2m', steps=20, guidance_scale=g)
        judged = judge(sample, g)
        row[f'g{g:g}{tag}'] = judged['accuracy']
        row[f'g{g:g}{tag}_shape'] = judged['shape']
    emit(row)
    if last:
      break


HEADER = '| recipe | step | of | train s | accuracy g4 (EMA) | raw | g2 | g7 | loss |'


def _line(r):
  cells = [f'{r[k]:.3f}' if k in r else '' for k in ('g4', 'g4_raw', 'g2', 'g7')]
  loss = f'{r["loss"]:.4f}' if 'loss' in r else ''
  return (f'| {r["recipe"]} | {r["step"]} | {r["steps"]} | {r["train_s"]:.0f} | '
          f'{" | ".join(cells)} | {loss} |')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='experiments/dit_shapes.py')
  parser.add_argument('--recipes', nargs='+', default=list(RECIPES), choices=list(RECIPES))
  parser.add_argument('--train-seconds', type=float, default=3600.0)
  parser.add_argument('--num', type=int, default=256, help='validation labels sampled')
  parser.add_argument('--steps', type=int, default=0, help='every recipe\'s steps (0: its own)')
  parser.add_argument('--jobs', type=int, default=1, help='recipes trained at once')
  parser.add_argument('--override', nargs='*', default=[],
                      help='a.b=V overrides for every recipe (e.g. data.builder_config=single32)')
  parser.add_argument('--out', default='recipes.json')
  parser.add_argument('--worker', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  common = dict(train_seconds=args.train_seconds, num=args.num, steps=args.steps,
                overrides=args.override)
  if args.worker:
    run_recipe(args.config, args.worker, emit=lambda r: print(json.dumps(r), flush=True),
               **common)
    return
  rows = []
  print(HEADER + '\n' + '|---' * 9 + '|', flush=True)

  def emit(row):
    rows.append(row)
    print(_line(row), flush=True)

  if args.jobs == 1:
    for name in args.recipes:
      run_recipe(args.config, name, emit=emit, **common)
  else:
    _run_parallel(args, emit)
  with files.atomic_open(args.out) as f:
    json.dump({'config': args.config, 'num': args.num, 'rows': rows}, f, indent=1)


def _run_parallel(args, emit):
  """One worker process per recipe, `--jobs` at a time; rows arrive as the workers print them."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  pending, running = list(args.recipes), []
  while pending or running:
    while pending and len(running) < args.jobs:
      cmd = [sys.executable, '-m', 'zoo.bench.recipes', '--config', args.config,
             '--worker', pending.pop(0), '--train-seconds', str(args.train_seconds),
             '--num', str(args.num), '--steps', str(args.steps), '--override', *args.override]
      running.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    proc = running.pop(0)
    for line in proc.stdout:
      if line.startswith('{'):
        emit(json.loads(line))
    if proc.wait():
      raise RuntimeError(f'{" ".join(proc.args)} failed with exit code {proc.returncode}')


if __name__ == '__main__':
  main()
