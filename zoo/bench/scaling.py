"""How cost grows with the work, and what the jitted sampler loop costs over bare model calls.

Resolution sweep: the pixel U-Net, the latent U-Net and DiT of the bench cases at input sides
32..256 (pixels for the pixel U-Net; latents for the others, i.e. 8x those sides in pixels behind
an f=8 VAE), batch 1. Token sweep: the ViT (CLIP B/16 tower) and the VLM at image sides giving
16..1024 visual tokens. Each point: XLA FLOPs and peak bytes of the compiled train step, and its
median seconds unless the FLOPs at the bench cases' achieved FLOP/s predict more than
`max_seconds` per step (then only FLOPs and memory are given: a 256² pixel U-Net step would take
minutes on two cores).

Sampler: DDIM over NFE steps in one jitted `lax.scan` (`samplers.sample`) against NFE calls of the
jitted bare denoiser from Python, same model, batch and device, timed in alternating pairs (loop,
bare): overhead = the median over pairs of loop / bare, - 1, with its quartiles. Timing each
side's repeats in a block instead gave +35% at 50 NFE on one run and -4% at 10 on the same run:
drift of the machine between the blocks, not the loop.
"""

import dataclasses
import math
import statistics

import jax
import jax.numpy as jnp

from zoo import bench
from zoo.bench import cases as cases_lib
from zoo.bench import zoo_side
from zoo.diffusion import samplers
from zoo.diffusion import schedules
from zoo import files

RESOLUTIONS = (32, 64, 128, 256)
VIT_SIDES = (64, 128, 224, 320, 512)  # Patch 16: 16 .. 1024 tokens.
NFES = (1, 2, 5, 10, 25, 50)
SAMPLER_PAIRS = 11  # Timed pairs per NFE at least: the machine's noise is ±10% a call.


def _resized(case, side):
  kw = dict(case.kwargs)
  if case.model == 'dit':
    kw['input_size'] = side
  elif case.model == 'dual_encoder':
    kw['image'] = dict(kw['image'], image_size=side)
  elif case.model == 'vlm':
    kw['image_size'] = side
  return dataclasses.replace(case, size=f'{side}', kwargs=kw, batch=1, resolution=side)


def tokens_of(case):
  h = cases_lib.image_shape(case)[0]
  patch = case.kwargs['image']['patch_size'] if case.model == 'dual_encoder' else (
      case.kwargs.get('patch_size', 1))
  return (h // patch) ** 2


def point(case, flops_per_s, max_seconds, repeats):
  """FLOPs, peak bytes and (if affordable) the median train-step seconds of one sweep point."""
  stats = zoo_side.measure(case, repeats=repeats, warmup=1, forward=False,
                           budget=(flops_per_s, max_seconds))
  keep = ('flops', 'peak_bytes', 'estimated_s', 'train_s', 'compile_s')
  return {'side': cases_lib.image_shape(case)[0], **{k: stats[k] for k in keep if k in stats}}


def sweeps(bench_cases, flops_per_s, max_seconds=20.0, repeats=3, log=print):
  """{'resolution': {family: [rows]}, 'tokens': {family: [rows]}}."""
  out = {'resolution': {}, 'tokens': {}}
  for family in ('unet', 'unet_t2i', 'dit'):
    rows = []
    for side in RESOLUTIONS:
      rows.append(point(_resized(bench_cases[family], side), flops_per_s, max_seconds, repeats))
      log(f'sweep {family} {side}: {rows[-1]}')
    out['resolution'][family] = rows
  vlm_sides = tuple(s // 16 * 16 for s in VIT_SIDES)
  for family, sides in (('vit', VIT_SIDES), ('vlm', vlm_sides)):
    rows = []
    for side in sides:
      case = _resized(bench_cases[family], side)
      rows.append(point(case, flops_per_s, max_seconds, repeats) | {'tokens': tokens_of(case)})
      log(f'sweep {family} {side}: {rows[-1]}')
    out['tokens'][family] = rows
  return out


def sampler_overhead(case, nfes=NFES, repeats=SAMPLER_PAIRS):
  """Rows of NFE, median loop and bare-calls seconds, overhead (median of the `repeats` paired
  ratios - 1) and its quartiles, images/s (DDIM, eta 0); after one warm-up of each."""
  mod = zoo_side.module(case)
  batch = jax.tree.map(jnp.asarray, cases_lib.inputs(case))
  params = zoo_side.init_params(case, mod, batch)
  sched = schedules.Schedule.create('linear', 1000)
  cond = {}
  if 'labels' in batch:
    cond['labels_B'] = batch['labels']
  if 'context' in batch:
    cond['context_BxLxD'] = batch['context']

  def denoise(params, x, t_B, cond):
    return mod.apply({'params': params}, x, t_B, **cond)[..., :x.shape[-1]]
  bare = jax.jit(denoise)
  x_T = batch['noise']
  rows = []
  for nfe in nfes:
    loop = jax.jit(lambda p, x, c, n=nfe: samplers.sample(
        lambda x_t, t_B: denoise(p, x_t, t_B, c), sched, x, jax.random.key(0), sampler='ddim',
        steps=n))
    t_Bs = [jnp.full((x_T.shape[0],), t, jnp.int32)
            for t in samplers.timesteps_for(1000, nfe)[::-1]]

    def calls():
      x = x_T
      for t_B in t_Bs:
        x = bare(params, x, t_B, cond)
      return x
    pairs = [(bench.median_seconds(lambda: loop(params, x_T, cond), 1, warmup=int(i == 0)),
              bench.median_seconds(calls, 1, warmup=int(i == 0))) for i in range(repeats)]
    loop_s, bare_s = (statistics.median(side) for side in zip(*pairs))
    q1, overhead, q3 = (statistics.quantiles([a / b for a, b in pairs], n=4) if repeats > 1
                        else [pairs[0][0] / pairs[0][1]] * 3)
    rows.append({'nfe': nfe, 'loop_s': loop_s, 'bare_s': bare_s, 'overhead': overhead - 1.0,
                 'overhead_q1': q1 - 1.0, 'overhead_q3': q3 - 1.0,
                 'images_per_s': case.batch / loop_s})
  return rows


def plot(report, path):
  """Step seconds and peak memory against resolution and against tokens (log-log, PIL)."""
  from PIL import Image, ImageDraw
  colours = ['#d62728', '#1f77b4', '#2ca02c', '#9467bd', '#ff7f0e']
  image = Image.new('RGB', (960, 760), 'white')
  draw = ImageDraw.Draw(image)
  panels = [(sweep, key, axis) for sweep, axis in (('resolution', 'side'), ('tokens', 'tokens'))
            for key in ('train_s', 'peak_bytes')]
  for i, (sweep, key, axis) in enumerate(panels):
    x0, y0, w, h = 70 + (i % 2) * 470, 30 + (i // 2) * 370, 380, 280
    series = report[sweep]
    pts = [(r[axis], r[key]) for rows in series.values() for r in rows if r.get(key)]
    if not pts:
      continue
    xs, ys = [math.log10(p[0]) for p in pts], [math.log10(p[1]) for p in pts]
    lx, hx, ly, hy = min(xs), max(xs), min(ys), max(ys)
    sx = lambda v: x0 + w * (math.log10(v) - lx) / max(hx - lx, 1e-9)
    sy = lambda v: y0 + h - h * (math.log10(v) - ly) / max(hy - ly, 1e-9)
    unit = 'train step s' if key == 'train_s' else 'peak bytes (XLA)'
    draw.rectangle([x0, y0, x0 + w, y0 + h], outline='black')
    draw.text((x0, y0 - 20), f'{unit} vs {axis} (log-log)', fill='black')
    draw.text((x0 - 65, y0), f'{10 ** hy:.3g}', fill='black')
    draw.text((x0 - 65, y0 + h - 10), f'{10 ** ly:.3g}', fill='black')
    draw.text((x0, y0 + h + 4), f'{10 ** lx:.0f}', fill='black')
    draw.text((x0 + w - 30, y0 + h + 4), f'{10 ** hx:.0f}', fill='black')
    for j, (name, rows) in enumerate(series.items()):
      xy = [(sx(r[axis]), sy(r[key])) for r in rows if r.get(key)]
      if len(xy) > 1:
        draw.line(xy, fill=colours[j % len(colours)], width=2)
      draw.text((x0 + 10 + 90 * j, y0 + h + 20), name, fill=colours[j % len(colours)])
  with files.atomic_path(path) as tmp:
    image.save(tmp, format='PNG')
  print(f'wrote {path}')

