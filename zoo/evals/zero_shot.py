"""Zero-shot classification with a dual encoder: class names in prompt templates, no training.

Legend: N images, K classes, T templates, E embedding width.

CLIP's recipe: each class name is written into every template ('a picture of a {colour}
{shape}.'), the T prompts are embedded and L2-normalised, and the class embedding is the
L2-normalised mean of the T. An image is assigned the class of highest cosine similarity.

Classes: `classes` (names, for any dataset with an integer label `label_key`), or, when empty,
the names of the label's ClassLabel feature. On the shapes dataset the 64-way 'shape_colour'
label (index = shape * 8 + colour, `data.shapes.grammar.SHAPE_COLOURS`) lets templates use
`{shape}` and `{colour}` besides `{}` / `{name}`, adds 'shape_accuracy' / 'colour_accuracy'
(the top-1 class has the right shape / colour) and splits top-1 accuracy by whether the true
class is one of `grammar.HELD_OUT_PAIRS` ('accuracy_unseen', never shown in train, validation
or test; the held_out split) or not ('accuracy_seen'). Every class competes in every case.

Templates should speak the language of the training captions: on shapes
(data/shapes/captions.py) 'one shape: a {colour} {shape}.', 'a picture of a {colour}
{shape}.' or 'there is only one shape: a {colour} {shape}.'. A prompt with words the
tokenizer does not know (its [UNK] id) is logged when the evaluator is built.

Each process embeds the images of its rows of each global batch; embeddings and labels are
gathered (`zoo.embedding.embed`), so every process computes the single-process metrics.
"""

import logging
import string

import jax
import numpy as np

from data import pipeline
from data.shapes import grammar
from zoo import embedding
from zoo.evals import retrieval

log = logging.getLogger('zoo')
SHAPES_LABELS = ('shape_colour', 'label')  # Shapes labels whose classes have named fields.


def prompts(templates, class_fields):
  """The K T prompts, class-major: template t of class k is prompt k T + t."""
  return [t.format(fields['name'], **fields) for fields in class_fields for t in templates]


def class_embeddings(prompts_KxTxE):
  """The normalised mean of each class's normalised prompt embeddings (KxE)."""
  x = np.asarray(prompts_KxTxE, np.float64)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  mean_KxE = x.mean(axis=1)
  return (mean_KxE / np.linalg.norm(mean_KxE, axis=-1, keepdims=True)).astype(np.float32)


def label_ranks(logits_NxK, labels_N):
  """How many classes score strictly higher than each image's true class (0 = top-1 hit)."""
  logits = np.asarray(logits_NxK)
  true_N = logits[np.arange(len(logits)), labels_N]
  return (logits > true_N[:, None]).sum(axis=1)


def accuracies(img_NxE, classes_KxE, labels_N, *, unseen_K=None, attributes=None):
  """Top-1 / top-5 accuracy, top-1 by seen / unseen class and per-attribute accuracy.

  `unseen_K` (bool) marks classes never trained on; `attributes` maps a name to the K values
  of an attribute of each class (e.g. its shape).
  """
  labels_N = np.asarray(labels_N)
  logits_NxK = np.asarray(img_NxE, np.float32) @ np.asarray(classes_KxE, np.float32).T
  rank_N = label_ranks(logits_NxK, labels_N)
  out = {'accuracy': float(np.mean(rank_N == 0))}
  if logits_NxK.shape[1] > 5:
    out['top5_accuracy'] = float(np.mean(rank_N < 5))
  if unseen_K is not None:
    unseen_N = np.asarray(unseen_K)[labels_N]
    for name, group in (('seen', ~unseen_N), ('unseen', unseen_N)):
      if group.any():
        out[f'accuracy_{name}'] = float(np.mean(rank_N[group] == 0))
  pred_N = logits_NxK.argmax(axis=1)
  for name, values_K in (attributes or {}).items():
    values_K = np.asarray(values_K)
    out[f'{name}_accuracy'] = float(np.mean(values_K[pred_N] == values_K[labels_N]))
  return out


def template_fields(template):
  """The replacement fields of a template ('' for a positional `{}`)."""
  return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def named_fields(data_cfg, label_key, classes):
  """Template fields besides `{}` / `{name}` that the classes of this config provide."""
  if classes or data_cfg.name != 'shapes' or label_key not in SHAPES_LABELS:
    return ()
  return ('shape', 'colour') if label_key == 'shape_colour' else ('shape',)


def shapes_classes(label_key):
  """(fields per class, unseen_K, attributes) of a shapes label (see the module doc)."""
  if label_key == 'label':
    return [{'name': s, 'shape': s} for s in grammar.SHAPES], None, None
  pairs = [(s, c) for s in grammar.SHAPES for c in grammar.COLOUR_NAMES]  # Label order.
  fields = [{'name': f'{c} {s}', 'shape': s, 'colour': c} for s, c in pairs]
  unseen_K = np.array([p in grammar.HELD_OUT_PAIRS for p in pairs])
  attributes = {'shape': np.array([s for s, _ in pairs]),
                'colour': np.array([c for _, c in pairs])}
  return fields, unseen_K, attributes


class ZeroShot:
  """Zero-shot top-1 / top-5 accuracy over the first `num_examples` of `split` (0: all)."""

  SCHEMA = {'type': str, 'split': str, 'builder_config': str, 'num_examples': int,
            'batch_size': int, 'use_ema': bool, 'label_key': str, 'classes': tuple,
            'templates': tuple}

  @staticmethod
  def check(cfg, config, where):
    retrieval.check_dual_encoder(config, where, 'zero_shot')
    if not cfg.split or not cfg.label_key:
      raise ValueError(f'{where}: split and label_key must be set (e.g. validation and '
                       "'shape_colour')")
    if cfg.num_examples < 0 or cfg.batch_size < 1:
      raise ValueError(f'{where}: num_examples must be >= 0 (0 = the whole split) and '
                       'batch_size >= 1')
    if not all(isinstance(c, str) and c for c in cfg.classes):
      raise ValueError(f'{where}.classes must be class names (strings), or () for the names of '
                       f'the dataset\'s {cfg.label_key!r} feature')
    allowed = ('', 'name', *named_fields(config.data, cfg.label_key, cfg.classes))
    if not cfg.templates:
      raise ValueError(f"{where}.templates must hold at least one template, e.g. 'a {{}}.'")
    for t in cfg.templates:
      fields = template_fields(t) if isinstance(t, str) else {None}
      if not fields or not fields <= set(allowed):
        raise ValueError(f'{where}.templates: {t!r} may use the fields '
                         f'{["{" + f + "}" for f in allowed]} ({{}} and {{name}} are the class '
                         'name), and at least one of them')

  def __init__(self, cfg, *, task, config, workdir):
    self.cfg, self.task = cfg, task
    self.data_cfg = retrieval.eval_data(config.data, cfg.builder_config)
    self._encode = jax.jit(lambda p, b: {'image': task.predict['encode_image'](p, b['image']),
                                         'label': b['label']})
    self.class_fields, self.unseen_K, self.attributes = self._classes()
    unk = getattr(task.tokenizer, 'unk_id', None)
    texts = prompts(cfg.templates, self.class_fields)
    unknown = [t for t in texts if unk is not None and unk in task.tokenizer.tokenize(t)]
    if unknown:
      log.warning('zero_shot: %d prompts have words the tokenizer does not know, e.g. %r',
                  len(unknown), unknown[0])

  def _classes(self):
    cfg = self.cfg
    if named_fields(self.data_cfg, cfg.label_key, cfg.classes):
      return shapes_classes(cfg.label_key)
    names = cfg.classes
    if not names:
      feature = pipeline.get_builder(self.data_cfg).info.features[cfg.label_key]
      names = getattr(feature, 'names', None)
      if not names:
        raise ValueError(f'zero_shot: {cfg.label_key!r} has no class names; set classes')
    return [{'name': n} for n in names], None, None

  def run(self, state, step):
    cfg = self.cfg
    params = state['ema_params' if cfg.use_ema else 'params']
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    reader = embedding.SplitReader(self.data_cfg, cfg.split)
    if cfg.label_key not in reader.builder.info.features:
      raise ValueError(f'zero_shot: label_key={cfg.label_key!r} is not a feature of '
                       f'{reader.builder.info.full_name!r}')
    texts = prompts(cfg.templates, self.class_fields)
    k, t = len(self.class_fields), len(cfg.templates)
    prompts_KxTxE = embedding.encode_texts(self.task, params, texts, cfg.batch_size, mesh)
    classes_KxE = class_embeddings(prompts_KxTxE.reshape(k, t, -1))

    def load(indices_L):
      examples = reader.examples(indices_L)
      return {'image': np.stack([reader.image(ex) for ex in examples]),
              'label': np.array([ex[cfg.label_key] for ex in examples], np.int32)}

    n = retrieval.num_examples(cfg, reader, 'zero_shot')
    out = embedding.embed(self._encode, params, load, n, cfg.batch_size, mesh)
    if out['label'].min() < 0 or out['label'].max() >= k:
      raise ValueError(f'zero_shot: labels of {cfg.label_key!r} lie outside the {k} classes')
    return {**accuracies(out['image'], classes_KxE, out['label'], unseen_K=self.unseen_K,
                         attributes=self.attributes), 'examples': n}
