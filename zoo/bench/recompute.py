"""Attention probabilities recomputed in the backward pass against stored, one process.

  python -m zoo.bench.recompute [--families dit,vit,...] [--repeats 5] [--out recompute.json]

In a train step's gradient `zoo.nn.layers.attention_heads` (and the token-reducing ViT's
attention) recompute softmax(q k^T) from q, k, v in the backward pass instead of storing the
BxAxNxM probabilities (`stack.recompute_attention`). For each family's bench case
(zoo/bench/cases.py) the zoo train step (loss, gradient, AdamW) is compiled twice, as it runs
and traced under `stack.stored_attention()`; XLA's temp bytes of each, then the two steps timed
alternately (`--repeats` each, after one warm-up), medians. Prints a table and writes JSON.
"""

import contextlib

from zoo.bench import stack as stack_bench
from zoo.nn import stack

# The bench families with attention (the VAE's is one mid-block layer).
FAMILIES = ('dit', 'vit', 'text', 'clip', 'siglip', 'vlm', 'unet', 'unet_t2i', 'vae')
GIB = 2 ** 30


def compare(case, repeats=5):
  """Step seconds and XLA temp GiB of the train step with probabilities stored / recomputed."""
  (stored, _, stored_temp), (recomputed, _, recomputed_temp) = (
      stack_bench.compiled_step(case, setting)
      for setting in (stack.stored_attention, contextlib.nullcontext))
  times = stack_bench.alternate({'stored': stored, 'recomputed': recomputed}, repeats)
  return {'family': case.family, 'batch': case.batch,
          'stored_step_s': times['stored'], 'recomputed_step_s': times['recomputed'],
          'speedup': times['stored'] / times['recomputed'],
          'stored_temp_gib': stored_temp / GIB, 'recomputed_temp_gib': recomputed_temp / GIB}


def table(rows):
  lines = ['| family (bench size, batch) | stored step s | recomputed step s | speedup | '
           'stored temp GiB | recomputed temp GiB |', '|---|---|---|---|---|---|']
  lines += [f"| {r['family']} ({r['batch']}) | {r['stored_step_s']:.2f} | "
            f"{r['recomputed_step_s']:.2f} | {r['speedup']:.2f}× | "
            f"{r['stored_temp_gib']:.2f} | {r['recomputed_temp_gib']:.2f} |" for r in rows]
  return '\n'.join(lines)


def main(argv=None):
  return stack_bench.ab_main(argv, 'python -m zoo.bench.recompute', __doc__, FAMILIES, compare,
                             table)


if __name__ == '__main__':
  main()
