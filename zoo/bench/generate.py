"""Images per second of `zoo generate`, pipelined (device and host overlap) against synchronous.

Run: `python -m zoo.bench.generate --workdir W [--num 256] [--per-device-batch 16] [--repeats 3]
      [--steps S --sampler NAME] [--host-threads T] [--out generate_bench.json]`

Both modes do the same work in the same process: sample, gather, PNG-encode, checksum, write
and fsync every image and its manifest line. A warm-up job compiles first, so no timed run
compiles; repeats alternate the two modes (this machine is noisy) and the table reports each
mode's median images/s and their ratio, beside what overlap could give at best: run
synchronously, the device (sampling) and the host (writing) take turns, so hiding the shorter
behind the longer gives at most (device + host) / max(device, host).
"""

import argparse
import os
import shutil
import statistics
import tempfile

from zoo import bench
from zoo.pipelines import generate

HEADER = '| mode | images | images/s (median) | runs |'


def measure(workdir, *, num=256, per_device_batch=16, repeats=3, steps=None, sampler=None,
            queue_size=2, host_threads=None):
  """{'pipelined': [...], 'sync': [...], 'ratio': median ratio} of images/s over `repeats`."""
  kw = dict(num=num, per_device_batch=per_device_batch, steps=steps, sampler=sampler,
            queue_size=queue_size, host_threads=host_threads, write_tfds=False)
  results, split = {'pipelined': [], 'sync': []}, []
  with tempfile.TemporaryDirectory(prefix='zoo_bench_generate_') as tmp:
    generate.generate(workdir, os.path.join(tmp, 'warmup'), **{**kw, 'num': per_device_batch})
    for r in range(repeats):
      for mode in ('sync', 'pipelined') if r % 2 else ('pipelined', 'sync'):
        out = os.path.join(tmp, f'{mode}{r}')
        summary = generate.generate(workdir, out, pipelined=mode == 'pipelined', **kw)
        results[mode].append(summary['images_per_sec'])
        if mode == 'sync':
          split.append((summary['device_seconds'], summary['host_write_seconds']))
        shutil.rmtree(out)
  medians = {mode: statistics.median(v) for mode, v in results.items()}
  # Run synchronously, the device and the host take turns: overlapping them at best hides the
  # shorter of the two.
  device_s, host_s = (statistics.median(t) for t in zip(*split))
  return {'workdir': workdir, 'num': num, 'per_device_batch': per_device_batch,
          'devices': summary['devices'], 'steps': steps, 'sampler': sampler,
          'host_threads': host_threads, 'images_per_sec': results, 'median': medians,
          'ratio': medians['pipelined'] / medians['sync'],
          'sync_device_seconds': device_s, 'sync_host_seconds': host_s,
          'ceiling': (device_s + host_s) / max(device_s, host_s)}


def main(argv=None):
  """CLI: prints a markdown table and writes JSON."""
  parser = argparse.ArgumentParser(prog='python -m zoo.bench.generate',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--num', type=int, default=256)
  parser.add_argument('--per-device-batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--sampler', default=None)
  parser.add_argument('--queue-size', type=int, default=2)
  parser.add_argument('--host-threads', type=int, default=None)
  parser.add_argument('--out', default='generate_bench.json')
  args = parser.parse_args(argv)
  report = measure(args.workdir, num=args.num, per_device_batch=args.per_device_batch,
                   repeats=args.repeats, steps=args.steps, sampler=args.sampler,
                   queue_size=args.queue_size, host_threads=args.host_threads)
  print(HEADER + '\n|---|---|---|---|')
  for mode in ('sync', 'pipelined'):
    runs = ', '.join(f'{v:.1f}' for v in report['images_per_sec'][mode])
    print(f"| {mode} | {args.num} | {report['median'][mode]:.1f} | {runs} |")
  print(f"pipelined / sync: {report['ratio']:.2f}x on {report['devices']} device(s); run "
        f"synchronously the device took {report['sync_device_seconds']:.2f} s and the host "
        f"{report['sync_host_seconds']:.2f} s, so overlap can give at most "
        f"{report['ceiling']:.2f}x")
  bench.write_report(report, args.out)


if __name__ == '__main__':
  main()
