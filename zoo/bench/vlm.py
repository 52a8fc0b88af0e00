"""The VLM study: fusion x attention-cost mitigation; the vision tower's cost against tokens.

Run: `python -m zoo.bench.vlm [--runs DIR] [--batch 64] [--repeats 5] [--sweep 32,64,128,256]
      [--fusions early,mid,late] [--mitigations none,prune,...] [--vision-from W]
      [--out vlm_study.json] [--plot vlm_sweep.png]`

Table 1, one row per fusion (early / mid / late) and mitigation (MITIGATIONS) of the
`experiments/vlm_shapes.py` model: GFLOPs per example of the teacher-forced forward (XLA's
cost analysis of the compiled program, batch `--batch`, a 19-token question and answer), its
peak memory (XLA's memory analysis: arguments + outputs + temporaries), examples/s of that
forward and images/s of the vision tower alone (medians of `--repeats` timed calls after a
warm-up, in this process), and, where `--runs DIR` holds a trained run named
`vlm_<fusion>_<mitigation>` (the experiment's workdir), its last VQA evaluation: overall
accuracy, read-text accuracy and hallucination rate.

Table 2 (the sweep): the vision tower alone at image sides `--sweep` (patch 4: 64 to 4,096
tokens), per mitigation: GFLOPs and peak memory per image (XLA, batch 8) and images/s. The
plot (PNG) draws GFLOPs and memory against the token count on log-log axes.
"""

import argparse
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from zoo import bench
from zoo import models
from zoo import config as zoo_config
from zoo import files

FUSIONS = ('early', 'mid', 'late')
# Settings for the 'tiny' preset (8x8 = 64 visual tokens, a 2-layer vision tower: token
# reduction happens once, between its layers).
MITIGATIONS = {
    'none': {},
    'prune': dict(reduce='prune', prune_keep=0.25),
    'prune50': dict(reduce='prune', prune_keep=0.5),
    'merge': dict(reduce='merge', merge_r=32),
    'merge16': dict(reduce='merge', merge_r=16),
    'window': dict(attention='window', window=1),
    'block': dict(attention='block', block=16),
    'nystrom': dict(attention='nystrom', rank=16),
    'linformer': dict(attention='linformer', rank=16),
}
TEXT_LEN = 19


def _model_config(fusion, mitigation, image_size=32, vision_from=''):
  spec = 'experiments/vlm_shapes.py'
  settings = MITIGATIONS[mitigation] | ({'vision_from': vision_from} if vision_from else {})
  arg = ','.join(f'{k}={v}' for k, v in settings.items())
  config = zoo_config.experiment_module(spec).get_config(arg, fusion=fusion)
  config.model.image_size = image_size
  return config.model


def _stats(compiled, batch):
  stats = bench.xla_stats(compiled)
  return {'gflops_per_example': stats['flops'] / batch / 1e9,
          'peak_mib': stats['peak_bytes'] / 2 ** 20}


def _time(fn, args, repeats):
  return bench.median_seconds(lambda: fn(*args), repeats, warmup=1)


def cost_row(fusion, mitigation, batch=64, repeats=5, vision_from=''):
  """GFLOPs, peak memory and examples/s of the forward; images/s of the vision tower."""
  module = models.build(_model_config(fusion, mitigation, vision_from=vision_from))
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, 32, 32, 3)), jnp.float32)
  tokens = jnp.ones((batch, TEXT_LEN), jnp.int32)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images, tokens)['params']
  forward = jax.jit(lambda p, x, t: module.apply({'params': p}, x, t))
  vision = jax.jit(lambda p, x: module.apply({'params': p}, x, method=module.encode_image))
  row = _stats(forward.lower(params, images, tokens).compile(), batch)
  row['examples_per_sec'] = batch / _time(forward, (params, images, tokens), repeats)
  row['vit_images_per_sec'] = batch / _time(vision, (params, images), repeats)
  row['visual_tokens'] = module.visual_tokens
  return row


def sweep_point(mitigation, image_size, batch=8, repeats=3, vision_from=''):
  """GFLOPs, peak memory and images/s of the vision tower alone at one image side."""
  module = models.build(_model_config('mid', mitigation, image_size, vision_from))
  images = jnp.asarray(np.random.default_rng(0).uniform(
      -1, 1, (batch, image_size, image_size, 3)), jnp.float32)
  tokens = jnp.ones((batch, TEXT_LEN), jnp.int32)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images, tokens)['params']
  vision = jax.jit(lambda p, x: module.apply({'params': p}, x, method=module.encode_image))
  point = _stats(vision.lower(params, images).compile(), batch)
  point['images_per_sec'] = batch / _time(vision, (params, images), repeats)
  return point


def trained(runs, fusion, mitigation):
  """The last VQA evaluation of DIR/vlm_<fusion>_<mitigation>, or {}: a `zoo eval` of it
  (eval_metrics.jsonl) if there is one, else the last one of its training."""
  rows = []
  for name in ('metrics.jsonl', 'eval_metrics.jsonl'):
    path = os.path.join(runs or '', f'vlm_{fusion}_{mitigation}', name)
    if runs and os.path.isfile(path):
      with open(path) as f:
        rows += [json.loads(line) for line in f if 'vqa/accuracy' in line]
  if not rows:
    return {}
  return {k.split('/', 1)[1]: v for k, v in rows[-1].items() if k.startswith('vqa/')}


def _fmt(value, spec):
  return '—' if value is None else format(value, spec)


def table(report):
  """Both tables as markdown."""
  lines = ['| fusion | mitigation | visual tokens | GFLOPs/example | peak MiB | examples/s | '
           'ViT images/s | VQA accuracy | read-text | hallucination |', '|' + '---|' * 10]
  for r in report['rows']:
    acc = r.get('trained', {})
    lines.append(
        f"| {r['fusion']} | {r['mitigation']} | {r['visual_tokens']} | "
        f"{r['gflops_per_example']:.3f} | {r['peak_mib']:.0f} | {r['examples_per_sec']:.0f} | "
        f"{r['vit_images_per_sec']:.0f} | {_fmt(acc.get('accuracy'), '.3f')} | "
        f"{_fmt(acc.get('accuracy_read_text'), '.3f')} | "
        f"{_fmt(acc.get('hallucination_rate'), '.3f')} |")
  sides = report['sweep_sides']
  if not sides:
    return '\n'.join(lines)
  lines += ['', '| mitigation | ' + ' | '.join(f'{(s // 4) ** 2} tokens: GFLOPs, MiB, img/s'
                                              for s in sides) + ' |',
            '|' + '---|' * (len(sides) + 1)]
  for name, points in report['sweep'].items():
    lines.append(f'| {name} | ' + ' | '.join(
        f"{p['gflops_per_example']:.3f}, {p['peak_mib']:.1f}, {p['images_per_sec']:.0f}"
        for p in points) + ' |')
  return '\n'.join(lines)


def plot(report, path):
  """Log-log lines of GFLOPs and peak MiB against tokens, one colour per mitigation (PIL)."""
  from PIL import Image, ImageDraw
  colours = ['#000000', '#d62728', '#1f77b4', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b']
  tokens = [(s // 4) ** 2 for s in report['sweep_sides']]
  image = Image.new('RGB', (1000, 420), 'white')
  draw = ImageDraw.Draw(image)
  for panel, (key, title) in enumerate((('gflops_per_example', 'GFLOPs per image'),
                                        ('peak_mib', 'peak memory (MiB)'))):
    x0, y0, w, h = 60 + panel * 480, 30, 400, 320
    values = [p[key] for pts in report['sweep'].values() for p in pts]
    lo, hi = math.log10(max(min(values), 1e-6)), math.log10(max(values))
    draw.rectangle([x0, y0, x0 + w, y0 + h], outline='black')
    draw.text((x0, 8), f'{title} vs visual tokens (log-log)', fill='black')
    for t in tokens:
      x = x0 + w * math.log(t / tokens[0]) / math.log(tokens[-1] / tokens[0])
      draw.text((x - 10, y0 + h + 5), str(t), fill='black')
    draw.text((x0 - 55, y0), f'{10 ** hi:.3g}', fill='black')
    draw.text((x0 - 55, y0 + h - 10), f'{10 ** lo:.3g}', fill='black')
    for i, (name, pts) in enumerate(report['sweep'].items()):
      xy = [(x0 + w * math.log(t / tokens[0]) / math.log(tokens[-1] / tokens[0]),
             y0 + h - h * (math.log10(max(p[key], 1e-6)) - lo) / max(hi - lo, 1e-9))
            for t, p in zip(tokens, pts)]
      draw.line(xy, fill=colours[i % len(colours)], width=2)
      if panel == 0:
        draw.text((x0 + 10 + 95 * (i % 4), y0 + h + 25 + 14 * (i // 4)), name,
                  fill=colours[i % len(colours)])
  with files.atomic_path(path) as tmp:
    image.save(tmp, format='PNG')
  print(f'wrote {path}')


def run(runs=None, batch=64, repeats=5, sides=(32, 64, 128, 256), fusions=FUSIONS,
        mitigations=tuple(MITIGATIONS), log=print, vision_from=''):
  """The report: rows of table 1 and the sweep. `vision_from`: the models take their vision
  tower's fields from that dual-encoder / ViT run (as `vlm_shapes.py:vision_from=W` does)."""
  unknown = sorted(set(fusions) - set(FUSIONS)) + sorted(set(mitigations) - set(MITIGATIONS))
  if unknown:
    raise ValueError(f'unknown fusion or mitigation {unknown}; allowed: {list(FUSIONS)} and '
                     f'{list(MITIGATIONS)}')
  rows = []
  for fusion in fusions:
    for mitigation in mitigations:
      row = {'fusion': fusion, 'mitigation': mitigation, **cost_row(fusion, mitigation, batch,
                                                                    repeats, vision_from)}
      row['trained'] = trained(runs, fusion, mitigation)
      log(f"{fusion}/{mitigation}: {row['gflops_per_example']:.3f} GFLOPs/example, "
          f"{row['examples_per_sec']:.0f} examples/s")
      rows.append(row)
  sweep = {m: [sweep_point(m, s, vision_from=vision_from) for s in sides] for m in mitigations}
  return {'batch': batch, 'repeats': repeats, 'rows': rows, 'sweep_sides': list(sides),
          'sweep': sweep, 'devices': str(jax.devices()[0]), 'vision_from': vision_from}


def main(argv=None):
  """CLI: prints the tables, writes JSON and the sweep plot."""
  parser = argparse.ArgumentParser(prog='python -m zoo.bench.vlm',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--runs', default=None, help='a directory of vlm_<fusion>_<mitigation> runs')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--sweep', default='32,64,128,256',
                      help="image sides (patch 4); '' for none (no plot)")
  parser.add_argument('--fusions', default=','.join(FUSIONS))
  parser.add_argument('--mitigations', default=','.join(MITIGATIONS))
  parser.add_argument('--vision-from', default='',
                      help="the vision tower's fields from this CLIP / SigLIP / ViT run")
  parser.add_argument('--out', default='vlm_study.json')
  parser.add_argument('--plot', default='vlm_sweep.png')
  args = parser.parse_args(argv)
  report = run(args.runs, args.batch, args.repeats,
               tuple(int(s) for s in args.sweep.split(',') if s), tuple(args.fusions.split(',')),
               tuple(args.mitigations.split(',')), vision_from=args.vision_from)
  print(table(report))
  bench.write_report(report, args.out)
  if report['sweep_sides']:
    plot(report, args.plot)


if __name__ == '__main__':
  main()
