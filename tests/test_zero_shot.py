"""Zero-shot classification: prompt ensembles, accuracies on fixed embeddings, the shapes label
space, config errors, and the evaluator on a fake dual encoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.shapes import grammar
from zoo import embedding
from zoo.evals import zero_shot

from test_retrieval import FakeDualEncoder, eval_configs

MESH_AXES = ('data', 'fsdp', 'tensor')


def test_prompts_are_class_major_and_fill_named_fields():
  fields = [{'name': 'red circle', 'shape': 'circle', 'colour': 'red'},
            {'name': 'blue star', 'shape': 'star', 'colour': 'blue'}]
  assert zero_shot.prompts(('a {colour} {shape}.', 'one shape: a {}.', '{name}'), fields) == [
      'a red circle.', 'one shape: a red circle.', 'red circle',
      'a blue star.', 'one shape: a blue star.', 'blue star']
  assert zero_shot.template_fields('a {colour} {shape} and {}.') == {'colour', 'shape', ''}


def test_class_embedding_is_the_normalised_mean_of_normalised_prompts():
  prompts_KxTxE = np.array([[[3.0, 0.0], [0.0, 0.5]], [[0.0, -2.0], [0.0, -1.0]]])
  np.testing.assert_allclose(zero_shot.class_embeddings(prompts_KxTxE),
                             [[0.5 ** 0.5, 0.5 ** 0.5], [0.0, -1.0]], rtol=1e-6)


def test_accuracies_by_hand():
  classes = np.eye(6, dtype=np.float32)
  img = np.array([[1, .9, 0, 0, 0, 0], [.8, 1, .9, .7, .6, 0], [0, 0, 1, 0, 0, 0],
                  [.3, .2, .4, -1, .1, .5]], np.float32)
  labels = np.array([0, 0, 2, 3])  # Hit; rank 2; hit; rank 5 (of 6: beyond top 5).
  unseen = np.array([False, False, True, True, False, False])
  shape = np.array(['a', 'a', 'b', 'b', 'c', 'c'])
  out = zero_shot.accuracies(img, classes, labels, unseen_K=unseen, attributes={'shape': shape})
  assert out == {'accuracy': 0.5, 'top5_accuracy': 0.75, 'accuracy_seen': 0.5,
                 'accuracy_unseen': 0.5, 'shape_accuracy': 0.75}
  assert 'top5_accuracy' not in zero_shot.accuracies(img[:, :4], classes[:4, :4], labels)
  only_seen = zero_shot.accuracies(img[:2], classes, labels[:2], unseen_K=unseen)
  assert 'accuracy_unseen' not in only_seen and only_seen['accuracy_seen'] == 0.5


def test_shapes_classes_are_the_dataset_labels():
  fields, unseen_K, attributes = zero_shot.shapes_classes('shape_colour')
  assert tuple(f['name'] for f in fields) == grammar.SHAPE_COLOURS
  assert unseen_K.sum() == len(grammar.HELD_OUT_PAIRS)
  config = eval_configs()
  reader = embedding.SplitReader(config.data, 'held_out')
  assert reader.builder.info.features['shape_colour'].names == list(grammar.SHAPE_COLOURS)
  for ex in reader.examples(range(8)):  # One object each, always a held-out pair.
    label, obj = ex['shape_colour'], ex['objects']
    assert fields[label]['shape'] == grammar.SHAPES[obj['shape'][0]]
    assert fields[label]['colour'] == grammar.COLOUR_NAMES[obj['colour'][0]]
    assert unseen_K[label] and attributes['shape'][label] == fields[label]['shape']
  shape_fields, unseen, _ = zero_shot.shapes_classes('label')
  assert [f['shape'] for f in shape_fields] == list(grammar.SHAPES) and unseen is None


@pytest.mark.parametrize('change,message', [
    (dict(templates=('a {size} {shape}.',)), r"fields \['\{\}', '\{name\}', '\{shape\}', "
                                             r"'\{colour\}'\]"),
    (dict(templates=('no field at all.',)), 'at least one of them'),
    (dict(templates=()), 'at least one template'),
    (dict(classes=('cat', 'dog')), r"fields \['\{\}', '\{name\}'\]"),  # {shape} needs shapes.
    (dict(label_key=''), 'label_key must be set'),
    (dict(num_examples=-1), 'num_examples must be >= 0'),
])
def test_config_errors_name_the_key_and_the_allowed_values(change, message):
  config = eval_configs()
  cfg = config.evals.zero_shot
  for key, value in change.items():
    cfg[key] = value
  with pytest.raises(ValueError, match=message):
    zero_shot.ZeroShot.check(cfg, config, 'config.evals.zero_shot')


def reference_metrics(task, cfg, reader, class_fields, unseen=None, attributes=None):
  params = {k: jnp.asarray(w) for k, w in task.weights.items()}
  examples = reader.examples(range(len(reader)))
  img = task.encode_image(params, np.stack([reader.image(ex) for ex in examples]))
  texts = zero_shot.prompts(cfg.templates, class_fields)
  txt = task.encode_text(params, *task.tokenizer.encode(texts, task.max_len))
  classes = zero_shot.class_embeddings(np.asarray(txt).reshape(len(class_fields),
                                                               len(cfg.templates), -1))
  labels = np.array([ex[cfg.label_key] for ex in examples])
  return zero_shot.accuracies(np.asarray(img), classes, labels, unseen_K=unseen,
                              attributes=attributes)


def test_evaluator_matches_the_metrics_of_directly_computed_embeddings():
  config, task = eval_configs(), FakeDualEncoder()
  mesh = jax.make_mesh((8, 1, 1), MESH_AXES)
  cfg = config.evals.zero_shot
  zero_shot.ZeroShot.check(cfg, config, 'config.evals.zero_shot')
  got = zero_shot.ZeroShot(cfg, task=task, config=config, workdir='').run(
      {'params': task.params(mesh)}, 0)
  reader = embedding.SplitReader(config.data, 'held_out')
  assert got.pop('examples') == 64
  assert got == reference_metrics(task, cfg, reader, *zero_shot.shapes_classes('shape_colour'))
  assert set(got) == {'accuracy', 'top5_accuracy', 'accuracy_unseen', 'shape_accuracy',
                      'colour_accuracy'}
  # Given class names: the shape label with plain names.
  cfg.label_key, cfg.classes, cfg.templates = 'label', tuple(grammar.SHAPES), ('a {}.',)
  zero_shot.ZeroShot.check(cfg, config, 'config.evals.zero_shot')
  got = zero_shot.ZeroShot(cfg, task=task, config=config, workdir='').run(
      {'params': task.params(mesh)}, 0)
  names = [{'name': s} for s in grammar.SHAPES]
  assert {k: v for k, v in got.items() if k != 'examples'} == reference_metrics(
      task, cfg, reader, names)


def test_prompts_outside_the_vocabulary_are_logged(caplog):
  config, task = eval_configs(), FakeDualEncoder()
  config.evals.zero_shot.templates = ('a photograph of a {colour} {shape}.',)
  zero_shot.ZeroShot(config.evals.zero_shot, task=task, config=config, workdir='')
  assert '64 prompts have words the tokenizer does not know' in caplog.text
  caplog.clear()
  config.evals.zero_shot.templates = ('there is only one shape: a {colour} {shape}.',)
  zero_shot.ZeroShot(config.evals.zero_shot, task=task, config=config, workdir='')
  assert 'does not know' not in caplog.text
