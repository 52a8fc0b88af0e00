"""Where a zoo train step's time goes on this backend, and the same convolutions on two jaxlibs.

  python -m zoo.bench.profile [--families vae,unet] [--steps 3] [--flax-python V/bin/python]
                              [--out profile.json] [--markdown zoo/bench/PROFILE.md]

For each family's bench case: a jax.profiler trace of `--steps` compiled train steps, read back
with `jax.profiler.ProfileData`; every executed HLO instruction's time is summed by kind
(convolution, convolution weight-gradient = a convolution whose output has a kernel's shape,
dot, fusions by XLA's name for what they fuse, copy / transpose, other) and the top
instructions are listed with their share.
Then `flax_peer.conv_rates` (3x3 convolutions at the VAE / U-Net level shapes: forward, input
gradient, weight gradient, GFLOP/s) in fresh processes: with `zoo.YNN_FLAG` (ZOO_CPU_CONV=eigen),
with jaxlib's defaults and, with `--flax-python`, under the jax of the Flax-peer venv (the same
XLA programs on an older XLA:CPU).
"""

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

import zoo
from zoo import bench
from zoo.bench import cases as cases_lib
from zoo.bench import peers
from zoo.bench import zoo_side
from zoo import files

TOP_KINDS = 10  # Rows of the by-kind table; the rest are summed.
INSTRUCTION = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]\S* ([\w\-]+)\(')


def instruction_kinds(hlo_text, kernel_shapes):
  """{instruction name: kind} of an optimised HLO module's text."""
  kinds = {}
  for line in hlo_text.splitlines():
    m = INSTRUCTION.match(line)
    if not m:
      continue
    name, dims, opcode = m.groups()
    shape = tuple(int(d) for d in dims.split(',') if d)
    if opcode == 'convolution':
      kinds[name] = 'conv weight-grad' if shape in kernel_shapes else 'convolution'
    elif opcode == 'fusion':  # XLA names fusions by what they fuse: copy_bitcast_fusion.3, ...
      kinds[name] = 'fusion: ' + name.rsplit('.', 1)[0].removesuffix('_fusion')
    elif opcode in ('dot', 'custom-call'):
      kinds[name] = opcode
    elif opcode in ('copy', 'transpose'):
      kinds[name] = 'copy / transpose'
    else:
      kinds[name] = 'other'
  return kinds


def profile_case(case, steps=3):
  """{'by_kind': {kind: seconds}, 'top': [(instruction, kind, seconds)], 'step_s': ...}."""
  mod = zoo_side.module(case)
  batch = jax.tree.map(jnp.asarray, cases_lib.inputs(case))
  params = zoo_side.init_params(case, mod, batch)
  tx = optax.adamw(zoo_side.LEARNING_RATE)
  state = [params, tx.init(params)]
  compiled = jax.jit(zoo_side.train_step_fn(zoo_side.loss_fn(case, mod), tx),
                     donate_argnums=(0, 1)).lower(state[0], state[1], batch).compile()
  kernels = {tuple(x.shape) for x in jax.tree.leaves(params) if x.ndim == 4}
  kinds = instruction_kinds(compiled.as_text(), kernels)

  def step():
    state[0], state[1], value = compiled(state[0], state[1], batch)
    return jax.block_until_ready(value)
  step()
  with tempfile.TemporaryDirectory() as logdir:
    start = time.perf_counter()
    with jax.profiler.trace(logdir):
      for _ in range(steps):
        step()
    wall = (time.perf_counter() - start) / steps
    path, = glob.glob(f'{logdir}/**/*.xplane.pb', recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  per_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in kinds:
          per_op[event.name] += event.duration_ns / 1e9 / steps
  by_kind = collections.Counter()
  for name, seconds in per_op.items():
    by_kind[kinds[name]] += seconds
  return {'family': case.family, 'size': case.size, 'step_s': wall, 'op_s': sum(per_op.values()),
          'by_kind': dict(by_kind.most_common()),
          'top': [(n, kinds[n], s) for n, s in per_op.most_common(10)]}


def _conv_rates_under(python, flags):
  proc = subprocess.run([python, peers.FLAX_PEER, '--conv'], capture_output=True, text=True,
                        env=dict(os.environ, XLA_FLAGS=flags), check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def conv_comparison(flax_python=None):
  """conv_rates with zoo's XLA flags, with jaxlib's defaults and (`flax_python`) under the
  Flax-peer venv's older jax, each in a fresh process."""
  base = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                  if 'xla_cpu_experimental_ynn_fusion_type' not in f)
  eigen = f'{base} {zoo.YNN_FLAG}'.strip()
  out = {'ZOO_CPU_CONV=eigen': _conv_rates_under(sys.executable, eigen),
         'jaxlib defaults': _conv_rates_under(sys.executable, base)}
  if flax_python:
    out['flax venv'] = _conv_rates_under(flax_python, base)
  return out


def markdown(report):
  lines = ['# Profile of the zoo train step', '',
           f"Written by `{report['command']}` (zoo/bench/profile.py). Times are sums of the "
           'executed HLO instructions (XLA:CPU runs several at once across its threads, so '
           'shares are of instruction time, not wall time).', '']
  for p in report['profiles']:
    lines += [f"## {p['family']} ({p['size']} size): {p['step_s']:.2f} s per step", '',
              f"{p['op_s']:.2f} s of instruction time is attributed to named HLO instructions "
              '(the rest: work the trace does not name, e.g. library calls on their own '
              'threads, and idle time).', '',
              '| kind | instruction s | share |', '|---|---|---|']
    kinds = list(p['by_kind'].items())
    if len(kinds) > TOP_KINDS:
      kinds = kinds[:TOP_KINDS] + [(f'{len(kinds) - TOP_KINDS} other kinds',
                                    sum(s for _, s in kinds[TOP_KINDS:]))]
    lines += [f"| {k} | {s:.3f} | {s / p['op_s']:.0%} |" for k, s in kinds]
    lines += ['', '| top instruction | kind | s | share |', '|---|---|---|---|']
    lines += [f'| `{n}` | {k} | {s:.3f} | {s / p["op_s"]:.0%} |' for n, k, s in p['top']]
    lines.append('')
  sides = list(report['conv'].items())
  lines += ['## 3×3 convolutions, GFLOP/s (float32, NHWC / HWIO)', '',
            '| batch × side² × channels | ' + ' | '.join(
                f'{k} jax {v["jax"]}: {op}' for k, v in sides
                for op in ('forward', 'input grad', 'weight grad')) + ' |',
            '|---|' + '---|' * (3 * len(sides))]
  for i, row in enumerate(sides[0][1]['rows']):
    cells = [f"{v['rows'][i][op]:.1f}" for _, v in sides
             for op in ('forward', 'input_grad', 'weight_grad')]
    lines.append(f"| {row['batch']} × {row['side']}² × {row['channels']} | "
                 + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m zoo.bench.profile',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--families', default='vae,unet')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--flax-python', default=None)
  parser.add_argument('--out', default='profile.json')
  parser.add_argument('--markdown', default=None)
  parser.add_argument('--from-json', default=None, help='render a saved report (no profiling)')
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      return _write(json.load(f), args, write_json=False)
  families = [f for f in args.families.split(',') if f]
  unknown = sorted(set(families) - set(cases_lib.FAMILIES))
  if unknown:
    parser.error(f'--families {unknown}: unknown; allowed: {list(cases_lib.FAMILIES)}')
  bench_cases = cases_lib.bench_cases()
  report = {'command': 'python -m zoo.bench.profile ' + ' '.join(argv),
            'profiles': [profile_case(bench_cases[f], args.steps) for f in families],
            'conv': conv_comparison(args.flax_python)}
  return _write(report, args)


def _write(report, args, write_json=True):
  text = markdown(report)
  print(text)
  if write_json:
    bench.write_report(report, args.out)
  if args.markdown:
    files.write_text(args.markdown, text)
    print(f'wrote {args.markdown}')


if __name__ == '__main__':
  main()
