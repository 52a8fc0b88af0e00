"""Layer stacks as one lax.scan against the same layers unrolled (zoo/nn/stack.py), one process.

  python -m zoo.bench.stack [--families dit,vit,text] [--repeats 5] [--out stack.json]

For each family's bench case (zoo/bench/cases.py): the zoo train step (loss, gradient, AdamW)
compiled twice, as the models apply their stacks (scan) and traced under `stack.unrolled()`;
compile seconds, then the two steps timed alternately (`--repeats` each, after one warm-up),
medians. Prints a table and writes JSON.
"""

import argparse
import contextlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from zoo import bench
from zoo.bench import cases as cases_lib
from zoo.bench import zoo_side
from zoo.nn import stack

FAMILIES = ('dit', 'vit', 'text', 'vlm')  # The bench families whose models have a scanned stack.


def compiled_step(case, setting=contextlib.nullcontext):
  """(run one step -> seconds, compile seconds, XLA temp bytes) of the case's train step,
  traced within `setting()`."""
  mod = zoo_side.module(case)
  batch = jax.tree.map(jnp.asarray, cases_lib.inputs(case))
  params = zoo_side.init_params(case, mod, batch)
  tx = optax.adamw(zoo_side.LEARNING_RATE)
  state = [params, tx.init(params)]
  step = jax.jit(zoo_side.train_step_fn(zoo_side.loss_fn(case, mod), tx), donate_argnums=(0, 1))
  start = time.perf_counter()
  with setting():
    lowered = step.lower(state[0], state[1], batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  def run():
    start = time.perf_counter()
    state[0], state[1], value = compiled(state[0], state[1], batch)
    jax.block_until_ready(value)
    return time.perf_counter() - start
  run()
  return run, compile_s, compiled.memory_analysis().temp_size_in_bytes


def alternate(runs, repeats):
  """{name: median seconds} of the `runs` {name: run()}, called in turn `repeats` times."""
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      times[name].append(run())
  return {name: statistics.median(t) for name, t in times.items()}


def compare(case, repeats=5):
  """Step and compile seconds of the scanned and the unrolled train step, timed alternately."""
  (scan, scan_compile, _), (unrolled, unrolled_compile, _) = (
      compiled_step(case, setting) for setting in (contextlib.nullcontext, stack.unrolled))
  out = {'family': case.family, 'batch': case.batch, 'scan_compile_s': scan_compile,
         'unrolled_compile_s': unrolled_compile}
  out |= {f'{k}_step_s': v for k, v in alternate({'scan': scan, 'unrolled': unrolled},
                                                  repeats).items()}
  out['speedup'] = out['unrolled_step_s'] / out['scan_step_s']
  return out


def table(rows):
  lines = ['| family (bench size, batch) | scan step s | unrolled step s | speedup | '
           'scan compile s | unrolled compile s |', '|---|---|---|---|---|---|']
  lines += [f"| {r['family']} ({r['batch']}) | {r['scan_step_s']:.2f} | "
            f"{r['unrolled_step_s']:.2f} | {r['speedup']:.2f}× | {r['scan_compile_s']:.1f} | "
            f"{r['unrolled_compile_s']:.1f} |" for r in rows]
  return '\n'.join(lines)


def ab_main(argv, prog, doc, families_allowed, compare_fn, table_fn):
  """The CLI of a one-process A/B benchmark over bench cases: --families, --repeats, --out;
  prints each family's row as it lands, then the table; writes JSON."""
  parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
  parser.add_argument('--families', default=','.join(families_allowed),
                      help=f'comma-separated, from {",".join(families_allowed)}')
  parser.add_argument('--repeats', type=int, default=5, help='timed steps per variant')
  parser.add_argument('--out', default=f'{prog.rsplit(".", 1)[-1]}.json', help='JSON report')
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  families = [f for f in args.families.split(',') if f]
  unknown = sorted(set(families) - set(families_allowed))
  if unknown:
    parser.error(f'--families: unknown {unknown}; allowed: {list(families_allowed)}')
  if args.repeats < 1:
    parser.error(f'--repeats {args.repeats}: must be at least 1')
  cases = cases_lib.bench_cases()
  rows = []
  for family in families:
    rows.append(compare_fn(cases[family], args.repeats))
    print(table_fn(rows[-1:]).splitlines()[-1], flush=True)
  print(table_fn(rows))
  bench.write_report({'command': f'{prog} ' + ' '.join(argv), 'jax': jax.__version__,
                      'rows': rows}, args.out)
  return rows


def main(argv=None):
  return ab_main(argv, 'python -m zoo.bench.stack', __doc__, FAMILIES, compare, table)


if __name__ == '__main__':
  main()
