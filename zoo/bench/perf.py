"""Speed benchmark: every family against its PyTorch reference and the last Flax one, MFU
against the machine's measured peak, cost against resolution / tokens, sampler-loop overhead.

  zoo bench [--families unet,dit,...] [--sizes bench,smoke] [--repeats 5]
            [--flax-python V/bin/python] [--no-sweeps] [--no-sampler]
            [--out bench.json] [--markdown zoo/bench/BENCHMARKS.md] [--plot bench_scaling.png]
  (or python -m zoo.bench.perf ...)

For each family (`cases.FAMILIES`) at its fixed bench size and at its shapes experiment's smoke
size: training examples/s (median of `--repeats` timed steps after 2 warm-up ones), batch-1
forward latency, compile seconds, FLOPs per step from XLA's cost analysis of the lowered zoo
step with its layer stacks unrolled (`bench.model_flops`) -> achieved FLOP/s and MFU against the peak measured in the same run by a 2048² float32
matmul (the larger of XLA's and PyTorch's), and peak memory from XLA's memory analysis. The same
step (`cases` loss, AdamW) runs side by side in this process in PyTorch eager (diffusers /
transformers, `peers.py`) with the same batch, resolution, dtype (float32) and thread count,
and, with `--flax-python`, in the last Flax implementations (another venv, `flax_peer.py`).
Peers are charged zoo's FLOP count (same architecture). The tables go to stdout, JSON to
`--out`, and BENCHMARKS.md (machine, versions, command, tables) to `--markdown`.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time

import jax

import zoo
from zoo import bench
from zoo.bench import cases as cases_lib
from zoo.bench import peers
from zoo.bench import perf_report
from zoo.bench import scaling
from zoo.bench import zoo_side

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'experiments')
SIZES = ('bench', 'smoke')


def machine():
  """CPU model, cores, memory and library versions."""
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  try:
    mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30
  except (ValueError, OSError):
    mem = 0.0
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'diffusers', 'transformers'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  device = jax.devices()[0]
  return {'cpu': cpu, 'cores': os.cpu_count(), 'memory_gib': round(mem, 1),
          'backend': jax.default_backend(), 'device': getattr(device, 'device_kind', str(device)),
          'python': platform.python_version(), 'versions': versions}


def peak(repeats, torch_too, n=2048):
  """The measured peak FLOP/s: the larger of XLA's and PyTorch's nxn float32 matmul."""
  out = {'xla_matmul_flops_per_s': zoo_side.matmul_peak(n, repeats)}
  if torch_too:
    out['torch_matmul_flops_per_s'] = peers.torch_matmul_peak(n, repeats)
  out['peak_flops_per_s'] = max(out.values())
  out['matmul_n'] = n
  return out


def _try(what, fn, log):
  try:
    return fn()
  except Exception as e:  # A peer that cannot build a case is reported, not fatal.
    log(f'{what}: {type(e).__name__}: {str(e)[-400:]}')
    return {'error': f'{type(e).__name__}: {str(e)[-400:]}'}


def measure_case(case, *, repeats, warmup, torch_peer, flax_python, peak_flops, log):
  """One row: zoo's numbers, each peer's, MFU and zoo / best-peer speed."""
  row = {**cases_lib.describe(case), 'zoo': zoo_side.measure(case, repeats, warmup)}
  if torch_peer and case.family in peers.TORCH_FAMILIES:
    row['torch'] = _try(f'{case.family}/{case.size} torch',
                        lambda: peers.torch_measure(case, repeats, warmup), log)
  if flax_python and case.family in peers.FLAX_FAMILIES:
    row['flax'] = _try(f'{case.family}/{case.size} flax',
                       lambda: peers.flax_measure(case, flax_python, repeats, warmup), log)
  flops = row['zoo']['flops']
  for side in ('zoo', 'torch', 'flax'):
    if 'train_s' in row.get(side, {}):
      row[side]['flops_per_s'] = flops / row[side]['train_s']
      row[side]['mfu'] = row[side]['flops_per_s'] / peak_flops
  best = max((row[p]['examples_per_s'] for p in ('torch', 'flax')
              if 'examples_per_s' in row.get(p, {})), default=None)
  row['zoo_over_best_peer'] = row['zoo']['examples_per_s'] / best if best else None
  log(perf_report.row_line(row))
  return row


def run(families=cases_lib.FAMILIES, sizes=SIZES, repeats=5, warmup=2, torch_peer=True,
        flax_python=None, sweeps=True, sampler=True, max_sweep_seconds=20.0, batch_scale=1,
        matmul_n=2048, same_peak_as=None, log=print):
  """The whole report (JSON-ready). `same_peak_as` (FLOP/s, a report being updated): stop
  right after the peak unless it matches (`perf_report.check_same_machine`)."""
  unknown = sorted(set(families) - set(cases_lib.FAMILIES))
  if unknown:
    raise ValueError(f'families {unknown}: unknown; allowed: {list(cases_lib.FAMILIES)}')
  bad_sizes = sorted(set(sizes) - set(SIZES))
  if bad_sizes:
    raise ValueError(f'sizes {bad_sizes}: unknown; allowed: {list(SIZES)}')
  start = time.time()
  report = {'machine': machine(), 'peak': peak(repeats, torch_peer, matmul_n),
            'repeats': repeats, 'warmup': warmup, 'batch_scale': batch_scale, 'rows': []}
  if flax_python:
    report['machine']['flax_peer_versions'] = peers.flax_versions(flax_python)
  peak_flops = report['peak']['peak_flops_per_s']
  if same_peak_as:
    perf_report.check_same_machine(same_peak_as, peak_flops)
  bench_cases = {f: c.with_batch(c.batch * batch_scale)
                 for f, c in cases_lib.bench_cases().items()}
  for size in sizes:
    for family in families:
      case = (bench_cases[family] if size == 'bench'
              else cases_lib.smoke_case(family, EXPERIMENTS))
      report['rows'].append(measure_case(
          case, repeats=repeats, warmup=warmup, torch_peer=torch_peer, flax_python=flax_python,
          peak_flops=peak_flops, log=log))
  if sweeps:
    achieved = [r['zoo']['flops_per_s'] for r in report['rows'] if r['size'] == 'bench']
    rate = max(achieved) if achieved else peak_flops
    report['sweeps'] = scaling.sweeps(bench_cases, rate, max_sweep_seconds, log=log)
  if sampler:
    case = cases_lib.smoke_case('unet', EXPERIMENTS)
    report['sampler'] = {'case': cases_lib.describe(case),
                         'rows': scaling.sampler_overhead(
                             case, repeats=max(repeats, scaling.SAMPLER_PAIRS))}
  report['seconds'] = time.time() - start
  return report


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='zoo bench', description=__doc__.splitlines()[0])
  parser.add_argument('--families', default=','.join(cases_lib.FAMILIES),
                      help=f'comma-separated, from {",".join(cases_lib.FAMILIES)}')
  parser.add_argument('--sizes', default=','.join(SIZES), help='bench, smoke or both')
  parser.add_argument('--repeats', type=int, default=5, help='timed repeats (median)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed calls first')
  parser.add_argument('--no-torch', action='store_true', help='skip the PyTorch peers')
  parser.add_argument('--flax-python', default=None,
                      help='interpreter of a venv with the last Flax diffusers / transformers '
                      '(see zoo/bench/flax_peer.py)')
  parser.add_argument('--no-sweeps', action='store_true', help='skip resolution / token sweeps')
  parser.add_argument('--no-sampler', action='store_true', help='skip the sampler overhead')
  parser.add_argument('--max-sweep-seconds', type=float, default=20.0,
                      help='time a sweep point only if its estimated step is at most this')
  parser.add_argument('--batch-scale', type=int, default=1,
                      help='multiply the bench batches (a GPU wants more work per step)')
  parser.add_argument('--matmul-n', type=int, default=2048, help='side of the peak matmul')
  parser.add_argument('--out', default='bench.json', help='JSON report')
  parser.add_argument('--markdown', default=None, help='write BENCHMARKS.md here')
  parser.add_argument('--plot', default=None, help='PNG of the sweeps')
  parser.add_argument('--note', default='', help='a paragraph for BENCHMARKS.md (conditions)')
  parser.add_argument('--from-json', default=None,
                      help='render the tables / markdown / plot of a saved report (no timing)')
  parser.add_argument('--update', default=None,
                      help='a saved report whose rows / sweeps / sampler this run measures anew '
                      '(the rest kept; BENCHMARKS.md lists both commands)')
  args = parser.parse_args(argv)
  for flag in ('repeats', 'batch_scale', 'matmul_n'):
    if getattr(args, flag) < 1:
      parser.error(f'--{flag.replace("_", "-")} {getattr(args, flag)}: must be at least 1')
  if args.flax_python and not os.access(args.flax_python, os.X_OK):
    parser.error(f'--flax-python {args.flax_python}: not an executable interpreter')
  for flag in ('from_json', 'update'):
    path = getattr(args, flag)
    if path and not os.path.isfile(path):
      parser.error(f'--{flag.replace("_", "-")} {path}: no such report')
  return args


def command_line(argv):
  """How this run was started, with the environment that changes its numbers."""
  flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split() if f != zoo.YNN_FLAG)
  env = [f'ZOO_CPU_CONV={os.environ["ZOO_CPU_CONV"]}'] if os.environ.get('ZOO_CPU_CONV') else []
  env += [f"XLA_FLAGS='{flags}'"] if flags else []  # Less the flag `import zoo` adds itself.
  return ' '.join([*env, 'zoo bench', *argv])


def main(argv=None):
  """CLI: measure, print the tables, write JSON (and BENCHMARKS.md, the plot)."""
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      report = json.load(f)
    return _outputs(report, args, write_json=False)
  old = None
  if args.update:
    with open(args.update) as f:
      old = json.load(f)
  report = run(families=tuple(f for f in args.families.split(',') if f),
               sizes=tuple(s for s in args.sizes.split(',') if s), repeats=args.repeats,
               warmup=args.warmup, torch_peer=not args.no_torch, flax_python=args.flax_python,
               sweeps=not args.no_sweeps, sampler=not args.no_sampler,
               max_sweep_seconds=args.max_sweep_seconds, batch_scale=args.batch_scale,
               matmul_n=args.matmul_n,
               same_peak_as=old['peak']['peak_flops_per_s'] if old else None)
  report['command'] = command_line(argv)
  if old:
    report = perf_report.merge(old, report)
  return _outputs(report, args)


def _outputs(report, args, write_json=True):
  print(perf_report.tables(report))
  if write_json:
    bench.write_report(report, args.out)
  if args.plot and 'sweeps' in report:
    scaling.plot(report['sweeps'], args.plot)
  if args.markdown:
    perf_report.write_markdown(report, args.markdown, plot=args.plot, preface=args.note)
  return report


if __name__ == '__main__':
  main()
