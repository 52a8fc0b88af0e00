"""Tables of the speed benchmark (`perf.py`) as Markdown, and BENCHMARKS.md."""

import json
import os
import statistics

from zoo import files

GOAL_SPEEDUP = 1.3  # zoo / best peer, training examples/s at bench size (issue 10).
GOAL_MFU = 0.5  # Transformer families at bench size.
GOAL_SAMPLER_OVERHEAD = 0.05


def _f(value, spec, missing='—'):
  return missing if value is None else format(value, spec)


def _times(ratio):
  """'1.23×', or '—' without a ratio."""
  return _f(ratio, '.2f') + ('×' if ratio is not None else '')


def _get(row, side, key):
  return row.get(side, {}).get(key)


def row_line(row):
  """One log line per measured case."""
  z = row['zoo']
  peers = ', '.join(f"{p} {_f(_get(row, p, 'examples_per_s'), '.2f')}/s"
                    for p in ('torch', 'flax') if p in row)
  return (f"{row['family']}/{row['size']}: zoo {_f(z.get('examples_per_s'), '.2f')}/s "
          f"(MFU {_f(z.get('mfu'), '.1%')}, compile {z['compile_s']:.1f}s)"
          + (f'; {peers}' if peers else ''))


def train_table(rows):
  head = ('| family | size | batch | params | GFLOP/step | zoo ex/s | torch ex/s | flax ex/s | '
          'zoo / best peer | zoo MFU | torch MFU | flax MFU | zoo compile s | flax compile s | '
          'peak GiB (XLA) |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    z = r['zoo']
    lines.append(
        f"| {r['family']} | {r['size']} | {r['batch']} | {z['params'] / 1e6:.1f}M | "
        f"{z['flops'] / 1e9:.1f} | {_f(z.get('examples_per_s'), '.2f')} | "
        f"{_f(_get(r, 'torch', 'examples_per_s'), '.2f')} | "
        f"{_f(_get(r, 'flax', 'examples_per_s'), '.2f')} | "
        f"{_times(r.get('zoo_over_best_peer'))} | {_f(z.get('mfu'), '.1%')} | "
        f"{_f(_get(r, 'torch', 'mfu'), '.1%')} | {_f(_get(r, 'flax', 'mfu'), '.1%')} | "
        f"{z['compile_s']:.1f} | {_f(_get(r, 'flax', 'compile_s'), '.1f')} | "
        f"{z['peak_bytes'] / 2 ** 30:.2f} |")
  return '\n'.join(lines)


def latency_table(rows):
  lines = ['| family | size | zoo forward ms | torch forward ms | flax forward ms | '
           'zoo speed / torch (torch ms / zoo ms) |', '|---|---|---|---|---|---|']
  for r in rows:
    ms = {p: _get(r, p, 'forward_s') for p in ('zoo', 'torch', 'flax')}
    ratio = ms['torch'] / ms['zoo'] if ms['torch'] and ms['zoo'] else None
    lines.append(f"| {r['family']} | {r['size']} | "
                 + ' | '.join(_f(ms[p] and ms[p] * 1e3, '.2f') for p in ms)
                 + f' | {_times(ratio)} |')
  return '\n'.join(lines)


def errors(rows):
  """One line per peer that failed: the last line of its error (the exception's message)."""
  return [f"- {r['family']}/{r['size']} {p}: {r[p]['error'].strip().splitlines()[-1].strip()}"
          for r in rows for p in ('torch', 'flax') if 'error' in r.get(p, {})]


def sweep_tables(sweeps):
  out = []
  for sweep, axis in (('resolution', 'side'), ('tokens', 'tokens')):
    lines = [f'| model | {axis} | GFLOP/step | peak MiB (XLA) | train step s | estimated s |',
             '|---|---|---|---|---|---|']
    for name, rows in sweeps[sweep].items():
      for p in rows:
        lines.append(f"| {name} | {p[axis]} | {p['flops'] / 1e9:.2f} | "
                     f"{p['peak_bytes'] / 2 ** 20:.0f} | {_f(p.get('train_s'), '.3f')} | "
                     f"{_f(p.get('estimated_s'), '.2f')} |")
    out.append('\n'.join(lines))
  return out


def sampler_table(sampler):
  lines = ['| NFE | jitted loop s | bare calls s | loop overhead (paired median) | quartiles | '
           'images/s |', '|---|---|---|---|---|---|']
  for r in sampler['rows']:
    quartiles = (f"{r['overhead_q1']:+.1%} .. {r['overhead_q3']:+.1%}" if 'overhead_q1' in r
                 else '—')  # Reports from before the paired timing.
    lines.append(f"| {r['nfe']} | {r['loop_s']:.4f} | {r['bare_s']:.4f} | "
                 f"{r['overhead']:+.1%} | {quartiles} | {r['images_per_s']:.1f} |")
  return '\n'.join(lines)


def goals(report):
  """Lines saying where the issue's targets are met and where not."""
  bench_rows = [r for r in report['rows'] if r['size'] == 'bench']
  out = []
  for r in bench_rows:
    ratio = r.get('zoo_over_best_peer')
    if ratio is not None:
      out.append(f"- {r['family']}: zoo / best peer {ratio:.2f}× "
                 f"({'meets' if ratio >= GOAL_SPEEDUP else 'below'} the {GOAL_SPEEDUP}× goal)")
    mfu = r['zoo'].get('mfu')
    if r['family'] in ('dit', 'vit', 'text', 'clip', 'siglip', 'vlm') and mfu is not None:
      out.append(f"- {r['family']}: MFU {mfu:.1%} "
                 f"({'meets' if mfu >= GOAL_MFU else 'below'} the {GOAL_MFU:.0%} goal)")
  if 'sampler' in report:
    # One number for the goal: the median of the rows' (paired) overheads at NFE > 1.
    pooled = statistics.median(r['overhead'] for r in report['sampler']['rows'] if r['nfe'] > 1)
    out.append(f"- sampler loop overhead, median over NFE > 1: {pooled:+.1%} "
               f"({'meets' if pooled < GOAL_SAMPLER_OVERHEAD else 'above'} the "
               f"{GOAL_SAMPLER_OVERHEAD:.0%} goal)")
  return out


def tables(report):
  peak = report['peak']
  parts = [f"peak (2048² float32 matmul): XLA {peak['xla_matmul_flops_per_s'] / 1e9:.1f} "
           f"GFLOP/s" + (f", PyTorch {peak['torch_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s"
                          if 'torch_matmul_flops_per_s' in peak else ''),
           '### Training step (same loss and AdamW on every side)', train_table(report['rows']),
           '### Forward latency (batch 1, no gradient)', latency_table(report['rows'])]
  errs = errors(report['rows'])
  if errs:
    parts += ['### Peers that could not run', '\n'.join(errs)]
  if 'sweeps' in report:
    res, tok = sweep_tables(report['sweeps'])
    parts += ['### Cost against resolution (batch 1; the input side of each model)', res,
              '### Cost against tokens (batch 1)', tok]
  if 'sampler' in report:
    parts += ['### Sampler: jitted DDIM loop against bare model calls', sampler_table(
        report['sampler'])]
  parts += ['### Goals', '\n'.join(goals(report))]
  return '\n\n'.join(parts)


# How far a --update run's measured peak may stray from the report's before the two runs count
# as different machines (repeat measurements here scatter by up to ~1.3x, mostly PyTorch's).
PEAK_TOLERANCE = 1.5


def check_same_machine(old_peak, new_peak):
  """Raises unless `new_peak` (FLOP/s) could be a re-measurement of `old_peak`'s machine."""
  ratio = new_peak / old_peak
  if not 1 / PEAK_TOLERANCE <= ratio <= PEAK_TOLERANCE:
    raise ValueError(
        f'this machine\'s peak ({new_peak / 1e9:.1f} GFLOP/s) is {ratio:.2f}x the report\'s '
        f'({old_peak / 1e9:.1f}); allowed {1 / PEAK_TOLERANCE:.2f}-{PEAK_TOLERANCE:.2f}x. '
        'An update would mix two machines in one table: run the whole report here instead '
        '(without --update)')


def merge(old, new):
  """`old` with what `new` measured put in its place: rows by (family, size), sweep families,
  the sampler; `new`'s command, peak and duration appended to old['updates']. The new rows'
  MFU is charged against old's peak: one peak for the whole table (a matmul measured once
  scatters by more than the rows it would rescale); `check_same_machine` refuses peaks
  that differ by more than that."""
  check_same_machine(old['peak']['peak_flops_per_s'], new['peak']['peak_flops_per_s'])
  merged = dict(old)
  replaced = {(r['family'], r['size']): _rescaled(r, old['peak']['peak_flops_per_s'])
              for r in new['rows']}
  merged['rows'] = [replaced.pop((r['family'], r['size']), r) for r in old['rows']]
  merged['rows'] += list(replaced.values())
  what = [f"{r['family']}/{r['size']}" for r in new['rows']]
  if 'sweeps' in new:
    merged['sweeps'] = {kind: {**old.get('sweeps', {}).get(kind, {}), **rows}
                        for kind, rows in new['sweeps'].items()}
    what.append('sweeps')
  if 'sampler' in new:
    merged['sampler'] = new['sampler']
    what.append('sampler')
  merged['updates'] = [*old.get('updates', []), {
      'command': new.get('command', 'zoo bench'), 'seconds': new['seconds'],
      'peak': new['peak'], 'measured': what}]
  return merged


def _rescaled(row, peak_flops):
  row = json.loads(json.dumps(row))
  for side in ('zoo', 'torch', 'flax'):
    if 'flops_per_s' in row.get(side, {}):
      row[side]['mfu'] = row[side]['flops_per_s'] / peak_flops
  return row


def write_markdown(report, path, plot=None, preface=''):
  """BENCHMARKS.md: machine line, versions, the command and the tables."""
  m = report['machine']
  versions = ', '.join(f'{k} {v}' for k, v in m['versions'].items() if v)
  flax = m.get('flax_peer_versions')
  lines = ['# Benchmarks', '',
           'Written by `zoo bench` (zoo/bench/perf.py); rerun the command below to reproduce. '
           'Medians of '
           f"{report['repeats']} timed repeats after {report['warmup']} warm-up calls; "
           'peers run in the same run with the same batch, resolution, dtype (float32) and '
           'thread count. Absolute numbers are this machine\'s; compare ratios.', '',
           f"**Machine**: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
           f"{m['backend']} ({m['device']}), Python {m['python']}.", '',
           f'**Versions**: {versions}.'
           + (f" Flax peers: {', '.join(f'{k} {v}' for k, v in flax.items())}." if flax else ''),
           '', f"**Command**: `{report.get('command', 'zoo bench')}` "
           f"({report['seconds'] / 60:.0f} min).", '']
  for u in report.get('updates', []):
    lines += [f"**Then measured anew** ({', '.join(u['measured'])}; MFU still against the peak "
              f"above): `{u['command']}` ({u['seconds'] / 60:.0f} min).", '']
  if preface:
    lines += [preface, '']
  if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(path)), 'PROFILE.md')):
    lines += ['Where zoo\'s step time goes, and the same convolutions on an older jaxlib: '
              '[PROFILE.md](PROFILE.md) (`python -m zoo.bench.profile`).', '']
  lines.append(tables(report))
  if plot:
    rel = os.path.relpath(plot, os.path.dirname(os.path.abspath(path)))
    lines += ['', f'![cost against resolution and tokens]({rel})']
  files.write_text(path, '\n'.join(lines) + '\n')
  print(f'wrote {path}')
