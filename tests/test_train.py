"""The loop: update step, learning, sharded == unsharded, resume, non-finite stop, checkpoints."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import optax
import PIL.Image
import pytest

from zoo import config as zoo_config
from zoo import eager
from zoo import metrics
from zoo import optim
from zoo import runs
from zoo import train

from conftest import REPO

QUICKSTART = os.path.join(REPO, 'experiments', 'quickstart.py')


def smoke_config(*overrides):
  base = ['--config.train.progress_bar=false', '--config.evals.samples.per_label=1',
          '--config.evals.samples.labels=(0,1)', '--config.evals.val.num_batches=1']
  return zoo_config.load(f'{QUICKSTART}:smoke=True', base + list(overrides))


def params_of(workdir, key='params'):
  _, _, state = runs.load(workdir)
  return jax.tree.map(np.asarray, jax.device_get(state[key]))


def assert_trees(a, b, exact=True, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, **tol)


def test_train_step_accumulation_equals_full_batch():
  def loss_fn(params, batch, rng):
    err = batch['x'] @ params['w'] - batch['y']
    loss = jnp.mean(err ** 2)
    return loss, {'mse': loss}
  rng = np.random.default_rng(0)
  batch = {'x': rng.normal(size=(8, 3)).astype(np.float32),
           'y': rng.normal(size=(8,)).astype(np.float32)}
  params = {'w': jnp.ones((3,))}
  tx = optax.adam(0.1)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
           'ema_params': params}
  step = functools.partial(train.train_step, loss_fn=loss_fn, tx=tx,
                           schedule=optax.constant_schedule(0.1), ema_decay=0.5)
  full, m_full = jax.jit(functools.partial(step, grad_accum=1))(state, batch, jax.random.PRNGKey(0))
  acc, m_acc = jax.jit(functools.partial(step, grad_accum=4))(state, batch, jax.random.PRNGKey(0))
  assert_trees(full['params'], acc['params'], exact=False, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m_full['grad_norm'], m_acc['grad_norm'], rtol=1e-5)
  assert int(full['step']) == 1
  # The first EMA update decays by min(0.5, 1 / 10): 90% of the way to the new params.
  np.testing.assert_allclose(full['ema_params']['w'],
                             0.1 * params['w'] + 0.9 * full['params']['w'], rtol=1e-6)
  # By step 20 the warm-up decay (21 / 30) exceeds the cap: 0.5.
  later = jax.jit(functools.partial(step, grad_accum=1))(
      dict(state, step=jnp.asarray(20, jnp.int32)), batch, jax.random.PRNGKey(0))[0]
  np.testing.assert_allclose(later['ema_params']['w'], (params['w'] + later['params']['w']) / 2,
                             rtol=1e-6)
  assert np.any(np.asarray(full['params']['w']) != 1.0)


def test_pass_step_hands_the_step_to_the_loss_and_frozen_params_stay():
  def loss_fn(params, batch, rng, step):
    gate = (step >= 3).astype(jnp.float32)  # A term that starts at step 3, as a late GAN.
    loss = jnp.sum(params['a'] ** 2) + gate * jnp.sum(params['b'] ** 2) + jnp.sum(params['c'])
    return loss, {'gate': gate}
  cfg = smoke_config().optim
  cfg.grad_clip_norm, cfg.weight_decay = 0.0, 0.0
  tx, schedule = optim.make(cfg, 10, frozen=('c',))
  params = {'a': jnp.ones((2,)), 'b': jnp.ones((2,)), 'c': jnp.ones((3,))}
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
           'ema_params': params}
  step = jax.jit(functools.partial(train.train_step, loss_fn=loss_fn, tx=tx, schedule=schedule,
                                   grad_accum=1, ema_decay=0.9, pass_step=True))
  gates = []
  for i in range(5):
    state, m = step(state, {'x': jnp.zeros((1,))}, jax.random.PRNGKey(0))
    gates.append(float(m['gate']))
    if i < 3:  # No gradient reaches b before step 3.
      np.testing.assert_array_equal(state['params']['b'], params['b'])
  assert gates == [0.0, 0.0, 0.0, 1.0, 1.0]
  assert float(jnp.abs(state['params']['b'] - 1).max()) > 0
  np.testing.assert_array_equal(state['params']['c'], params['c'])  # Frozen despite its gradient.
  assert float(jnp.abs(state['params']['a'] - 1).max()) > 0
  moments = sum(x.size for x in jax.tree.leaves(state['opt_state']))
  assert moments < 2 * 4 + 4  # Adam moments of a and b only (plus counts), none for c.


def test_weight_decay_spares_biases_and_scalars():
  cfg = smoke_config('--config.optim.weight_decay=0.5', '--config.optim.lr=0.1',
                     '--config.optim.warmup_steps=0',
                     '--config.optim.grad_clip_norm=0.0').optim
  tx, _ = optim.make(cfg, 10)
  params = {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3), 'logit_scale': jnp.ones(())}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # Zero gradients: only the decay moves anything, and only the matrix.
  assert float(new['kernel'][0, 0]) < 1.0
  assert float(new['bias'][0]) == 1.0 and float(new['logit_scale']) == 1.0


def test_lr_mults_scale_the_updates_of_matching_params_and_name_a_pattern_matching_none():
  cfg = smoke_config('--config.optim.lr=0.1', '--config.optim.warmup_steps=0',
                     '--config.optim.grad_clip_norm=1.0',
                     "--config.optim.lr_mults=(('tower/norm/.*', 0.0), ('tower/.*', 0.1))").optim
  params = {'tower': {'dense': {'kernel': jnp.ones((2, 3))}, 'norm': {'scale': jnp.ones(3)}},
            'head': {'kernel': jnp.ones((3, 2))}}
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  plain = smoke_config('--config.optim.lr=0.1', '--config.optim.warmup_steps=0',
                       '--config.optim.grad_clip_norm=1.0').optim
  for cfg_i, want in ((plain, (1.0, 1.0, 1.0)), (cfg, (0.1, 0.0, 1.0))):
    tx, _ = optim.make(cfg_i, 10, frozen=('other',) if cfg_i is cfg else ())
    updates, _ = tx.update(grads, tx.init(params), params)
    if cfg_i is plain:
      ref = updates
      continue
    got = (updates['tower']['dense']['kernel'], updates['tower']['norm']['scale'],
           updates['head']['kernel'])
    refs = (ref['tower']['dense']['kernel'], ref['tower']['norm']['scale'], ref['head']['kernel'])
    for u, r, m in zip(got, refs, want):  # Clipping and decay as without multipliers, then x m.
      assert float(jnp.abs(r).max()) > 0
      np.testing.assert_allclose(u, m * r, rtol=1e-6)
  tx, _ = optim.make(smoke_config("--config.optim.lr_mults=(('towr/.*', 0.1),)").optim, 10)
  with pytest.raises(ValueError, match=r"'towr/\.\*' matches no param path.*tower/dense/kernel"):
    tx.init(params)
  shadowed = "--config.optim.lr_mults=(('tower/.*', 0.1), ('tower/norm/.*', 0.0))"
  tx, _ = optim.make(smoke_config(shadowed).optim, 10)
  with pytest.raises(ValueError, match=r"'tower/norm/\.\*' matches is taken by an earlier"):
    tx.init(params)


def test_lr_schedule_warmup_and_decay():
  cfg = smoke_config('--config.optim.warmup_steps=10', '--config.optim.lr=1.0').optim
  sched = optim.lr_schedule(cfg, 110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 0.5)
  np.testing.assert_allclose(float(sched(10)), 1.0)
  np.testing.assert_allclose(float(sched(110)), cfg.end_lr_factor, rtol=1e-5)


def test_loss_goes_down_on_digits(tmp_path):
  config = smoke_config('--config.train.steps=100', '--config.train.batch_size=16',
                        '--config.train.log_every=10', '--config.train.checkpoint_every=100',
                        '--config.optim.warmup_steps=10', '--config.mesh.data=1')
  train.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in metrics.read_jsonl(tmp_path / 'metrics.jsonl') if 'loss' in r]
  assert [r['step'] for r in rows] == list(range(10, 101, 10))
  first, last = np.mean([r['loss'] for r in rows[:2]]), np.mean([r['loss'] for r in rows[-3:]])
  print(f'digits loss {first:.4f} -> {last:.4f}')
  assert last < 0.6 * first, (first, last)
  for key in ('grad_norm', 'param_norm', 'lr', 'examples_per_sec'):
    assert all(np.isfinite(r[key]) for r in rows)
  assert (tmp_path / 'samples' / 'step_000100.png').exists()
  evals = [r for r in metrics.read_jsonl(tmp_path / 'metrics.jsonl') if 'val/eval_loss' in r]
  assert evals and evals[-1]['step'] == 100


def _losses(workdir):
  return [r['loss'] for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'loss' in r]


def test_sharded_equals_single_device(tmp_path):
  # SGD: some gradients are zero in exact arithmetic (softmax ignores the key bias), and Adam
  # divides them by their own tiny norms, which turns the harmless reduction-order noise of a
  # different layout into O(lr) parameter differences.
  common = ['--config.train.steps=6', '--config.train.log_every=1', '--config.optim.name=sgd',
            '--config.optim.lr=0.05', '--config.train.checkpoint_every=6', '--config.evals={}']
  layouts = {'single': ['--config.mesh.data=1'],
             'data4_fsdp2': ['--config.mesh.data=4', '--config.mesh.fsdp=2']}
  results = {}
  for name, mesh in layouts.items():
    config = smoke_config(*common, *mesh)
    state = train.train_and_evaluate(config, str(tmp_path / name))
    if name == 'data4_fsdp2':
      specs = [x.sharding.spec for x in jax.tree.leaves(state['params'])]
      assert any('fsdp' in str(s) for s in specs), 'fsdp rules sharded nothing'
    results[name] = jax.tree.map(np.asarray, jax.device_get(state['params']))
  assert_trees(results['single'], results['data4_fsdp2'], exact=False, rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(_losses(tmp_path / 'single'), _losses(tmp_path / 'data4_fsdp2'),
                             rtol=1e-4)


def test_init_from_loads_another_runs_params(tmp_path):
  small = ['--config.train.steps=2', '--config.train.checkpoint_every=2', '--config.evals={}',
           '--config.mesh.data=1']
  train.train_and_evaluate(smoke_config(*small), str(tmp_path / 'a'))
  source = params_of(str(tmp_path / 'a'))
  config = smoke_config('--config.train.steps=0', '--config.train.checkpoint_every=1',
                        '--config.evals={}', f'--config.init_from={tmp_path / "a"}')
  state = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert_trees(source, jax.device_get(state['params']))


def test_bfloat16_compute_keeps_float32_params_and_writes_config_json(tmp_path):
  config = smoke_config('--config.train.steps=2', '--config.evals={}', '--config.mesh.data=1',
                        '--config.model.dtype=bfloat16', '--config.train.log_every=1')
  state = train.train_and_evaluate(config, str(tmp_path))
  assert {x.dtype for x in jax.tree.leaves(state['params'])} == {np.dtype('float32')}
  assert all(np.isfinite(loss) for loss in _losses(tmp_path))
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  assert saved['train']['steps'] == 2 and saved['model']['dtype'] == 'bfloat16'


@pytest.mark.parametrize('model', ['unet', 'dit'])
def test_shapes_experiment_trains_through_the_engine(tmp_path, model, request):
  if model == 'unet':  # The session's shared run (ControlNet tests build on it).
    tmp_path, config, state = request.getfixturevalue('shapes_diffusion_run')
  else:
    spec = os.path.join(REPO, 'experiments', f'shapes_diffusion.py:smoke=True,model={model}')
    config = zoo_config.load(spec, ['--config.evals.samples.per_label=1', '--config.mesh.data=1'])
    state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state['step']) == config.train.steps
  rows = [r for r in metrics.read_jsonl(tmp_path / 'metrics.jsonl') if 'loss' in r]
  assert rows and all(np.isfinite(r['loss']) for r in rows)
  grid = np.asarray(PIL.Image.open(tmp_path / 'samples' / f'step_{config.train.steps:06d}.png'))
  assert grid.shape == (8 * 33 + 1, 1 * 33 + 1, 3)  # one RGB 32x32 sample per shape class


def test_dit_controlnet_trains_over_a_dit_run(tmp_path):
  base = tmp_path / 'base'
  spec = os.path.join(REPO, 'experiments', 'shapes_diffusion.py:smoke=True,model=dit')
  quiet = ['--config.evals={}', '--config.mesh.data=1', '--config.train.steps=2',
           '--config.train.checkpoint_every=2']
  train.train_and_evaluate(zoo_config.load(spec, quiet), str(base))
  spec = os.path.join(REPO, 'experiments',
                      f'control_pose_shapes.py:smoke=True,model=dit,base={base}')
  state = train.train_and_evaluate(zoo_config.load(spec, quiet), str(tmp_path / 'pose'))
  control = state['params']['controlnet']
  assert {'pos_embed_input', 'controlnet_blocks_0', 'blocks_0'} <= set(control)
  assert 'blocks_1' not in control  # depth 2 -> the first block is copied
  assert np.abs(np.asarray(control['controlnet_blocks_0']['kernel'])).max() > 0


def test_a_seg_controlnet_over_the_one_object_dit_runs_its_evaluator(tmp_path):
  base = tmp_path / 'dit_shapes'
  quiet = ['--config.mesh.data=1', '--config.train.steps=2', '--config.train.checkpoint_every=2']
  train.train_and_evaluate(zoo_config.load(os.path.join(REPO, 'experiments',
                                                        'dit_shapes.py:smoke=True'),
                                           [*quiet, '--config.evals={}']), str(base))
  config = zoo_config.load(
      os.path.join(REPO, 'experiments', f'control_seg_shapes.py:smoke=True,on=dit_shapes,'
                   f'base={base}'), [*quiet, '--config.evals.control.steps=2'])
  assert (config.model.name, config.model.num_classes, config.data.label_key) == (
      'dit_controlnet', 64, 'shape_colour')
  assert config.evals.control.sampler == 'dpmpp_2m' and 'val' not in config.evals
  train.train_and_evaluate(config, str(tmp_path / 'seg'))
  rows = [r for r in metrics.read_jsonl(tmp_path / 'seg' / 'metrics.jsonl')
          if 'control/mean_iou' in r]
  assert rows and 0 <= rows[-1]['control/mean_iou'] <= 1
  with pytest.raises(ValueError, match="control_shapes on.*'dit_shapes'"):
    zoo_config.load(os.path.join(REPO, 'experiments', 'control_seg_shapes.py:on=unet_shapes'))


def test_the_cpu_init_draws_op_by_op_what_the_jitted_init_draws():
  config = smoke_config('--config.mesh.data=2')
  batch = {'image': ((4, 16, 16, 1), np.float32), 'label': ((4,), np.int32)}
  s = train.setup(config, batch)
  rng = jax.random.PRNGKey(0)
  state = s.init(rng)  # The test devices are CPUs: params drawn op by op (zoo/eager.py).
  zeros = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in batch.items()}
  jitted = jax.jit(lambda r: nn.unbox(train.init_state(r, zeros, task=s.task, tx=s.tx)))(rng)
  assert_trees(jax.device_get(state), jax.device_get(jitted), exact=False, rtol=0, atol=1e-6)
  for x, want in zip(jax.tree.leaves(state), jax.tree.leaves(s.state_shardings)):
    assert x.sharding == want
  buffers = [x.addressable_shards[0].data.unsafe_buffer_pointer() for x in jax.tree.leaves(
      (state['params'], state['ema_params']))]
  assert len(set(buffers)) == len(buffers)  # Donating both to train_step must be possible.
  # Parts about to be loaded are not drawn: zeros; the rest is the same.
  first, *rest = sorted(state['params'])
  skipped = s.init(rng, skip=(first,))
  assert all(not np.any(x) for x in jax.tree.leaves(jax.device_get(skipped['params'][first])))
  for key in rest:
    assert_trees(jax.device_get(skipped['params'][key]), jax.device_get(state['params'][key]))
  # What makes it cheap: the forward pass Flax's init runs to infer shapes is pruned away.
  # The init is traced once, by `setup`, for the shapes and for these draws.
  primitives = lambda jaxpr: {e.primitive.name for e in jaxpr.eqns}
  assert 'conv_general_dilated' in primitives(s.init_jaxpr.jaxpr)
  assert 'conv_general_dilated' not in primitives(eager.prune(s.init_jaxpr.jaxpr))
