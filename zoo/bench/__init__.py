"""Benchmarks: scripts that print a table and write JSON (`python -m zoo.bench.<name>`)."""

import json
import statistics
import time

import jax

from zoo import files


def write_report(report, path):
  """Writes a benchmark's report as JSON to `path` and says so."""
  with files.atomic_open(path) as f:
    json.dump(report, f, indent=2)
  print(f'wrote {path}')


def xla_stats(compiled) -> dict[str, float]:
  """Bytes and FLOPs of a compiled XLA program (its memory and cost analyses).

  'peak_bytes' is argument + output + temp - alias: everything XLA's static buffer assignment
  keeps alive for one call (params, inputs, outputs and the largest simultaneous set of
  intermediates), before allocator overhead.
  """
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {'argument_bytes': mem.argument_size_in_bytes, 'output_bytes': mem.output_size_in_bytes,
         'temp_bytes': mem.temp_size_in_bytes, 'alias_bytes': mem.alias_size_in_bytes}
  out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes'] + out['temp_bytes']
                       - out['alias_bytes'])
  out['flops'] = float(cost.get('flops', 0.0))
  return out


def median_seconds(call, repeats=5, warmup=1, sync=jax.block_until_ready):
  """Median wall time of `call()` over `repeats` timed calls after `warmup` untimed ones.

  `sync(result)` waits for the work (JAX dispatch is asynchronous); PyTorch's CPU ops return
  finished, so its callers pass `sync=lambda r: r`.
  """
  for _ in range(warmup):
    sync(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times)
