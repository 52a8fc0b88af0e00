"""The contrastive task through the loop: CLIP and SigLIP learn on shapes captions, LiT keeps
the locked image tower bit-identical to its source run, config errors name their keys."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo import checkpoint
from zoo import config as zoo_config
from zoo import models
from zoo import sharding
from zoo import tasks
from zoo import train

from conftest import assert_same
from conftest import leaves
from conftest import random_params

ConfigDict = zoo_config.ConfigDict


def contrastive_config(kind='siglip', loss='sigmoid', steps=30, validate=True, **task):
  """A tiny dual encoder on tiny32 shapes scenes and their captions, 8 data-parallel devices."""
  config = ConfigDict()
  config.seed = 0
  config.data = ConfigDict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key='',
      builder_config='tiny32', train_split='train', eval_split='validation', features=()))
  config.data.text = ConfigDict(dict(caption_key='captions', tokenizer='shapes',
                                     tokenizer_path='', max_len=32))
  config.model = models.config('dual_encoder', preset=f'{kind}-tiny')
  config.task = ConfigDict(dict(name='contrastive', loss=loss, chunked=False, image_from='',
                                image_subtree='', lock_image=False) | task)
  config.train = ConfigDict(dict(
      steps=steps, batch_size=16, grad_accum=1, log_every=1, checkpoint_every=max(steps, 1),
      eval_every=0, max_to_keep=1, async_checkpointing=False, progress_bar=False))
  config.optim = ConfigDict(dict(
      name='adamw', lr=3e-3, schedule='constant', warmup_steps=0, end_lr_factor=1.0, b1=0.9,
      b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0, ema_decay=0.9))
  config.evals = ConfigDict()
  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = ConfigDict(sharding.DEFAULT_RULES)
  config.init_from = ''
  return zoo_config.validate(config) if validate else config


def start_params(config, batch, seed=0):
  """Random params of the dual encoder (no XLA init), its scalars at their usual init."""
  model = models.build(config.model)
  params = random_params(model, batch['image'], batch['tokens'], batch['tokens_mask'], seed=seed)
  params['logit_scale'] = jnp.float32(model.logit_scale_init)
  if 'logit_bias' in params:
    params['logit_bias'] = jnp.float32(model.logit_bias_init)
  return params


def one_batch(config):
  return next(train._train_data(config))


def collapsed_loss(loss, batch_size):
  """The best loss of constant embeddings (one logit for every pair): learning must beat it."""
  if loss == 'softmax':
    return math.log(batch_size)
  return math.log(batch_size) + (batch_size - 1) * math.log(batch_size / (batch_size - 1))


@pytest.mark.parametrize('kind,loss,chunked', [('clip', 'softmax', False),
                                               ('siglip', 'sigmoid', True)])
def test_the_task_learns_a_fixed_batch(kind, loss, chunked):
  """60 Adam steps on one batch of 16 captioned scenes split over 8 devices."""
  config = contrastive_config(kind, loss, chunked=chunked)
  task = tasks.build(config)
  mesh = sharding.make_mesh(config.mesh)
  batch = sharding.global_batch(one_batch(config), sharding.batch_sharding(mesh))
  params = start_params(config, batch)
  tx = optax.adam(2e-3)

  @jax.jit
  def step(params, opt_state):
    (_, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(
        params, batch, jax.random.PRNGKey(0))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state, history = tx.init(params), []
  for _ in range(60):
    params, opt_state, metrics = step(params, opt_state)
    history.append(jax.device_get(metrics))
  # SigLIP first collapses to constant embeddings (its bias alone fits 1 positive in 16), then
  # separates the pairs: the end must lie well below that plateau.
  assert history[-1]['loss'] < 0.5 * collapsed_loss(loss, 16), [m['loss'] for m in history]
  assert history[0]['bias'] == (-10.0 if kind == 'siglip' else 0.0)
  # The predict functions embed as the loss does: the batch is now memorised both ways.
  img = np.asarray(task.predict['encode_image'](params, batch['image']))
  txt = np.asarray(task.predict['encode_text'](params, batch['tokens'], batch['tokens_mask']))
  assert img.shape == txt.shape == (16, 32) and img.dtype == txt.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, rtol=1e-5)
  sims = img @ txt.T
  np.testing.assert_array_equal(sims.argmax(axis=1), np.arange(16))
  np.testing.assert_array_equal(sims.argmax(axis=0), np.arange(16))


def fake_run(workdir, config, params):
  """A finished run of `config` (config.json and a checkpoint) whose EMA params are `params`.

  Only the model section of its config is read (`image_from` checks the tower against it).
  """
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(zoo_config.to_json(config))
  raw = jax.tree.map(lambda x: np.asarray(x) - 1.0, params)  # The raw params are not loaded.
  state = {'step': np.int32(1), 'params': raw, 'opt_state': {'count': np.int32(1)},
           'ema_params': jax.tree.map(np.asarray, params)}
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  ckpt.save(1, state, {'next_batch': 1})
  ckpt.close()


@pytest.fixture(scope='module')
def lit_batch():
  return one_batch(contrastive_config(steps=0))


def test_lit_keeps_the_locked_tower_of_a_dual_encoder_run(tmp_path, lit_batch):
  source = str(tmp_path / 'source')
  source_params = start_params(contrastive_config(steps=0), lit_batch, seed=1)
  fake_run(source, contrastive_config(steps=0), source_params)
  config = contrastive_config(steps=3, chunked=True, image_from=source,
                              image_subtree='vision_model', lock_image=True)
  state = train.train_and_evaluate(config, str(tmp_path / 'lit'))
  assert_same(state['params']['vision_model'], source_params['vision_model'])
  assert_same(state['ema_params']['vision_model'], source_params['vision_model'])
  # The EMA equals the params of a tensor only if it never moved: every text tensor did.
  for x, y in zip(leaves(state['params']['text_model']), leaves(state['ema_params']['text_model'])):
    assert not np.array_equal(x, y)
  # Adam keeps moments for the text tower and the two scalars only (plus step counts).
  trained = sum(x.size for k, v in state['params'].items() if k != 'vision_model'
                for x in leaves(v))
  assert 0 <= sum(x.size for x in leaves(state['opt_state'])) - 2 * trained < 8
  # A tower of another architecture is refused before anything compiles, the field named.
  config.model.image.act = 'gelu'
  with pytest.raises(ValueError, match="act \\('gelu' here, 'gelu_tanh' there\\)"):
    zoo_config.validate(config)


def test_lit_from_a_vit_classifier_run_leaves_out_its_classifier(tmp_path, lit_batch, caplog):
  source = str(tmp_path / 'vit_classifier')
  source_config = contrastive_config(steps=0)
  vit = models.config('vit', **(dict(source_config.model.image) | {'num_classes': 5}))
  source_params = random_params(models.build(vit), lit_batch['image'], seed=2)
  assert 'classifier' in source_params
  source_config.model = vit
  fake_run(source, source_config, source_params)
  config = contrastive_config(steps=1, chunked=True, image_from=source, lock_image=True)
  with caplog.at_level('INFO', logger='zoo'):
    state = train.train_and_evaluate(config, str(tmp_path / 'lit'))
  assert 'classifier' in caplog.text
  tower = {k: v for k, v in source_params.items() if k != 'classifier'}
  assert_same(state['params']['vision_model'], tower)
  # Only the named keys are left out: without `ignore`, or with a real difference, it fails.
  where = os.path.join(source, 'checkpoints')
  with pytest.raises(ValueError, match='not in this model: +classifier/kernel'):
    checkpoint.load_params(where, tower, use_ema=True)
  short = {k: v for k, v in tower.items() if k != 'post_layernorm'}
  with pytest.raises(ValueError, match='not in this model: +post_layernorm/scale'):
    checkpoint.load_params(where, short, use_ema=True, ignore=('classifier',))


def test_bad_configs_name_their_key(tmp_path):
  def model(name, preset):
    return lambda config: setattr(config, 'model', models.config(name, preset=preset))

  def task(**values):
    return lambda config: config.task.update(values)

  def drop_text(config):
    del config.data['text']

  def max_len(config):
    config.data.text.max_len = 64

  classifier_run = tmp_path / 'classifier_run'
  classifier_run.mkdir()
  (classifier_run / 'config.json').write_text(zoo_config.to_json(
      ConfigDict(dict(model=models.config('classifier', preset='tiny')))))

  bad = {
      'config.task.loss': task(loss='hinge'),
      "config.model.kind='siglip'": model('dual_encoder', 'clip-tiny'),
      'config.task.chunked': task(loss='softmax', chunked=True),
      'config.task.lock_image': task(lock_image=True),
      'config.task.image_subtree': task(image_subtree='vision_model'),
      'config.task.image_from': task(image_from=str(classifier_run)),
      'config.data.text.max_len': max_len,
      'config.model.name': model('vit', 'tiny'),
      'config.data.text': drop_text,
  }
  for key, breaks in bad.items():
    config = contrastive_config(validate=False)
    breaks(config)
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
      zoo_config.validate(config)
  # The ring needs every (micro-)batch split evenly over the 8 data devices.
  config = contrastive_config(chunked=True, validate=False)
  config.train.grad_accum = 4
  with pytest.raises(ValueError, match=r'config\.train\.batch_size / grad_accum'):
    tasks.build(zoo_config.validate(config))


def test_an_untrained_image_from_run_is_refused_when_the_task_is_built(tmp_path):
  missing = str(tmp_path / 'not_trained_yet')
  # An experiment may name its source run before it exists (defaults point at workdirs/...).
  config = contrastive_config('clip', 'softmax', image_from=missing, image_subtree='',
                              lock_image=True)
  with pytest.raises(FileNotFoundError, match='not_trained_yet.*is not a zoo run'):
    tasks.build(config)
