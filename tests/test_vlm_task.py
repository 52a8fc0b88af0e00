"""The VLM task through the loop: answer-only loss, training, VQA evaluation, `zoo ask`, BLEU."""

import json
import math

import jax
import numpy as np
import pytest
from PIL import Image

from zoo import config as zoo_config
from zoo import models
from zoo import tasks
from zoo import train
from zoo.evals import vqa
from zoo.pipelines import ask

from conftest import assert_same
from conftest import leaves
from conftest import random_params
from test_contrastive_task import fake_run


@pytest.fixture(scope='module')
def vqa_run(tmp_path_factory):
  """The mid-fusion smoke experiment: 20 steps on tiny32, then its VQA evaluation."""
  workdir = tmp_path_factory.mktemp('vlm') / 'mid'
  config = zoo_config.load('experiments/vlm_mid_shapes.py:smoke=True', ['--config.mesh.data=1'])
  state = train.train_and_evaluate(config, str(workdir))
  return workdir, config, state


def _metrics(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f]


def test_training_lowers_the_answer_loss_and_evaluates_every_question_type(vqa_run):
  workdir, _, _ = vqa_run
  rows = _metrics(workdir)
  losses = [r['loss'] for r in rows if 'loss' in r]
  assert losses[-1] < losses[0]
  evals = [r for r in rows if 'vqa/accuracy' in r][-1]
  assert evals['vqa/questions'] > 16  # Every question of 16 examples.
  for kind in ('count', 'colour', 'shape', 'position', 'exists', 'two_hop'):
    assert 0.0 <= evals[f'vqa/accuracy_{kind}'] <= 1.0
  assert 0.0 <= evals['vqa/hallucination_rate'] <= 1.0


def test_loss_covers_the_answer_and_eos_only(vqa_run):
  _, config, state = vqa_run
  task = tasks.build(config)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 100, (2, 10)).astype(np.int32)
  mask = np.ones((2, 10), bool)
  mask[1, 8:] = False
  prompt_len = np.array([4, 6], np.int32)
  batch = {'image': rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32), 'qa_tokens': tokens,
           'qa_mask': mask, 'qa_prompt_len': prompt_len}
  params = jax.device_get(state['params'])
  loss, metrics = task.loss(params, batch, jax.random.PRNGKey(0), train=False)
  logits = np.asarray(task.logits(params, batch['image'], tokens[:, :-1], mask[:, :-1],
                                  prompt_len), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = [logp[b, j - 1, tokens[b, j]] for b in range(2) for j in range(1, 10)
            if mask[b, j] and j >= prompt_len[b]]  # Row 0: 6 targets; row 1: 2.
  assert len(picked) == 8
  np.testing.assert_allclose(float(loss), -np.mean(picked), rtol=1e-5)
  assert 0.0 <= float(metrics['token_accuracy']) <= 1.0


def test_zoo_ask_answers_from_the_checkpoint(vqa_run, tmp_path):
  workdir, _, _ = vqa_run
  image = tmp_path / 'scene.png'
  Image.fromarray(np.full((48, 48, 3), 200, np.uint8)).save(image)  # Resized to 32.
  answers = ask.ask(str(workdir), str(image), ['how many shapes are there?',
                                               'what colour is the star?'])
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
  greedy_again = ask.ask(str(workdir), str(image), ['how many shapes are there?'])
  assert greedy_again[0] == answers[0]
  with pytest.raises(ValueError, match='ask a question'):
    ask.ask(str(workdir), str(image), [])
  with pytest.raises(ValueError, match='max_len'):
    ask.ask(str(workdir), str(image), ['how many ' + 'red ' * 30 + 'shapes are there?'])
  with pytest.raises(ValueError, match="allowed: \\['greedy', 'beam'\\]"):
    ask.ask(str(workdir), str(image), ['how many shapes are there?'], decoding='sample')


def test_pretrained_from_warm_starts_the_shared_parts(vqa_run):
  """An early-fusion model from the mid-fusion run: every shared part is that run's EMA."""
  workdir, _, state = vqa_run
  config = zoo_config.load(f'experiments/vlm_early_shapes.py:smoke=True,init={workdir}')
  task = tasks.build(config)
  assert sorted(task.pretrained) == ['final_norm', 'head', 'layers_0', 'layers_1', 'layers_2',
                                     'layers_3', 'token_embedding', 'vision', 'vision_proj']
  batch = {'image': np.zeros((8, 32, 32, 3), np.float32),
           'qa_tokens': np.ones((8, 20), np.int32), 'qa_mask': np.ones((8, 20), bool),
           'qa_prompt_len': np.full((8,), 4, np.int32), 'qa_type': np.zeros((8,), np.int32)}
  s = train.setup(config, {k: (v.shape, v.dtype) for k, v in batch.items()})
  first = train._first_state(s, _NoCheckpoint(), None, jax.random.PRNGKey(1))
  for key in task.pretrained:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(first['params'][key]),
                 jax.device_get(state['ema_params'][key]))
  with pytest.raises(ValueError, match='not a vlm run'):
    tasks.build(zoo_config.load('experiments/vlm_early_shapes.py:smoke=True,init=/nonexistent'))


@pytest.mark.parametrize('kind', ['clip', 'siglip'])
def test_vision_from_a_dual_encoder_run_starts_and_locks_the_tower(tmp_path, kind):
  """Its image tower becomes the vision tower: the same params, the same tokens, frozen."""
  source = str(tmp_path / kind)
  source_config = zoo_config.load(f'experiments/{kind}_shapes.py:smoke=True')
  images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  source_params = random_params(models.build(source_config.model), images,
                                np.ones((4, 8), np.int32), np.ones((4, 8), bool), seed=3)
  fake_run(source, source_config, source_params)
  config = zoo_config.load(f'experiments/vlm_mid_shapes.py:smoke=True,vision_from={source}',
                           ['--config.mesh.data=1', '--config.train.steps=2'])
  assert config.task.lock_vision
  assert config.model.vision_class_token == (kind == 'clip')  # SigLIP's MAP head is left out.
  state = train.train_and_evaluate(config, str(tmp_path / 'vlm'))
  tower = {k: v for k, v in source_params['vision_model'].items() if k != 'head'}
  assert_same(state['params']['vision'], tower)
  assert_same(state['ema_params']['vision'], tower)
  for x, y in zip(leaves(state['params']['layers_0']), leaves(state['ema_params']['layers_0'])):
    assert not np.array_equal(x, y)  # The rest trains.
  trained = sum(x.size for k, v in state['params'].items() if k != 'vision' for x in leaves(v))
  assert 0 <= sum(x.size for x in leaves(state['opt_state'])) - 2 * trained < 8
  # The tower computes what the dual encoder's does: its post-LN tokens.
  vit = models.build(models.config('vit', **dict(source_config.model.image)))
  _, sown = vit.apply({'params': source_params['vision_model']}, images,
                      mutable=['intermediates'])
  model = tasks.build(config).model
  tokens, _ = model.apply({'params': state['params']}, images, method=lambda m, x: m.vision(x))
  np.testing.assert_allclose(tokens, sown['intermediates']['tokens'][0], rtol=1e-5, atol=1e-5)
  if kind == 'siglip':
    return
  vlm = f'experiments/vlm_mid_shapes.py:smoke=True,vision_from={source}'
  # A shallower tower is the source's first layers (LLaVA's penultimate-layer features).
  deep_config = zoo_config.load(f'experiments/{kind}_shapes.py:smoke=True',
                                ['--config.model.image.depth=3'])
  deep_params = random_params(models.build(deep_config.model), images,
                              np.ones((4, 8), np.int32), np.ones((4, 8), bool), seed=4)
  fake_run(str(tmp_path / 'deep'), deep_config, deep_params)
  deep = f'experiments/vlm_mid_shapes.py:smoke=True,vision_from={tmp_path / "deep"}'
  shallow = zoo_config.load(deep, ['--config.mesh.data=1', '--config.model.vision_depth=2'])
  s = train.setup(shallow, {'image': ((4, 32, 32, 3), np.float32),
                            'qa_tokens': ((4, 20), np.int32), 'qa_mask': ((4, 20), bool),
                            'qa_prompt_len': ((4,), np.int32), 'qa_type': ((4,), np.int32)})
  first = train._first_state(s, _NoCheckpoint(), None, jax.random.PRNGKey(1))
  assert sorted(first['params']['vision']['encoder']) == ['layers_0', 'layers_1']
  source_tower = deep_params['vision_model']
  assert_same(first['params']['vision'], {
      k: ({n: w for n, w in v.items() if n != 'layers_2'} if k == 'encoder' else v)
      for k, v in source_tower.items() if k != 'head'})
  with pytest.raises(ValueError, match=r'vision_depth \(4 here, 3 there\)'):
    zoo_config.load(deep, ['--config.model.vision_depth=4'])
  bad = {
      r"vision_width \(48 here, 32 there\)": (vlm, ['--config.model.vision_width=48']),
      'both initialise the vision tower': (f'{vlm},init={tmp_path / "vlm"}', []),
      "fusion='none' has none": (f'{vlm},fusion=none', []),
      'lock_vision=True needs': ('experiments/vlm_mid_shapes.py:smoke=True',
                                 ['--config.task.lock_vision=True']),
  }
  for match, (name, overrides) in bad.items():
    with pytest.raises(ValueError, match=match):
      zoo_config.load(name, overrides)
  # A config may name its source before that run exists; the task needs it.
  missing = zoo_config.load(f'experiments/vlm_mid_shapes.py:smoke=True,vision_from={tmp_path}/no')
  with pytest.raises(FileNotFoundError, match='config.task.vision_from=.*is not a zoo run'):
    tasks.build(missing)


class _NoCheckpoint:
  def latest_step(self):
    return None


def test_corpus_bleu_against_hand_counts():
  hyp = 'the cat sat on the mat'.split()
  ref = 'the cat sat on a mat'.split()
  # Clipped matches 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty.
  expected = math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4)
  assert vqa.corpus_bleu([hyp], [[ref]]) == pytest.approx(expected)
  assert vqa.corpus_bleu([ref], [[hyp, ref]]) == pytest.approx(1.0)
  short = 'the cat sat on'.split()  # 4 words against 6: penalty exp(1 - 6/4).
  assert vqa.corpus_bleu([short], [[ref]]) == pytest.approx(math.exp(1 - 6 / 4))
  assert vqa.corpus_bleu([['a', 'dog']], [[ref]]) == 0.0


def test_hallucination_rate_counts_texts_naming_absent_objects():
  scene = {'objects': {'shape': ['circle', 'star'], 'colour': ['red', 'blue']}}
  rate, named = vqa.hallucination_rate(
      ['a red circle.', 'a green star.', 'yes', 'two hearts.'], [scene] * 4)
  assert named == 3 and rate == pytest.approx(2 / 3)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="config.task.objective='translate'"):
    zoo_config.load('experiments/vlm_mid_shapes.py:smoke=True',
                    ['--config.task.objective=translate'])
  with pytest.raises(ValueError, match='config.data.text'):
    zoo_config.load('experiments/vlm_mid_shapes.py:smoke=True',
                    ['--config.task.objective=caption'])
  with pytest.raises(ValueError, match='model.vocab_size=50'):
    zoo_config.load('experiments/vlm_mid_shapes.py:smoke=True', ['--config.model.vocab_size=50'])
  with pytest.raises(ValueError, match=r"model.reduce='drop'; allowed"):
    zoo_config.load('experiments/vlm_late_shapes.py:smoke=True,reduce=drop')


def test_captioning_trains_and_reports_bleu(tmp_path):
  config = zoo_config.load('experiments/vlm_late_shapes.py:smoke=True,objective=caption',
                           ['--config.train.steps=4'])
  train.train_and_evaluate(config, str(tmp_path / 'cap'))
  evals = [r for r in _metrics(tmp_path / 'cap') if 'caption_bleu/bleu4' in r][-1]
  assert 0.0 <= evals['caption_bleu/bleu4'] <= 1.0 and evals['caption_bleu/captions'] == 16
  assert 0.0 <= evals['caption_bleu/hallucination_rate'] <= 1.0
  image = tmp_path / 'scene.png'
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
  caption, = ask.ask(str(tmp_path / 'cap'), str(image), [])
  assert isinstance(caption, str)
  with pytest.raises(ValueError, match='captioning run'):
    ask.ask(str(tmp_path / 'cap'), str(image), ['how many shapes are there?'])


def test_vlm_notebook_explores_the_test_run(vqa_run, tmp_path, monkeypatch):
  """colab/vlm.ipynb in a kernel, on this module's run (it trains none then)."""
  import test_colab
  test_colab.execute('vlm.ipynb', tmp_path, monkeypatch, ZOO_VLM_WORKDIR=str(vqa_run[0]))
