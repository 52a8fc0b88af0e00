"""KL autoencoder training (Stable Diffusion's first stage): reconstruction + KL + PatchGAN.

Legend: B batch, H/W image height/width, C image channels, h/w latent height/width, Z latent
channels, P/Q discriminator patch-logit grid.

The loss follows taming-transformers' `LPIPSWithDiscriminator` without LPIPS (no downloads)
and without the adaptive adversarial weight:

  generator     = recon + kl_weight * KL / (H*W*C) + gate * disc_weight * (-mean D(x_rec))
  discriminator = gate * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) / 2

`recon` is the per-element mean L1 or L2 on images in [-1, 1] and KL is summed over the latent
of each image, so dividing it by H*W*C makes `kl_weight` mean what it means in LDM/SD (where
both terms are per-image sums; SD uses 1e-6). Both terms are minimised by the loop's single
optimizer: the generator term sees the discriminator through `stop_gradient` and the
discriminator term sees a `stop_gradient` reconstruction, so each sends gradients only into
its own params. `gate` is 1 from step `disc_start` on (the loop passes the step to `loss`;
evaluators, which pass none, see the adversarial terms on).

The PatchGAN discriminator (`PatchDiscriminator`) lives here because only this objective uses
it; it is taming's `NLayerDiscriminator` with GroupNorm for BatchNorm (zoo has no batch stats).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo import config as zoo_config
from zoo import models
from zoo.models import vae as vae_lib
from zoo.nn import layers

RECON_LOSSES = ('l1', 'l2')
SCHEMA = {
    'name': str, 'recon': str, 'kl_weight': float, 'disc_weight': float, 'disc_start': int,
    'disc_channels': int, 'disc_layers': int,
}


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis: a B vector."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(axis=1)


def psnr(x01, y01):
  """Per-image PSNR in dB of images in [0, 1] (peak 1): a B vector."""
  mse = jnp.square(x01 - y01).reshape(x01.shape[0], -1).mean(axis=1)
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def to_unit(x):
  """Images in [-1, 1] (the pipeline's range) -> [0, 1], clipped."""
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


class PatchDiscriminator(nn.Module):
  """PatchGAN: `num_layers` 4x4 stride-2 convs, one 4x4 stride-1 conv, a 1-channel 4x4 conv.

  Widths channels * min(2**i, 8) as taming's `NLayerDiscriminator`; LeakyReLU(0.2); GroupNorm
  after every conv but the first and the last. Returns BxPxQ float32 logits.
  """
  channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x_BxHxWxC):
    pad = ((1, 1), (1, 1))
    h = layers.conv(self.channels, 4, strides=2, padding=pad, axes=(None, None, None, 'conv_out'),
                    name='conv_0')(x_BxHxWxC)
    h = nn.leaky_relu(h, 0.2)
    for i in range(1, self.num_layers + 1):
      width = self.channels * min(2 ** i, 8)
      h = layers.conv(width, 4, strides=2 if i < self.num_layers else 1, padding=pad,
                      name=f'conv_{i}')(h)
      h = layers.GroupNorm(math.gcd(32, width), 1e-5, name=f'norm_{i}')(h)
      h = nn.leaky_relu(h, 0.2)
    logits = layers.conv(1, 4, padding=pad, axes=(None, None, 'conv_in', None),
                         name=f'conv_{self.num_layers + 1}')(h)
    return logits[..., 0].astype(jnp.float32)


def patch_grid(resolution, num_layers):
  """Side of the discriminator's logit grid for square images (k4 p1: stride-1 convs drop 1)."""
  return resolution // 2 ** num_layers - 2


class VAETask:
  """`init`, `loss` and `predict['reconstruct' | 'encode' | 'decode']` for `AutoencoderKL`."""

  loss_takes_step = True  # The loop passes `step=` to `loss` (the adversary starts late).

  @staticmethod
  def check_config(config):
    task = config.task
    zoo_config.check_keys(task, 'task', SCHEMA)
    zoo_config.check_choice(task.recon, RECON_LOSSES, 'config.task.recon')
    for key in ('kl_weight', 'disc_weight', 'disc_start'):
      if task[key] < 0:
        raise ValueError(f'config.task.{key}={task[key]} must be >= 0')
    if task.disc_channels < 1 or task.disc_layers < 1:
      raise ValueError(f'config.task.disc_channels={task.disc_channels} and '
                       f'config.task.disc_layers={task.disc_layers} must be >= 1')
    if task.disc_weight > 0 and patch_grid(config.data.resolution, task.disc_layers) < 1:
      raise ValueError(f'config.task.disc_layers={task.disc_layers} leaves no discriminator '
                       f'patches at config.data.resolution={config.data.resolution}: need '
                       f'resolution / 2**disc_layers >= 3')
    zoo_config.check_choice(config.model.get('name', None), ('vae',), 'config.model.name')
    models.check_config(config.model, config.data.resolution)

  def __init__(self, config):
    self.model = models.build(config.model)
    self.cfg = config.task
    self.image_shape = (config.data.resolution, config.data.resolution, config.model.in_channels)
    self.disc = (PatchDiscriminator(self.cfg.disc_channels, self.cfg.disc_layers)
                 if self.cfg.disc_weight > 0 else None)
    self.predict = {'reconstruct': jax.jit(self.reconstruct), 'encode': jax.jit(self.encode),
                    'decode': jax.jit(self.decode)}

  def init(self, rng, batch):
    """Boxed params {'vae': ...} (+ 'discriminator' when disc_weight > 0)."""
    x = batch['image']
    if x.shape[1:] != self.image_shape:
      raise ValueError(f'data images are {x.shape[1:]} but the model expects {self.image_shape} '
                       '(config.data.resolution, config.model.in_channels)')
    rng_vae, rng_disc = jax.random.split(rng)
    params = {'vae': self.model.init({'params': rng_vae}, x)['params']}
    if self.disc is not None:
      params['discriminator'] = self.disc.init({'params': rng_disc}, x)['params']
    return params

  def loss(self, params, batch, rng, train=True, step=None):
    """Generator + discriminator loss and metrics; `step` (int array) gates the adversary.

    The loop passes `step` (`loss_takes_step`); without one (evaluators) the gate is open.
    """
    del train  # The VAE and the discriminator have no dropout.
    g_loss, d_loss, metrics = self.losses(params, batch, rng, step)
    loss = g_loss + d_loss
    return loss, {**metrics, 'loss': loss}

  def losses(self, params, batch, rng, step=None):
    """(generator loss, discriminator loss, metrics); each loss reaches only its own params."""
    x = batch['image']
    recon, mean, logvar = self.model.apply({'params': params['vae']}, x, rng=rng)
    err = recon - x
    rec_B = (jnp.abs(err) if self.cfg.recon == 'l1' else jnp.square(err)).reshape(
        x.shape[0], -1).mean(axis=1)
    kl_B = kl_divergence(mean, logvar)
    g_loss = jnp.mean(rec_B + self.cfg.kl_weight * kl_B / math.prod(x.shape[1:]))
    metrics = {'recon': rec_B.mean(), 'kl': kl_B.mean(),
               'psnr': psnr(to_unit(recon), to_unit(x)).mean()}
    if self.disc is None:
      return g_loss, jnp.zeros((), jnp.float32), metrics
    gate = self._gate(step)
    frozen_disc = {'params': jax.lax.stop_gradient(params['discriminator'])}
    g_adv = -self.disc.apply(frozen_disc, recon).mean()
    real_BxPxQ = self.disc.apply({'params': params['discriminator']}, x)
    fake_BxPxQ = self.disc.apply({'params': params['discriminator']},
                                 jax.lax.stop_gradient(recon))
    d_loss = 0.5 * (jax.nn.relu(1.0 - real_BxPxQ).mean() + jax.nn.relu(1.0 + fake_BxPxQ).mean())
    metrics |= {'g_adv': g_adv, 'd_loss': d_loss, 'disc_gate': gate,
                'd_real_acc': (real_BxPxQ > 0).mean(), 'd_fake_acc': (fake_BxPxQ < 0).mean()}
    return g_loss + gate * self.cfg.disc_weight * g_adv, gate * d_loss, metrics

  def _gate(self, step):
    if step is None:
      return jnp.ones((), jnp.float32)
    return (jnp.asarray(step) >= self.cfg.disc_start).astype(jnp.float32)

  def encode(self, params, images):
    """(mean, logvar) of the un-scaled posterior for images in [-1, 1] (BxHxWxC -> BxhxwxZ)."""
    return self.model.apply({'params': params['vae']}, images, method='encode')

  def decode(self, params, z_BxhxwxZ):
    """Images in [0, 1] from un-scaled latents (`vae.from_latent` undoes the scaling)."""
    return to_unit(self.model.apply({'params': params['vae']}, z_BxhxwxZ, method='decode'))

  def reconstruct(self, params, images):
    """Images in [0, 1] decoded from the posterior mean of images in [-1, 1]."""
    mean, _ = self.encode(params, images)
    return self.decode(params, vae_lib.sample_posterior(mean, None))

  # Tasks are static arguments of jitted functions: identity hashing is what we want.
  __hash__ = object.__hash__
