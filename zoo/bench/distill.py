"""Sample quality against NFE: distilled students beside DDIM and DPM-Solver++ on their teacher.

Run:
  python -m zoo.bench.distill --teacher W --classifier C --progressive W8 W4 W2 W1 \
      --consistency WC [--nfe 1 2 4 8] [--num 256] [--out distill.json]

Rows (all in one process, same real set, same seed; see `zoo.bench.quality` for the metrics):
- the teacher with DDIM and DPM-Solver++(2M) at every NFE of `--nfe`, and DPM-Solver++ at 20
  NFE (the reference the "within 15%" target is measured against), at `--guidance`;
- each progressive-distillation student at its own step count (guidance distilled in);
- the consistency student at every NFE of `--nfe`.
`fd_ratio` is a row's FD-zoo over the teacher's 20-NFE DPM-Solver++ FD-zoo (1.15 = 15% worse).
"""

import argparse

from zoo import bench
from zoo import runs
from zoo.bench import quality

HEADER = '| model | sampler | NFE | FD-zoo | FD / teacher@20 | scorer accuracy | diversity | s |'


def settings(teacher_nfes, guidance):
  """The teacher's (sampler, steps, guidance) rows: DDIM and DPM-Solver++ at each NFE, and 20."""
  rows = [(sampler, n, guidance) for n in teacher_nfes for sampler in ('ddim', 'dpmpp_2m')]
  return rows + [('dpmpp_2m', 20, guidance)] if 20 not in teacher_nfes else rows


def measure(teacher, classifier, *, progressive=(), consistency=None, nfes=(1, 2, 4, 8),
            guidance=4.0, num=256, batch_size=128, split='validation'):
  """{'rows': [...]}: one row per (model, sampler, NFE), each with `fd_ratio`."""
  kw = dict(num=num, batch_size=batch_size, split=split)
  rows = [dict(r, model='teacher') for r in quality.measure(
      teacher, classifier, settings(nfes, guidance), **kw)['rows']]
  for workdir in progressive:
    steps = runs.load(workdir)[0].task.student_steps
    rows += [dict(r, model=f'progressive ({workdir})') for r in quality.measure(
        workdir, classifier, [('ddim', steps, 1.0)], **kw)['rows']]
  if consistency:
    rows += [dict(r, model=f'consistency ({consistency})') for r in quality.measure(
        consistency, classifier, [('consistency', n, 1.0) for n in nfes], **kw)['rows']]
  reference = next(r['fd_zoo'] for r in rows if r['model'] == 'teacher' and
                   r['sampler'] == 'dpmpp_2m' and r['steps'] == 20)
  for r in rows:
    r['fd_ratio'] = r['fd_zoo'] / reference
  return {'teacher': teacher, 'classifier': classifier, 'num': num, 'split': split,
          'guidance': guidance, 'rows': rows}


def table(report):
  """The report as a markdown table."""
  lines = [HEADER, '|' + '---|' * 8]
  for r in report['rows']:
    lines.append(f"| {r['model']} | {r['sampler']} | {r['nfe']} | {r['fd_zoo']:.2f} | "
                 f"{r['fd_ratio']:.2f} | {r['accuracy']:.3f} | {r['diversity']:.2f} | "
                 f"{r['seconds']:.0f} |")
  return '\n'.join(lines)


def main(argv=None):
  """CLI: prints a markdown table and writes JSON."""
  parser = argparse.ArgumentParser(prog='python -m zoo.bench.distill',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--teacher', required=True, help='the diffusion run the students distil')
  parser.add_argument('--classifier', required=True, help='a shapes_classifier workdir')
  parser.add_argument('--progressive', nargs='*', default=[], help='progressive student runs')
  parser.add_argument('--consistency', default=None, help='a consistency student run')
  parser.add_argument('--nfe', type=int, nargs='+', default=[1, 2, 4, 8])
  parser.add_argument('--guidance', type=float, default=4.0, help="the teacher's guidance")
  parser.add_argument('--num', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--split', default='validation')
  parser.add_argument('--out', default='distill.json')
  args = parser.parse_args(argv)
  report = measure(args.teacher, args.classifier, progressive=args.progressive,
                   consistency=args.consistency, nfes=args.nfe, guidance=args.guidance,
                   num=args.num, batch_size=args.batch_size, split=args.split)
  print(table(report))
  bench.write_report(report, args.out)


if __name__ == '__main__':
  main()
