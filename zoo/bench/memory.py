"""Compile-only memory and FLOP benchmark of diffusion denoisers (nothing is ever run).

Run: `python -m zoo.bench.memory [--out memory.json] [--only NAME ...]`

For each case, a training step (ε-MSE loss and its gradient through the model) and a sampling
step (one denoiser forward) are lowered with abstract inputs (`jax.ShapeDtypeStruct`; params from
`jax.eval_shape`) and compiled for the default backend. Numbers come from XLA:
`compiled.memory_analysis()` (bytes) and the cost analysis of the lowered step with layer stacks
unrolled (`bench.model_flops`; a scanned stack's loop body counts once in XLA's). "peak" is
argument + output + temp - alias bytes: everything XLA's static buffer assignment keeps alive
for one call (params, batch, outputs incl. gradients, and the largest simultaneous set of
intermediates), so it is the device memory one step needs, before allocator overhead. The
numbers are for the compiling backend (fusion and scheduling differ between CPU and GPU). On
CPU, XLA's scheduler runs an unrolled model's recomputed forward right after the forward pass,
so there remat shows its extra FLOPs but saves no temp memory (the U-Nets); inside a scanned
layer stack (the DiT, zoo/nn/stack.py) it halves it. GPU/TPU place it in the backward pass.
XLA's backend optimisation level is 0 by default (`--optimize` for full): it halves the CPU
compile and leaves the buffer assignment, hence every byte count, unchanged.

Cases: a pixel-space SD-like U-Net at 256x256x3 vs the same U-Net on f=8 latents (32x32x4),
batch 8; the full SD-1.5 U-Net (64x64x4 latents, 77x768 context, bf16 compute) with remat
off/on; DiT-XL/2 (32x32x4 latents, 1000 classes, bf16) with remat off/on.
"""

import argparse
import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo import bench
from zoo import models
from zoo.diffusion import objectives
from zoo.diffusion import schedules
from zoo.nn import layers
from zoo.nn import stack

PEAK_DEFINITION = ('argument + output + temp - alias bytes of the compiled program (XLA static '
                   'buffer assignment): params, inputs, outputs (loss + gradients for train) and '
                   'the largest simultaneously live set of intermediates')
# SD-like layout, narrower than SD-1.5 so that the 256x256 graph compiles on a CPU in a minute.
SD_LIKE = dict(
    block_out_channels=(64, 128, 256, 256), layers_per_block=2,
    down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
    up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
    mid_block_type='UNetMidBlock2DCrossAttn', num_attention_heads=4, context_dim=768)


@dataclasses.dataclass(frozen=True)
class Case:
  """One model + input size to compile. `image` is HxWxC, `context` LxD or None."""
  name: str
  model: str
  kwargs: dict
  batch: int
  image: tuple
  context: tuple | None = None
  labels: int = 0  # Number of classes; > 0 feeds labels_B.
  steps: tuple = ('train', 'sample')


def default_cases() -> list[Case]:
  """The cases of the module docstring."""
  sd15 = models.unet.preset('sd15') | dict(dtype='bfloat16')
  dit = models.dit.preset('DiT-XL/2') | dict(input_size=32, in_channels=4, num_classes=1000,
                                             dtype='bfloat16')
  return [
      Case('unet-pixel-256', 'unet', SD_LIKE | dict(in_channels=3, out_channels=3), 8,
           (256, 256, 3), (77, 768)),
      Case('unet-latent-32', 'unet', SD_LIKE | dict(in_channels=4, out_channels=4), 8,
           (32, 32, 4), (77, 768)),
      Case('sd15-bf16', 'unet', sd15, 8, (64, 64, 4), (77, 768)),
      Case('sd15-bf16-remat', 'unet', sd15 | dict(remat=True), 8, (64, 64, 4), (77, 768),
           steps=('train',)),
      Case('dit-xl2-bf16', 'dit', dit, 8, (32, 32, 4), labels=1000),
      Case('dit-xl2-bf16-remat', 'dit', dit | dict(remat=True), 8, (32, 32, 4), labels=1000,
           steps=('train',)),
  ]


def _abstract_batch(case: Case) -> dict[str, jax.ShapeDtypeStruct]:
  b, sds = case.batch, jax.ShapeDtypeStruct
  batch = {'x0': sds((b, *case.image), jnp.float32), 'noise': sds((b, *case.image), jnp.float32),
           't': sds((b,), jnp.int32)}
  if case.context is not None:
    batch['context'] = sds((b, *case.context), jnp.float32)
  if case.labels:
    batch['labels'] = sds((b,), jnp.int32)
  return batch


def _conditioning(batch) -> dict[str, Any]:
  cond = {}
  if 'context' in batch:
    cond['context_BxLxD'] = batch['context']
  if 'labels' in batch:
    cond['labels_B'] = batch['labels']
  return cond


def _step_fns(module, channels: int):
  """(train_step, sample_step) functions of (params, batch)."""
  sched = schedules.Schedule.create('scaled_linear', 1000)

  def predict_eps(params, x_t, batch, train):
    pred = module.apply({'params': params}, x_t, batch['t'], train=train,
                        rngs={'dropout': jax.random.key(0)}, **_conditioning(batch))
    return pred[..., :channels]  # DiT's learned-sigma half is not part of the ε-loss.

  def loss(params, batch):
    x_t = objectives.q_sample(sched, batch['x0'], batch['t'], batch['noise'])
    eps = predict_eps(params, x_t, batch, True)
    return jnp.mean(objectives.loss('epsilon', sched, eps, batch['x0'], batch['noise'],
                                    batch['t']))

  return stack.value_and_grad(loss), lambda params, batch: predict_eps(params, batch['x0'],
                                                                     batch, False)


def _stats(compiled, seconds: float, flops: float) -> dict[str, float]:
  return {**bench.xla_stats(compiled, flops), 'compile_seconds': round(seconds, 2)}


def measure(case: Case, compiler_options: dict | None = None) -> dict[str, Any]:
  """Compiles the case's steps (never runs them) and returns their memory/FLOP statistics."""
  module = models.MODELS[case.model].module(**case.kwargs)
  batch = _abstract_batch(case)
  init = lambda b: module.init(jax.random.key(0), b['x0'], b['t'], **_conditioning(b))
  params = nn.unbox(jax.eval_shape(init, batch))['params']
  train_step, sample_step = _step_fns(module, case.image[-1])
  fns = {'train': train_step, 'sample': sample_step}
  result = {'model': case.model, 'batch': case.batch, 'image': list(case.image),
            'context': None if case.context is None else list(case.context),
            'dtype': case.kwargs.get('dtype', 'float32'), 'remat': case.kwargs.get('remat', False),
            'params': layers.param_count(params)}
  for step in case.steps:
    start = time.perf_counter()
    compiled = jax.jit(fns[step]).lower(params, batch).compile(compiler_options)
    seconds = time.perf_counter() - start
    result[step] = _stats(compiled, seconds, bench.model_flops(fns[step], params, batch))
  return result


def ratios(results: dict[str, Any], pixel: str, latent: str) -> dict[str, float]:
  """pixel / latent peak and temp bytes and flops for every step both cases have."""
  out = {}
  for step in ('train', 'sample'):
    if step in results.get(pixel, {}) and step in results.get(latent, {}):
      for key in ('peak_bytes', 'temp_bytes', 'flops'):
        out[f'{step}_{key}'] = results[pixel][step][key] / max(results[latent][step][key], 1)
  return out


def run(cases, compiler_options=None, log=print) -> dict[str, Any]:
  """Measures every case; returns the JSON-ready report (and logs one line per case)."""
  results = {}
  for case in cases:
    results[case.name] = measure(case, compiler_options)
    log(f'{case.name}: compiled {", ".join(case.steps)}')
  return {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
          'jax_version': jax.__version__, 'peak_definition': PEAK_DEFINITION,
          'cases': results,
          'pixel_over_latent': ratios(results, 'unet-pixel-256', 'unet-latent-32')}


def table(report: dict[str, Any]) -> str:
  """A fixed-width text table of the report (sizes in GiB, compute in GFLOP)."""
  gib = lambda n: f'{n / 2**30:9.3f}'
  lines = [f'{"case":20} {"step":6} {"params":>9} {"arg GiB":>9} {"out GiB":>9} {"temp GiB":>9} '
           f'{"peak GiB":>9} {"GFLOP":>10} {"compile s":>9}']
  for name, res in report['cases'].items():
    for step in ('train', 'sample'):
      if step in res:
        s = res[step]
        lines.append(f'{name:20} {step:6} {res["params"] / 1e6:8.1f}M {gib(s["argument_bytes"])} '
                     f'{gib(s["output_bytes"])} {gib(s["temp_bytes"])} {gib(s["peak_bytes"])} '
                     f'{s["flops"] / 1e9:10.1f} {s["compile_seconds"]:9.1f}')
  for key, value in report['pixel_over_latent'].items():
    lines.append(f'pixel/latent {key}: {value:.1f}x')
  return '\n'.join(lines)


def main(argv=None):
  """CLI entry point: measure, print the table, write JSON."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='memory.json', help='JSON report path')
  parser.add_argument('--only', nargs='*', help='case names to run (default: all)')
  parser.add_argument('--optimize', action='store_true',
                      help='full XLA backend optimisation (slower compile; default level 0)')
  args = parser.parse_args(argv)
  cases = default_cases()
  if args.only:
    unknown = sorted(set(args.only) - {c.name for c in cases})
    if unknown:
      raise ValueError(f'--only {unknown}: unknown cases; allowed: {[c.name for c in cases]}')
    cases = [c for c in cases if c.name in args.only]
  options = None if args.optimize else {'xla_backend_optimization_level': 0}
  report = run(cases, options)
  report['compiler_options'] = options or {}
  print(table(report))
  bench.write_report(report, args.out)


if __name__ == '__main__':
  main()
