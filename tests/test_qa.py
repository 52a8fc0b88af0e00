"""`data.qa`: question/answer pairs of the shapes scenes as token arrays, and their helpers."""

import os

import ml_collections
import numpy as np
import pytest

from data import pipeline
from data import qa
from data import text_tokenizers
from data.shapes import grammar
from data.shapes.questions import QUESTION_TYPES
from zoo import config as zoo_config

from conftest import REPO

ConfigDict = ml_collections.ConfigDict
TOKENIZER = text_tokenizers.get('shapes')


def _qa_cfg(**kw):
  return ConfigDict(dict(tokenizer='shapes', tokenizer_path='', max_len=24, types=()) | kw)


def _cfg(text=False, **kw):
  """tiny32 shapes scenes with data.qa (and data.text if asked)."""
  cfg = ConfigDict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key='',
      builder_config='tiny32', train_split='train', eval_split='validation', features=()))
  if text:
    cfg.text = ConfigDict(dict(caption_key='captions', tokenizer='shapes', tokenizer_path='',
                               max_len=32))
  cfg.qa = _qa_cfg(**kw)
  return cfg


@pytest.fixture(scope='module')
def train_examples():
  """The decoded tiny32 train examples (512), in record order."""
  source = pipeline.get_builder(_cfg()).as_data_source('train')
  return [source[i] for i in range(len(source))]


def _pairs(example):
  return [(q.lower(), a.lower(), t) for q, a, t in qa.examples_qa(example)]


def _decoded(batch, row):
  """(question, answer, type) that row `row` of a batch's qa arrays spells."""
  ids, p = batch['qa_tokens'][row], batch['qa_prompt_len'][row]
  return (TOKENIZER.decode(ids[:p]), TOKENIZER.decode(ids[p:]),
          QUESTION_TYPES[batch['qa_type'][row]])


def test_batch_holds_a_question_of_each_example_and_its_answer(train_examples):
  it = pipeline.get_dataset(_cfg(), split='train', seed=0, global_batch_size=16, prefetch=0)
  by_image = {np.asarray(ex['image']).tobytes(): ex for ex in train_examples}
  for _ in range(2):
    batch = next(it)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == it.spec()
    assert it.spec()['qa_tokens'] == ((16, 24), np.dtype(np.int32))
    assert it.spec()['qa_prompt_len'] == ((16,), np.dtype(np.int32))
    for row in range(16):
      # tiny32 needs no resize, so the uint8 image is recovered exactly.
      image = np.round((batch['image'][row] + 1) * 127.5).astype(np.uint8)
      example = by_image[image.tobytes()]
      assert _decoded(batch, row) in _pairs(example)
      ids, p = batch['qa_tokens'][row], batch['qa_prompt_len'][row]
      end = int(np.flatnonzero(ids == TOKENIZER.eos_id)[0]) + 1
      assert ids[0] == TOKENIZER.bos_id and p < end - 1  # A non-empty answer follows.
      np.testing.assert_array_equal(batch['qa_mask'][row], np.arange(24) < end)
      assert (ids[end:] == TOKENIZER.pad_id).all()


def test_picks_are_a_function_of_seed_batch_and_example(train_examples):
  examples, indices = train_examples[:64], np.arange(64)
  picker = qa.QuestionAnswers(_qa_cfg(), seed=3)
  first = picker.tokens(examples, indices, k=5)
  again = qa.QuestionAnswers(_qa_cfg(), seed=3).tokens(examples, indices, k=5)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  other = picker.tokens(examples, indices, k=6)
  changed = np.mean([(first['qa_tokens'][i] != other['qa_tokens'][i]).any() for i in indices])
  assert changed > 0.5  # About 5 questions per scene: most picks change with k.
  # Over many batch indices every type an example has is drawn.
  types = {int(picker.tokens(examples[:1], indices[:1], k)['qa_type'][0]) for k in range(64)}
  assert types == {QUESTION_TYPES.index(t) for _, _, t in qa.examples_qa(examples[0])}


def test_pipeline_is_deterministic_splits_by_process_and_keeps_text():
  both = next(pipeline.get_dataset(_cfg(text=True), split='train', seed=1, global_batch_size=8,
                                   prefetch=0))
  again = next(pipeline.get_dataset(_cfg(text=True), split='train', seed=1, global_batch_size=8))
  text_only = _cfg(text=True)
  del text_only['qa']
  text = next(pipeline.get_dataset(text_only, split='train', seed=1, global_batch_size=8))
  assert set(both) == set(text) | {'qa_tokens', 'qa_mask', 'qa_prompt_len', 'qa_type'}
  for key in both:
    np.testing.assert_array_equal(both[key], again[key])
  for key in text:  # Adding data.qa leaves the caption tokens as they were.
    np.testing.assert_array_equal(both[key], text[key])
  parts = [next(pipeline.get_dataset(_cfg(), split='train', seed=1, global_batch_size=8,
                                     process_index=p, process_count=2)) for p in range(2)]
  for key in ('qa_tokens', 'qa_mask', 'qa_prompt_len', 'qa_type'):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), both[key])


def test_types_restrict_the_questions(train_examples):
  batch = next(pipeline.get_dataset(_cfg(types=('count',)), split='train', seed=0,
                                    global_batch_size=32))
  assert (batch['qa_type'] == QUESTION_TYPES.index('count')).all()
  for row in range(32):
    question, answer, _ = _decoded(batch, row)
    assert question.startswith('how many ') and answer in '01234'
  picker = qa.QuestionAnswers(_qa_cfg(types=('colour', 'shape')), seed=0)
  out = picker.tokens(train_examples[:64], np.arange(64), k=0)
  assert set(out['qa_type'].tolist()) == {1, 2}
  no_sign = next(i for i, ex in enumerate(train_examples) if not ex['word'])
  with pytest.raises(ValueError, match=rf"example {no_sign} has no question .*data\.qa\.types"):
    qa.QuestionAnswers(_qa_cfg(types=('read_text',)), seed=0).tokens(
        [train_examples[no_sign]], np.array([no_sign]), k=0)


def test_a_pair_that_does_not_fit_names_max_len(train_examples):
  picker = qa.QuestionAnswers(_qa_cfg(max_len=6), seed=0)
  with pytest.raises(ValueError, match=r'data\.qa\.max_len=6 is too small: .* needs \d+ tokens'):
    picker.tokens(train_examples[:16], np.arange(16), k=0)


def _classifier_config():
  config = zoo_config.load(os.path.join(REPO, 'experiments', 'shapes_classifier.py:smoke=True'))
  config.data.qa = _qa_cfg()
  return config


def test_config_section_is_checked():
  zoo_config.validate(_classifier_config())

  def extra_key(config):
    config.data.qa.answer_key = 'answers'

  def bad_type(config):
    config.data.qa.types = ('count', 'size')

  def string_types(config):
    with config.data.qa.ignore_type():
      config.data.qa.types = 'count'

  def short(config):
    config.data.qa.max_len = 3

  def tokenizer(config):
    config.data.qa.tokenizer = 'words'

  bad = {
      extra_key: r"unknown key\(s\) \['answer_key'\] in config\.data\.qa",
      bad_type: r"data\.qa\.types=\('count', 'size'\): unknown or repeated \['size'\]; "
                r"allowed: \['count', 'colour', 'shape', 'position', 'exists', 'read_text'",
      string_types: r'config\.data\.qa\.types must be tuple',
      short: r'data\.qa\.max_len=3 must be >= 4',
      tokenizer: r"data\.qa\.tokenizer='words' is not one of \['bytes'",
  }
  for breaks, match in bad.items():
    config = _classifier_config()
    breaks(config)
    with pytest.raises(ValueError, match=match):
      zoo_config.validate(config)
  with pytest.raises(ValueError, match=r"data\.qa needs the features .*lacks \['questions'"):
    features = pipeline.BUILTINS['digits'](data_dir=pipeline.resolve_data_dir(None)).info.features
    qa.check_features(features, 'digits')


def test_encode_prompts_match_the_training_prompt(train_examples):
  questions = ['What colour is the star?', 'How many shapes are there?']
  ids, prompt_len = qa.encode_prompts(TOKENIZER, questions, 10)
  assert ids.shape == (2, 10) and ids.dtype == np.int32 and prompt_len.dtype == np.int32
  np.testing.assert_array_equal(prompt_len, [7, 7])
  for row, question in enumerate(questions):
    assert TOKENIZER.decode(ids[row]) == question.lower()
    assert ids[row, 0] == TOKENIZER.bos_id and (ids[row, prompt_len[row]:] == 0).all()
  batch = qa.QuestionAnswers(_qa_cfg(), seed=0).tokens(train_examples[:8], np.arange(8), k=0)
  asked = [_decoded(batch, row)[0] for row in range(8)]
  ids, prompt_len = qa.encode_prompts(TOKENIZER, asked, 24)
  np.testing.assert_array_equal(prompt_len, batch['qa_prompt_len'])
  for row in range(8):
    p = prompt_len[row]
    np.testing.assert_array_equal(ids[row, :p], batch['qa_tokens'][row, :p])
  with pytest.raises(ValueError, match=r'needs max_len >= 9, but max_len \(data\.qa\.max_len\)'):
    qa.encode_prompts(TOKENIZER, questions, 8)


def test_normalize_answer():
  assert qa.normalize_answer('  Red. ') == 'red'
  assert qa.normalize_answer('A  large\tred circle .') == 'a large red circle'
  assert qa.normalize_answer('STOP') == 'stop' == qa.normalize_answer('stop.')
  assert qa.normalize_answer('') == ''


def test_hallucinations_count_shape_and_colour_words_absent_from_the_scene():
  shapes = [grammar.SHAPES.index('circle'), grammar.SHAPES.index('cross')]
  colours = [grammar.COLOUR_NAMES.index('red'), grammar.COLOUR_NAMES.index('blue')]
  example = {'objects': {'shape': np.array(shapes), 'colour': np.array(colours)}}
  text = ('A red circle, two blue crosses and a green star. A person. '
          'A sign says "pink". The red cross is left of the circle.')
  assert qa.hallucinations(text, example) == {'named': 6, 'absent': ['green', 'star']}
  named = {'objects': {'shape': ['circle', 'cross'], 'colour': ['red', 'blue']}}
  assert qa.hallucinations(text, named) == qa.hallucinations(text, example)
  assert qa.hallucinations('A person raising both arms.', example) == {'named': 0, 'absent': []}
  assert qa.hallucinations('Hexagons', example) == {'named': 1, 'absent': ['hexagon']}


def test_dataset_language_names_only_what_is_there(train_examples):
  for example in train_examples[:64]:
    answers = [a for _, a, t in qa.examples_qa(example) if t in ('colour', 'shape', 'two_hop')]
    texts = [c.decode() for c in example['captions']] + answers
    assert answers and all(qa.hallucinations(t, example)['absent'] == [] for t in texts)
