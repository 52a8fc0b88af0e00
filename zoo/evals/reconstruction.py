"""Autoencoder reconstructions of the evaluation split: PSNR, L1, latent statistics and a PNG.

The latent std is that of posterior samples (what a latent diffusion model is trained on), so
`1 / latent_std` is the scaling factor SD picked the same way (0.18215 for its VAE).
"""

import os

import jax
import numpy as np

import data as data_lib
from zoo import metrics
from zoo import sharding
from zoo.models import vae as vae_lib

TASKS = ('vae',)  # Tasks with predict['encode'] and predict['decode'].


class Reconstruction:
  """Reconstructs `num_batches` evaluation batches; writes `workdir/reconstructions/step_N.png`.

  The grid shows the first `num_images` examples as original | reconstruction pairs, side by
  side, `pairs_per_row` pairs a row. Images are in [0, 1]; L1 and PSNR are on that scale.
  """

  SCHEMA = {'type': str, 'num_batches': int, 'batch_size': int, 'use_ema': bool, 'seed': int,
            'num_images': int, 'pairs_per_row': int, 'upscale': int}

  @staticmethod
  def check(cfg, config, where):
    task_name = config.task.get('name', None)
    if task_name not in TASKS:
      raise ValueError(f'{where}: type reconstruction needs config.task.name in {list(TASKS)}, '
                       f'got {task_name!r}')
    if cfg.num_batches < 1 or cfg.batch_size < 1:
      raise ValueError(f'{where}: num_batches and batch_size must be >= 1')
    if cfg.batch_size % jax.process_count():
      raise ValueError(f'{where}.batch_size={cfg.batch_size} is not divisible by the '
                       f'{jax.process_count()} processes')
    if not 0 <= cfg.num_images <= cfg.num_batches * cfg.batch_size:
      raise ValueError(f'{where}.num_images={cfg.num_images} must lie in '
                       f'[0, num_batches * batch_size={cfg.num_batches * cfg.batch_size}]')
    if cfg.pairs_per_row < 1 or cfg.upscale < 1:
      raise ValueError(f'{where}: pairs_per_row and upscale must be >= 1')

  def __init__(self, cfg, *, task, config, workdir):
    self.cfg, self.task, self.data_cfg = cfg, task, config.data
    self.outdir = os.path.join(workdir, 'reconstructions')

  def _batches(self, mesh):
    cfg = self.cfg
    stream = data_lib.get_dataset(
        self.data_cfg, split=self.data_cfg.eval_split, seed=cfg.seed,
        global_batch_size=cfg.batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), repeat=True)
    for _ in range(cfg.num_batches):
      yield sharding.global_batch(next(stream), sharding.batch_sharding(mesh))['image']

  def run(self, state, step):
    """{'psnr', 'l1', 'latent_mean', 'latent_std', 'latent_scale'} over the batches."""
    cfg = self.cfg
    params = state['ema_params' if cfg.use_ema else 'params']
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    rng = jax.random.PRNGKey(cfg.seed)
    originals, recons, latents = [], [], []
    for i, images in enumerate(self._batches(mesh)):
      mean, logvar = self.task.predict['encode'](params, images)
      z = vae_lib.sample_posterior(mean, logvar, jax.random.fold_in(rng, i))
      recon = self.task.predict['decode'](params, mean)
      x01, recon01, z = sharding.host_gather(((images + 1.0) / 2.0, recon, z))
      originals.append(np.clip(x01, 0.0, 1.0))
      recons.append(recon01)
      latents.append(z)
    return self._summarise(step, np.concatenate(originals), np.concatenate(recons),
                           np.concatenate(latents))

  def _summarise(self, step, x_NxHxWxC, y_NxHxWxC, z_NxhxwxZ):
    err = (y_NxHxWxC - x_NxHxWxC).reshape(len(x_NxHxWxC), -1)
    mse_N = np.maximum(np.mean(np.square(err), axis=1), 1e-10)
    std = float(z_NxhxwxZ.std())
    if jax.process_index() == 0 and self.cfg.num_images:
      self._write_grid(step, x_NxHxWxC, y_NxHxWxC)
    return {'psnr': float(np.mean(-10.0 * np.log10(mse_N))), 'l1': float(np.abs(err).mean()),
            'latent_mean': float(z_NxhxwxZ.mean()), 'latent_std': std,
            'latent_scale': 1.0 / max(std, 1e-12)}

  def _write_grid(self, step, x_NxHxWxC, y_NxHxWxC):
    n = self.cfg.num_images
    pairs_2NxHxWxC = np.stack([x_NxHxWxC[:n], y_NxHxWxC[:n]], axis=1).reshape(
        2 * n, *x_NxHxWxC.shape[1:])
    path = os.path.join(self.outdir, f'step_{step:06d}.png')
    metrics.save_image_grid(pairs_2NxHxWxC, path, ncols=2 * min(self.cfg.pairs_per_row, n),
                            upscale=self.cfg.upscale)
