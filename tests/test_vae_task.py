"""The VAE task (ELBO + PatchGAN), the reconstruction evaluator and the vae_shapes experiment."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch

import data as data_lib
from zoo import config as zoo_config
from zoo import metrics
from zoo import sharding
from zoo import train
from zoo.evals import reconstruction
from zoo.tasks import vae as vae_task

from conftest import REPO

EXPERIMENT = os.path.join(REPO, 'experiments', 'vae_shapes.py')


def smoke(*overrides, arg='smoke=True'):
  base = ['--config.train.progress_bar=false']
  return zoo_config.load(f'{EXPERIMENT}:{arg}', base + list(overrides))


@pytest.fixture(scope='module')
def gan():
  """(task, params, batch) for a 16x16 VAE with a 2-layer PatchGAN."""
  config = smoke('--config.data.resolution=16', '--config.task.disc_layers=2',
                 '--config.task.disc_start=5', arg='smoke=True,disc=True')
  task = vae_task.VAETask(config)
  batch = {'image': jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1, maxval=1)}
  params = nn.unbox(jax.jit(task.init)(jax.random.key(1), batch))
  return task, params, batch


def test_experiments_load_and_validate():
  for arg in ('smoke=True', 'smoke=True,disc=True', '', 'disc=True'):
    config = zoo_config.validate(smoke(arg=arg))
    assert config.task.name == 'vae' and config.model.name == 'vae'
  config = smoke(arg='')
  task = vae_task.VAETask(config)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(task.init, jax.random.key(0), {'image': x})
  mean, logvar = jax.eval_shape(task.encode, nn.unbox(params), x)
  assert mean.shape == logvar.shape == (2, 16, 16, 4)  # f=4 latents of the default run.
  assert set(params) == {'vae'}


@pytest.mark.parametrize('override, needle', [
    ('--config.task.recon=l3', 'config.task.recon'),
    ('--config.task.kl_weight=-1.0', 'config.task.kl_weight'),
    ('--config.task.disc_layers=5', 'config.task.disc_layers'),
    ('--config.evals.recon.num_images=99', 'config.evals.recon.num_images'),
    ('--config.evals.recon.pairs_per_row=0', 'pairs_per_row'),
])
def test_bad_config_values_raise_naming_the_key(override, needle):
  with pytest.raises(ValueError, match=needle.replace('.', r'\.')):
    smoke(override, arg='smoke=True,disc=True')


def test_unknown_or_missing_task_keys_raise():
  config = smoke()
  config.task.kl_wieght = 1.0
  with pytest.raises(ValueError, match='kl_wieght'):
    zoo_config.validate(config)
  config = smoke()
  del config.task['disc_start']
  with pytest.raises(ValueError, match=r'config\.task\.disc_start is missing'):
    zoo_config.validate(config)
  config = smoke()
  config.model.name = 'unet'
  with pytest.raises(ValueError, match=r'config\.model\.name'):
    zoo_config.validate(config)


def test_kl_against_closed_form():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  logvar = rng.uniform(-4, 2, size=(3, 4, 4, 2)).astype(np.float32)
  posterior = torch.distributions.Normal(torch.from_numpy(mean),
                                         torch.from_numpy(np.exp(0.5 * logvar)))
  expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0))
  np.testing.assert_allclose(vae_task.kl_divergence(mean, logvar),
                             expected.sum(dim=(1, 2, 3)).numpy(), rtol=1e-5)
  np.testing.assert_array_equal(vae_task.kl_divergence(np.zeros_like(mean), np.zeros_like(mean)),
                                np.zeros(3, np.float32))


def test_generator_loss_is_recon_plus_weighted_kl():
  config = smoke('--config.data.resolution=16', '--config.task.kl_weight=0.5')
  task = vae_task.VAETask(config)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
  params = nn.unbox(task.init(jax.random.key(1), {'image': x}))
  loss, m = jax.jit(task.loss)(params, {'image': x}, jax.random.key(2))
  mean, logvar = task.encode(params, x)
  np.testing.assert_allclose(m['kl'], vae_task.kl_divergence(mean, logvar).mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, m['recon'] + 0.5 * m['kl'] / (16 * 16 * 3), rtol=1e-5)
  assert set(m) == {'loss', 'recon', 'kl', 'psnr'}
  recon = task.predict['reconstruct'](params, x)
  assert recon.shape == x.shape and 0.0 <= float(recon.min()) <= float(recon.max()) <= 1.0
  np.testing.assert_allclose(recon, task.decode(params, mean), atol=1e-5)


def _nonzero(tree, only=''):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [bool(np.any(np.asarray(g) != 0)) for path, g in flat
          if only in jax.tree_util.keystr(path)]


def test_generator_and_discriminator_gradients_are_separate(gan):
  task, params, batch = gan
  step = jnp.asarray(10)
  grad = lambda i: jax.jit(jax.grad(  # noqa: E731
      lambda p: task.losses(p, batch, jax.random.key(3), step)[i]))(params)
  g_grads, d_grads = grad(0), grad(1)
  assert not any(_nonzero(g_grads['discriminator']))
  assert not any(_nonzero(d_grads['vae']))
  # Conv biases right before a 1-channel-per-group GroupNorm get no gradient; kernels all do.
  assert all(_nonzero(d_grads['discriminator'], only='kernel'))
  assert sum(_nonzero(g_grads['vae'])) > len(_nonzero(g_grads['vae'])) // 2
  # The sum the loop differentiates is the two parts' gradients side by side.
  total = jax.jit(jax.grad(lambda p: task.loss(p, batch, jax.random.key(3), step=step)[0]))(params)
  for a, b in zip(jax.tree.leaves(total['discriminator']),
                  jax.tree.leaves(d_grads['discriminator'])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_adversary_is_gated_by_disc_start(gan):
  task, params, batch = gan
  rng = jax.random.key(3)
  before = task.losses(params, batch, rng, jnp.asarray(4))
  after = task.losses(params, batch, rng, jnp.asarray(5))
  assert float(before[1]) == 0.0 and float(after[1]) == float(after[2]['d_loss']) > 0
  np.testing.assert_allclose(after[0] - before[0], task.cfg.disc_weight * after[2]['g_adv'],
                             rtol=1e-4, atol=1e-6)
  assert 0.0 <= float(after[2]['d_real_acc']) <= 1.0
  assert task.loss_takes_step  # The loop passes its step; evaluators pass none: gate open.
  np.testing.assert_allclose(task.loss(params, batch, rng)[1]['d_loss'], after[2]['d_loss'],
                             rtol=1e-6)


class _ShiftTask:
  """Latent = image, decoder = image in [0, 1] + 0.1: PSNR 20 dB and L1 0.1 exactly."""

  predict = {
      'encode': lambda params, x: (x, jnp.full_like(x, -1e4)),
      'decode': lambda params, z: (z + 1.0) / 2.0 + 0.1,
  }


def test_reconstruction_evaluator_math_and_png(tmp_path):
  config = smoke('--config.evals.recon.num_batches=2', '--config.evals.recon.num_images=4',
                 '--config.evals.recon.pairs_per_row=2')
  cfg = config.evals.recon
  mesh = sharding.make_mesh(config.mesh)
  params = {'w': jax.device_put(jnp.zeros(()), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))}
  evaluator = reconstruction.Reconstruction(cfg, task=_ShiftTask(), config=config,
                                            workdir=str(tmp_path))
  out = evaluator.run({'params': params, 'ema_params': params}, 7)
  stream = data_lib.get_dataset(config.data, split='validation', seed=cfg.seed,
                                global_batch_size=cfg.batch_size)
  images = np.concatenate([next(stream)['image'] for _ in range(2)])
  np.testing.assert_allclose(out['psnr'], 20.0, rtol=1e-4)
  np.testing.assert_allclose(out['l1'], 0.1, rtol=1e-4)
  np.testing.assert_allclose(out['latent_mean'], images.mean(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out['latent_std'], images.std(), rtol=1e-4)
  np.testing.assert_allclose(out['latent_scale'], 1.0 / images.std(), rtol=1e-4)
  grid = np.asarray(PIL.Image.open(tmp_path / 'reconstructions' / 'step_000007.png'))
  assert grid.shape == (2 * 65 + 1, 4 * 65 + 1, 3)
  expected = metrics.image_grid(np.stack([(images[0] + 1) / 2, (images[0] + 1) / 2 + 0.1]), 2)
  np.testing.assert_array_equal(grid[:66, :131], expected[:66, :131])


def test_smoke_training_reduces_loss_and_writes_reconstructions(tmp_path):
  # 32x32 (the pipeline resizes tiny64) and no loss evaluator keep this a CPU-seconds test.
  config = smoke('--config.train.steps=30', '--config.train.checkpoint_every=30',
                 '--config.data.resolution=32')
  del config.evals['val']
  train.train_and_evaluate(config, str(tmp_path))
  rows = metrics.read_jsonl(tmp_path / 'metrics.jsonl')
  logged = [r for r in rows if 'recon' in r]
  assert [r['step'] for r in logged] == [5, 10, 15, 20, 25, 30]
  assert logged[-1]['recon'] < 0.8 * logged[0]['recon']
  assert logged[-1]['psnr'] > logged[0]['psnr'] + 1.0
  evaluated = next(r for r in rows if 'recon/psnr' in r)
  assert 5.0 < evaluated['recon/psnr'] < 60.0 and 0.0 < evaluated['recon/l1'] < 1.0
  assert evaluated['recon/latent_std'] > 0
  np.testing.assert_allclose(evaluated['recon/latent_scale'] * evaluated['recon/latent_std'], 1.0,
                             rtol=1e-6)
  assert os.path.isfile(tmp_path / 'reconstructions' / 'step_000030.png')
