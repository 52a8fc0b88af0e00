"""Sample quality of one trained diffusion run against sampler, NFE and guidance scale.

Run: `python -m zoo.bench.quality --workdir W --classifier C [--num 256] [--out quality.json]`

For every (sampler, steps, guidance) setting the run generates `num` images conditioned like
`num` real examples of `split` (their class labels or first captions, see
`zoo.evals.generation`) and reports, side by side in one process:
- fd_zoo: Fréchet distance between the zoo classifier's features of the generated and of the
  real images (FD-zoo: the classifier is the zoo's own shapes classifier, not Inception, so
  the numbers are comparable only with other FD-zoo numbers of the same classifier run);
- accuracy: the shapes scorer's judgement from the pixels (class-conditional runs: colour and
  shape of the single object; text runs: every criterion of `data.shapes.score`);
- diversity: mean pairwise distance of the classifier features of samples that share a
  condition, divided by the same quantity for real images of those conditions (1 = as varied
  as the data; guidance trades it for accuracy);
- nfe: denoiser evaluations per image (x2 for the guided batch is not counted), and seconds.
Same `seed` for every setting: the settings see the same initial noise where shapes allow.
"""

import argparse
import json
import time

import numpy as np

from zoo import config as zoo_config
from zoo import runs
from zoo.diffusion import solvers
from zoo.evals import adherence
from zoo.evals import fd
from zoo.evals import generation
from zoo import files

DEFAULT_SETTINGS = ('ddpm:1000', 'ddim:50', 'ddim:20', 'ddim:10', 'dpmpp_2m:20', 'dpmpp_2m:10',
                    'heun:10')


def nfe(sampler, steps):
  """Denoiser calls per image (Heun's S steps cost 2S - 1)."""
  return 2 * steps - 1 if sampler == 'heun' else steps


def diversity(feats_NxF, groups_N):
  """Mean pairwise feature distance within groups of the same condition (groups of >= 2)."""
  dists = []
  for g in np.unique(groups_N):
    f = feats_NxF[groups_N == g]
    if len(f) >= 2:
      d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
      dists.append(d[np.triu_indices(len(f), 1)].mean())
  return float(np.mean(dists)) if dists else float('nan')


def _groups(real, kind):
  if kind == 'class':
    return real.labels_N
  return np.unique(np.asarray(real.prompts), return_inverse=True)[1]


def measure(workdir, classifier_workdir, settings, *, num=256, batch_size=128, split='validation',
            seed=0, use_ema=True):
  """One row per setting (dicts); settings are (sampler, steps, guidance_scale) triples."""
  config, s, state = runs.load(workdir)
  classifier = fd.load_classifier(classifier_workdir, '--classifier')
  kind = generation.conditioning(s.task)
  real = generation.real_set(config.data, split, num, seed, '--num')
  real_logits, real_feats = fd.classify(classifier, (real.images_NxHxWxC + 1) / 2, batch_size)
  real_stats = fd.gaussian_stats(real_feats)
  groups = _groups(real, kind)
  real_div = diversity(real_feats, groups)
  rows = []
  for sampler, steps, guidance in settings:
    cfg = zoo_config.ConfigDict(dict(
        split=split, num_samples=num, batch_size=batch_size, sampler=sampler, steps=steps,
        guidance_scale=guidance, use_ema=use_ema, seed=seed))
    start = time.perf_counter()
    images = generation.generate(s.task, generation.params_of(state, use_ema), cfg, real)
    seconds = time.perf_counter() - start
    logits, feats = fd.classify(classifier, images, batch_size)
    pixels = generation.to_uint8(images)
    judged = (adherence.judge_classes(pixels, real.labels_N) if kind == 'class'
              else adherence.judge_prompts(pixels, real.examples))
    rows.append(dict(
        sampler=sampler, steps=steps, nfe=nfe(sampler, steps), guidance=guidance,
        fd_zoo=fd.frechet_distance(*fd.gaussian_stats(feats), *real_stats),
        accuracy=judged.get('accuracy', judged.get('overall')),
        diversity=diversity(feats, groups) / real_div, seconds=seconds, num=num))
    print(_line(rows[-1]), flush=True)
  real_acc = None
  if kind == 'class':
    real_acc = adherence.judge_classes(generation.to_uint8((real.images_NxHxWxC + 1) / 2),
                                       real.labels_N)['accuracy']
  return {'workdir': workdir, 'step': int(np.asarray(state['step'])), 'use_ema': use_ema,
          'classifier': classifier_workdir, 'split': split, 'num': num,
          'real_scorer_accuracy': real_acc,
          'real_classifier_accuracy': float(np.mean(real_logits.argmax(-1) == real.labels_N))
          if real.labels_N is not None else None, 'rows': rows}


HEADER = '| sampler | steps | NFE | guidance | FD-zoo | scorer accuracy | diversity | seconds |'


def _line(r):
  return (f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['guidance']:g} | "
          f"{r['fd_zoo']:.2f} | {r['accuracy']:.3f} | {r['diversity']:.2f} | {r['seconds']:.0f} |")


def parse_setting(text, guidance):
  """'sampler:steps[:guidance]' -> (sampler, steps, guidance)."""
  parts = text.split(':')
  if len(parts) not in (2, 3) or parts[0] not in (*solvers.SOLVERS, 'ddpm', 'ddim'):
    raise ValueError(f'setting {text!r} must be sampler:steps[:guidance] with a sampler of '
                     f"{['ddpm', 'ddim', *solvers.SOLVERS]}")
  return parts[0], int(parts[1]), float(parts[2]) if len(parts) == 3 else guidance


def main(argv=None):
  """CLI: prints a markdown table and writes JSON."""
  parser = argparse.ArgumentParser(prog='python -m zoo.bench.quality',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--classifier', required=True, help='a shapes_classifier workdir')
  parser.add_argument('--settings', nargs='+', default=list(DEFAULT_SETTINGS))
  parser.add_argument('--guidance', type=float, default=4.0, help='for settings without one')
  parser.add_argument('--sweep', type=float, nargs='*', default=[1.0, 2.0, 4.0, 7.0],
                      help='guidance scales, each with --sweep-setting')
  parser.add_argument('--sweep-setting', default='dpmpp_2m:20')
  parser.add_argument('--num', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--split', default='validation')
  parser.add_argument('--out', default='quality.json')
  parser.add_argument('--raw', action='store_true', help='the raw params instead of the EMA')
  args = parser.parse_args(argv)
  settings = [parse_setting(t, args.guidance) for t in args.settings]
  base = parse_setting(args.sweep_setting, args.guidance)
  settings += [(base[0], base[1], g) for g in args.sweep if (base[0], base[1], g) not in settings]
  print(HEADER + '\n|' + '---|' * 8, flush=True)
  report = measure(args.workdir, args.classifier, settings, num=args.num,
                   batch_size=args.batch_size, split=args.split, use_ema=not args.raw)
  with files.atomic_open(args.out) as f:
    json.dump(report, f, indent=2)
  print(f"real images: scorer accuracy {report['real_scorer_accuracy']}, classifier accuracy "
        f"{report['real_classifier_accuracy']}; wrote {args.out}")


if __name__ == '__main__':
  main()
