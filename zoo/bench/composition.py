"""Where a dual encoder's zero-shot accuracy on unseen shape x colour pairs goes.

Run: `python -m zoo.bench.composition --workdir W [--num 1000] [--out composition.json]`

For a CLIP / SigLIP run on the shapes scenes (one with a `zero_shot` evaluator over the
'shape_colour' label, e.g. experiments/clip_shapes.py), with its EMA params:

- linear probes (multinomial logistic regression) on the normalised image embeddings of the
  one-object scenes, fit on the first half of the validation split (seen pairs only) for
  shape and for colour, then scored on its second half (seen pairs) and on the held_out split
  (the unseen pairs). A tower that represents shape apart from colour probes as well on both;
  one whose shape features are tied to the colours they were seen with falls on held_out;
- zero-shot accuracy per held-out pair with the run's own prompt templates (all 64 classes
  compete, as in the evaluator), and the class most often chosen instead, with its share.

Prints two tables and writes the numbers as JSON.
"""

import argparse
import collections
import json

import jax
import numpy as np
from sklearn import linear_model

from zoo import embedding
from zoo import files
from zoo import runs
from zoo.evals import retrieval
from zoo.evals import zero_shot
from data.shapes import grammar

LABEL = 'shape_colour'


def _zero_shot_config(config):
  for name, cfg in config.evals.items():
    if cfg.type == 'zero_shot' and cfg.label_key == LABEL:
      return cfg
  raise ValueError(f"the run has no zero_shot evaluator over {LABEL!r} (its evals: "
                   f'{sorted(config.evals)}); train it with experiments/clip_shapes.py')


def study(workdir, num=1000, batch_size=250):
  """{'step', 'probe': {attribute: {'seen', 'held_out'}}, 'pairs': [...]} of the run."""
  config, setup, state = runs.load(workdir)
  zs = _zero_shot_config(config)
  params = state['ema_params']
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  task = setup.task
  encode = jax.jit(lambda p, b: {'image': task.predict['encode_image'](p, b['image']),
                                 'label': b['label']})
  data_cfg = retrieval.eval_data(config.data, zs.builder_config)

  def embed(split):
    reader = embedding.SplitReader(data_cfg, split)
    n = min(num, len(reader)) if num else len(reader)

    def load(indices_L):
      examples = reader.examples(indices_L)
      return {'image': np.stack([reader.image(ex) for ex in examples]),
              'label': np.array([ex[LABEL] for ex in examples], np.int32)}

    out = embedding.embed(encode, params, load, n, min(batch_size, n), mesh)
    img_NxE = np.asarray(out['image'], np.float64)
    return img_NxE / np.linalg.norm(img_NxE, axis=1, keepdims=True), np.asarray(out['label'])

  seen_NxE, seen_N = embed('validation')
  held_NxE, held_N = embed('held_out')
  half = len(seen_N) // 2
  colours = len(grammar.COLOUR_NAMES)
  probe = {}
  for attribute, of in (('shape', lambda y: y // colours), ('colour', lambda y: y % colours)):
    fit = linear_model.LogisticRegression(max_iter=2000, C=10.0).fit(
        seen_NxE[:half], of(seen_N[:half]))
    probe[attribute] = {
        'seen': float(np.mean(fit.predict(seen_NxE[half:]) == of(seen_N[half:]))),
        'held_out': float(np.mean(fit.predict(held_NxE) == of(held_N)))}

  fields, _, _ = zero_shot.shapes_classes(LABEL)
  texts = zero_shot.prompts(zs.templates, fields)
  prompts_KxTxE = embedding.encode_texts(task, params, texts, zs.batch_size, mesh)
  classes_KxE = zero_shot.class_embeddings(
      np.asarray(prompts_KxTxE).reshape(len(fields), len(zs.templates), -1))
  pred_N = (held_NxE @ classes_KxE.T).argmax(axis=1)
  pairs = []
  for label in sorted(set(held_N.tolist())):
    chosen = pred_N[held_N == label]
    wrong = collections.Counter(int(c) for c in chosen if c != label).most_common(1)
    instead, count = wrong[0] if wrong else (None, 0)
    pairs.append({'pair': fields[label]['name'], 'images': int(chosen.size),
                  'accuracy': float(np.mean(chosen == label)),
                  'instead': fields[instead]['name'] if instead is not None else '',
                  'instead_share': count / chosen.size})
  return {'workdir': workdir, 'step': int(state['step']), 'probe': probe, 'pairs': pairs,
          'accuracy_unseen': float(np.mean(pred_N == held_N))}


def markdown(result):
  lines = [f"Linear probes on the image embeddings ({result['workdir']}, step {result['step']})",
           '', '| attribute | probe, seen pairs | probe, held-out pairs |', '|---|---|---|']
  for attribute, acc in result['probe'].items():
    lines.append(f"| {attribute} | {acc['seen']:.3f} | {acc['held_out']:.3f} |")
  lines += ['', f"Zero-shot by held-out pair (all: {result['accuracy_unseen']:.3f})", '',
            '| pair | images | accuracy | chosen instead most | share |', '|---|---|---|---|---|']
  for p in result['pairs']:
    lines.append(f"| {p['pair']} | {p['images']} | {p['accuracy']:.3f} | {p['instead'] or '—'} | "
                 f"{p['instead_share']:.3f} |")
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a dual-encoder run on the shapes scenes')
  parser.add_argument('--num', type=int, default=1000,
                      help='images per split (validation, held_out); 0 = all')
  parser.add_argument('--out', default='', help='also write the numbers as JSON')
  args = parser.parse_args(argv)
  result = study(args.workdir, args.num)
  print(markdown(result))
  if args.out:
    with files.atomic_open(args.out) as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main()
