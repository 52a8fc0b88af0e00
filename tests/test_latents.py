"""Pre-computed latents (`zoo latents`): written once as a TFDS dataset, read by the pipeline,
equal to encoding each batch, and refused when another VAE wrote them."""

import os

import jax
import numpy as np
import pytest

import data as data_lib
from data import latents as latents_data
from zoo import config as zoo_config
from zoo import latents
from zoo import main as zoo_main
from zoo import tasks
from zoo import train
from zoo.evals import adherence
from zoo.evals import generation

from conftest import REPO

LDM = os.path.join(REPO, 'experiments', 'ldm_t2i_shapes.py')
VAE = os.path.join(REPO, 'experiments', 'vae_shapes.py')
# One device: a run laid over the 8 test devices computes every call 8 times on 2 cores.
QUIET = ['--config.train.progress_bar=false', '--config.mesh.data=1']


def train_vae(workdir, seed=0):
  config = zoo_config.load(f'{VAE}:smoke=True,steps=2', QUIET + [f'--config.seed={seed}'])
  config.evals = zoo_config.ConfigDict()
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def written(tmp_path_factory, vae_smoke_run):
  """(vae workdir, latents dir): a smoke VAE and its latents of tiny64's train and validation."""
  root = tmp_path_factory.mktemp('latents')
  vae_dir = str(vae_smoke_run[0])
  out = str(root / 'latents')
  argv = ['latents', '--config', f'{LDM}:smoke=True,vae={vae_dir}', '--out', out,
          '--batch-size', '48']
  assert zoo_main.main(argv) == 0
  return vae_dir, out


def ldm_config(vae_dir, latents_dir=''):
  config = zoo_config.load(f'{LDM}:smoke=True,steps=2,vae={vae_dir},latents={latents_dir}',
                           QUIET)
  config.evals = zoo_config.ConfigDict()
  return config


def test_latents_are_the_vae_posterior_of_each_record(written):
  vae_dir, out = written
  config = ldm_config(vae_dir, out)
  assert config.data.name == 'tfds:zoo_latents' and config.task.latent_key == 'moments'
  batch = next(iter(data_lib.get_dataset(config.data, split='validation', seed=0,
                                         global_batch_size=16)))
  source = ldm_config(vae_dir)  # The same stream from the source dataset.
  source_batch = next(iter(data_lib.get_dataset(source.data, split='validation', seed=0,
                                                global_batch_size=16)))
  np.testing.assert_array_equal(batch['image'], source_batch['image'])
  np.testing.assert_array_equal(batch['tokens'], source_batch['tokens'])
  task = tasks.build(source)
  params = latents._load_vae(task, batch['image'].shape[1:])
  mean, logvar = task.vae.apply({'params': params}, batch['image'], method='encode')
  assert batch['moments'].shape == (16, *task.image_shape[:2], 2 * task.image_shape[2])
  # Written at another batch size: XLA:CPU's convolutions block the work differently, so the
  # float32 sums differ in their last bits (up to ~6e-5 through the encoder's layers).
  np.testing.assert_allclose(batch['moments'], np.concatenate([mean, logvar], -1), atol=1e-4)
  # Without the per-batch encoder the loss is the same, for the same random draws.
  s = train.setup(config, {k: (v.shape, v.dtype) for k, v in batch.items()})
  state = s.init(jax.random.PRNGKey(0))
  full = jax.device_get(dict(state['params'], vae=params))
  rng = jax.random.PRNGKey(3)
  cached, _ = s.task.loss(full, batch, rng)
  encoded, _ = task.loss(full, {k: v for k, v in batch.items() if k != 'moments'}, rng)
  np.testing.assert_allclose(cached, encoded, rtol=1e-5)


def test_a_run_trains_on_latents_of_its_vae_only(written, tmp_path):
  vae_dir, out = written
  state = train.train_and_evaluate(ldm_config(vae_dir, out), str(tmp_path / 'ldm'))
  assert int(state['step']) == 2
  other = train_vae(str(tmp_path / 'other_vae'), seed=1)
  with pytest.raises(ValueError, match='were encoded by the VAE of'):
    train.train_and_evaluate(ldm_config(other, out), str(tmp_path / 'bad'))


def test_bad_latents_fail_with_the_path_before_training(written, tmp_path):
  vae_dir, out = written
  with pytest.raises(FileNotFoundError, match='zoo latents'):
    tasks.build(ldm_config(vae_dir, str(tmp_path / 'nowhere')))
  config = ldm_config(vae_dir, out)
  config.task.vae.layers_per_block = 2
  with pytest.raises(ValueError, match=r"another VAE architecture.*layers_per_block"):
    tasks.build(config)
  config = ldm_config(vae_dir, out)
  config.data.features = ()
  with pytest.raises(ValueError, match='latent_key'):
    zoo_config.validate(config)
  with pytest.raises(FileExistsError, match='already holds latents'):
    latents.precompute(ldm_config(vae_dir), out)
  config = ldm_config(vae_dir)
  config.data = zoo_config.ConfigDict(config.data.to_dict() | dict(
      builder_config='', mixture='tiny64:1,res64:1'))
  with pytest.raises(ValueError, match=r"config.data.mixture='tiny64:1,res64:1': latents"):
    latents.precompute(config, str(tmp_path / 'mixed'))
  assert latents_data.read_provenance(out)['splits'] == ['train', 'validation']


def test_evaluators_read_the_ground_truth_from_the_source(written):
  vae_dir, out = written
  config = ldm_config(vae_dir, out)
  source = latents.source_data(config.data)
  assert zoo_config.to_json(source) == zoo_config.to_json(ldm_config(vae_dir).data)
  real = generation.real_set(config.data, 'validation', 4, 0, 'test')
  assert 'objects' in real.examples[0] and 'moments' not in real.examples[0]
  cfg = zoo_config.ConfigDict(dict(
      type='adherence', split='validation', num_samples=4, batch_size=4, sampler='ddim',
      steps=2, guidance_scale=2.0, use_ema=True, seed=0, grid=0, upscale=1))
  config.evals.adherence = cfg
  zoo_config.validate(config)
  adherence.Adherence(cfg, task=tasks.build(config), config=config, workdir='/nonexistent')
