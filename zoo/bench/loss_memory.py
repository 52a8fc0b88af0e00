"""Compile-only memory of the contrastive losses against the global batch (nothing is run).

Run: `python -m zoo.bench.loss_memory [--devices 2 4 8] [--local 128] [--out loss_memory.json]`

The value and gradient of each loss (w.r.t. both embeddings, the scale and the bias) are
compiled over data rings of 2, 4, 8 ... devices (fake CPU devices unless the backend has that
many) at a fixed local batch b and embedding width, so the global batch B = b x devices grows
with the ring; the number is XLA's per-device `temp_size_in_bytes` (the intermediates: logits,
their gradients, gathered features). CLIP's softmax and the dense sigmoid gather every text to
every device, so their temporaries grow with B (b x B logits per device); the chunked sigmoid
passes text blocks around the ring and holds b x b at a time, so it stays flat.
"""

import argparse
import functools
import json
import os
import sys

from zoo import files


def _setup_devices(n):
  # Must run before JAX is imported: fake CPU devices are fixed at backend start.
  if 'jax' not in sys.modules:
    flags = os.environ.get('XLA_FLAGS', '')
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={n}'.strip()


def measure(device_counts, local_batch, width):
  """[{loss, global_batch, local_batch, temp_bytes}] for softmax, sigmoid and sigmoid_chunked."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from zoo import sharding
  from zoo.tasks import contrastive

  if jax.device_count() < max(device_counts):
    raise ValueError(f'--devices={max(device_counts)} but the backend has {jax.device_count()}')
  rows = []
  for devices in device_counts:
    mesh = sharding.make_mesh(dict(data=devices, fsdp=1, tensor=1))
    global_batch = devices * local_batch
    losses = {
        'softmax': lambda i, t, s, b: contrastive.softmax_loss(i, t, s),
        'sigmoid': contrastive.sigmoid_loss,
        'sigmoid_chunked': functools.partial(contrastive.sigmoid_loss_chunked, mesh=mesh),
    }
    emb = jax.ShapeDtypeStruct((global_batch, width), jnp.float32,
                               sharding=NamedSharding(mesh, P(contrastive.data_axes(mesh))))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    for name, fn in losses.items():
      grad_fn = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))
      compiled = jax.jit(grad_fn).lower(emb, emb, scalar, scalar).compile()
      rows.append({'loss': name, 'devices': devices, 'global_batch': global_batch,
                   'local_batch': local_batch,
                   'temp_bytes': int(compiled.memory_analysis().temp_size_in_bytes)})
  return rows


def table(rows):
  """Markdown: one row per global batch, per-device temporary KiB per loss."""
  names = list(dict.fromkeys(r['loss'] for r in rows))
  lines = ['| devices | global batch | local batch | ' + ' | '.join(f'{n} (KiB)' for n in names) + ' |',
           '|---|---|---|' + '---|' * len(names)]
  for b in dict.fromkeys(r['global_batch'] for r in rows):
    by = {r['loss']: r for r in rows if r['global_batch'] == b}
    lines.append(f"| {by[names[0]]['devices']} | {b} | {by[names[0]]['local_batch']} | " +
                 ' | '.join(
        f"{by[n]['temp_bytes'] / 1024:,.0f}" for n in names) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', type=int, nargs='+', default=[2, 4, 8])
  parser.add_argument('--local', type=int, default=256, help='the per-device batch b')
  parser.add_argument('--width', type=int, default=256)
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  _setup_devices(max(args.devices))
  rows = measure(args.devices, args.local, args.width)
  print(f'per-device XLA temporaries of value_and_grad, local batch {args.local}, width '
        f'{args.width}\n' + table(rows))
  if args.out:
    with files.atomic_open(args.out) as f:
      json.dump({'local_batch': args.local, 'width': args.width, 'rows': rows}, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
