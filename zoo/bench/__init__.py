"""Benchmarks: scripts that print a table and write JSON (`python -m zoo.bench.<name>`)."""

import json
import statistics
import time

import jax

from zoo import files
from zoo.nn import stack as layer_stack


def write_report(report, path):
  """Writes a benchmark's report as JSON to `path` and says so."""
  with files.atomic_open(path) as f:
    json.dump(report, f, indent=2)
  print(f'wrote {path}')


def xla_stats(compiled, flops: float | None = None) -> dict[str, float]:
  """Bytes and FLOPs of a compiled XLA program (its memory and cost analyses).

  'peak_bytes' is argument + output + temp - alias: everything XLA's static buffer assignment
  keeps alive for one call (params, inputs, outputs and the largest simultaneous set of
  intermediates), before allocator overhead. 'flops' is `flops` where given (`model_flops`:
  the cost analysis counts a loop body once, so a scanned layer stack needs it).
  """
  mem = compiled.memory_analysis()
  out = {'argument_bytes': mem.argument_size_in_bytes, 'output_bytes': mem.output_size_in_bytes,
         'temp_bytes': mem.temp_size_in_bytes, 'alias_bytes': mem.alias_size_in_bytes}
  out['peak_bytes'] = (out['argument_bytes'] + out['output_bytes'] + out['temp_bytes']
                       - out['alias_bytes'])
  out['flops'] = _flops(compiled) if flops is None else float(flops)
  return out


def _flops(stage):
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0))


def model_flops(fn, *args) -> float:
  """FLOPs of `fn(*args)`: XLA's cost analysis of its lowered (unoptimised) program, traced
  with every layer stack unrolled (zoo/nn/stack.py). Lowering only: no compilation."""
  with layer_stack.unrolled():  # A fresh function: jit caches traces by function.
    return _flops(jax.jit(lambda *a: fn(*a)).lower(*args))


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
