"""Does a class-conditional diffusion run use its label, and do its blocks attend by position?

Run: `python -m zoo.bench.conditioning --workdir W [--num 64] [--t 900 600 300] [--out c.json]`

On `num` validation images noised to each timestep t (one fixed noise draw per t) the run's
denoiser (EMA params unless --raw) predicts twice, with the true label and with a swapped one,
and the table reports the rms difference of the two predictions (`swap +k`: label + k modulo
the classes; for the 64 `shape_colour` labels, index = shape * 8 + colour, so +1 is the next
colour and +8 the next shape; `null`: the null class guidance uses). An ε-prediction of ~unit
rms that moves by 0.005 when the shape label changes does not draw the shape from the label.
Each row also has the denoiser's errors with the true label: the mean squared error of the
ε and of the x0 its prediction implies (whatever it predicts), to compare runs and models
timestep by timestep (a DiT against a U-Net on the same data, say).

For DiT runs, each block's self-attention over the patch grid (recorded eagerly,
`layers.recorded_attention`): the mean entropy of its attention rows in nats (uniform over N
tokens: ln N) and the mean mass on the query's 3x3 patch neighbourhood (uniform: the
neighbourhood's share of the grid). Blocks near uniform do not attend by position.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from zoo import files
from zoo import runs
from zoo.diffusion import objectives
from zoo.evals import generation
from zoo.nn import layers


def neighbourhood_N_N(grid):
  """NxN float mask of the 3x3 (Chebyshev distance <= 1) neighbourhoods on a grid x grid."""
  rows_N, cols_N = (a.reshape(-1) for a in np.meshgrid(np.arange(grid), np.arange(grid),
                                                       indexing='ij'))
  dist = np.maximum(abs(rows_N[:, None] - rows_N[None]), abs(cols_N[:, None] - cols_N[None]))
  return (dist <= 1).astype(np.float64)


def attention_stats(probs_BxAxNxN):
  """(mean row entropy in nats, mean mass on the 3x3 neighbourhood) of square grid attention."""
  p = np.asarray(probs_BxAxNxN, np.float64)
  grid = int(round(p.shape[-1] ** 0.5))
  if grid * grid != p.shape[-1]:
    raise ValueError(f'attention over {p.shape[-1]} keys is not a square patch grid')
  entropy = float(-(p * np.log(np.maximum(p, 1e-30))).sum(-1).mean())
  return entropy, float((p * neighbourhood_N_N(grid)).sum(-1).mean())


def measure(workdir, *, num=64, timesteps=(900, 600, 300), swaps=(1, 8), use_ema=True, seed=0):
  """{'rows': one dict per t: swap rms and, for DiTs, per-block attention stats, ...}."""
  config, s, state = runs.load(workdir)
  task = s.task
  if not getattr(task, 'num_classes', 0):
    raise ValueError(f'{workdir} is not a class-conditional diffusion run (no num_classes)')
  real = generation.real_set(config.data, 'validation', num, seed, '--num')
  x0 = jnp.asarray(real.images_NxHxWxC)
  labels_N = np.asarray(real.labels_N)
  params = generation.params_of(state, use_ema)
  n = task.num_classes
  rows = []
  for t in timesteps:
    t_B = jnp.full((num,), t, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), t), x0.shape)
    x_t = objectives.q_sample(task.schedule, x0, t_B, noise)

    def predict(labels):
      return np.asarray(task.model.apply({'params': params}, x_t, t_B,
                                         labels_B=jnp.asarray(labels), train=False))
    with layers.recorded_attention() as probs:
      base = predict(labels_N)
    eps, x0_hat = objectives.to_eps_and_x0(task.cfg.prediction_type, task.schedule, x_t, t_B,
                                           jnp.asarray(base[..., :x0.shape[-1]]))
    row = {'t': int(t), 'pred_rms': float(np.sqrt(np.mean(base ** 2))),
           'eps_mse': float(jnp.mean((eps - noise) ** 2)),
           'x0_mse': float(jnp.mean((x0_hat - x0) ** 2))}
    for k in swaps:
      row[f'swap_+{k}'] = float(np.sqrt(np.mean((predict((labels_N + k) % n) - base) ** 2)))
    row['null'] = float(np.sqrt(np.mean((predict(np.full_like(labels_N, n)) - base) ** 2)))
    if config.model.name == 'dit' and probs:
      tokens = probs[0].shape[-1]
      row['blocks'] = [dict(zip(('entropy', 'neighbourhood'), attention_stats(p)))
                       for p in probs]
      row['uniform_entropy'] = float(np.log(tokens))
      row['uniform_neighbourhood'] = float(neighbourhood_N_N(round(tokens ** 0.5)).mean())
    rows.append(row)
  return {'workdir': workdir, 'step': int(np.asarray(state['step'])), 'use_ema': use_ema,
          'num': num, 'rows': rows}


def table(report):
  rows = report['rows']
  swaps = [k for k in rows[0] if k.startswith('swap_')]
  lines = ['| t | ε MSE | x0 MSE | prediction rms | ' +
           ' | '.join(k.replace('_', ' ') for k in swaps) +
           ' | null | attention entropy per block (nats) | 3x3 neighbourhood mass per block |',
           '|' + '---|' * (len(swaps) + 7)]
  for r in rows:
    blocks = r.get('blocks') or []
    ent = ', '.join(f"{b['entropy']:.2f}" for b in blocks) or '—'
    nb = ', '.join(f"{b['neighbourhood']:.2f}" for b in blocks) or '—'
    if blocks:
      ent += f" (uniform {r['uniform_entropy']:.2f})"
      nb += f" (uniform {r['uniform_neighbourhood']:.2f})"
    lines.append(f"| {r['t']} | {r['eps_mse']:.4f} | {r['x0_mse']:.4f} | {r['pred_rms']:.3f} | " +
                 ' | '.join(f'{r[k]:.4f}' for k in swaps) + f" | {r['null']:.4f} | {ent} | {nb} |")
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m zoo.bench.conditioning',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num', type=int, default=64)
  parser.add_argument('--t', type=int, nargs='+', default=[900, 600, 300])
  parser.add_argument('--swaps', type=int, nargs='+', default=[1, 8])
  parser.add_argument('--raw', action='store_true', help='the raw params instead of the EMA')
  parser.add_argument('--out', default='conditioning.json')
  args = parser.parse_args(argv)
  report = measure(args.workdir, num=args.num, timesteps=tuple(args.t), swaps=tuple(args.swaps),
                   use_ema=not args.raw)
  print(f"{args.workdir} at step {report['step']} ({'EMA' if report['use_ema'] else 'raw'} "
        f"params, {args.num} validation images)\n" + table(report))
  with files.atomic_open(args.out) as f:
    json.dump(report, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
