"""Image classification: softmax cross-entropy on `config.data.label_key`.

`predict['logits'](params, images_BxHxWxC)` and `predict['features'](params, images_BxHxWxC)`
(the pooled penultimate features, what FD-zoo compares) take images in [-1, 1], as the data
pipeline emits them.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from zoo import config as zoo_config
from zoo import models

CLASSIFIERS = ('classifier', 'vit')
SCHEMA = {'name': str, 'label_smoothing': float, 'flip_lr': bool}


class ClassificationTask:
  """`init`, `loss` (cross-entropy, accuracy) and `predict['logits' | 'features']`."""

  conditioning = 'none'  # Not a generator; see zoo/evals/generation.py.

  @staticmethod
  def check_config(config):
    task = config.task
    zoo_config.check_keys(task, 'task', SCHEMA)
    if not 0.0 <= task.label_smoothing < 1.0:
      raise ValueError(f'config.task.label_smoothing={task.label_smoothing} must lie in [0, 1)')
    zoo_config.check_choice(config.model.get('name', None), CLASSIFIERS, 'config.model.name')
    models.check_config(config.model, config.data.resolution)
    if config.model.num_classes < 2:
      raise ValueError(f'config.model.num_classes={config.model.num_classes} must be >= 2 for '
                       'classification')
    if not config.data.label_key:
      raise ValueError('config.task.name=classification needs labels: set config.data.label_key')

  def __init__(self, config):
    self.model = models.build(config.model)
    self.cfg = config.task
    self.num_classes = config.model.num_classes
    self.image_shape = (config.data.resolution, config.data.resolution, config.model.in_channels)
    self.predict = {'logits': self.logits, 'features': self.features}

  def init(self, rng, batch):
    """Boxed (logically partitioned) params for a batch of this shape."""
    x = batch['image']
    if x.shape[1:] != self.image_shape:
      raise ValueError(f'data images are {x.shape[1:]} but the model expects {self.image_shape} '
                       '(config.data.resolution, config.model.in_channels)')
    return self.model.init({'params': rng}, x)['params']

  def loss(self, params, batch, rng, train=True):
    """Mean (label-smoothed) cross-entropy and the batch accuracy.

    With `flip_lr`, training images are mirrored left-right at random (every shapes class is
    left-right symmetric, so labels stay true; other datasets may not be).
    """
    rng_flip, rng_dropout = jax.random.split(rng)
    x = batch['image']
    if train and self.cfg.flip_lr:
      flip_B = jax.random.bernoulli(rng_flip, 0.5, x.shape[:1])
      x = jnp.where(flip_B[:, None, None, None], x[:, :, ::-1], x)
    logits = self.model.apply({'params': params}, x, train=train,
                              rngs={'dropout': rng_dropout}).astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], self.num_classes),
                                  self.cfg.label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    accuracy = (logits.argmax(-1) == batch['label']).mean()
    return loss, {'loss': loss, 'accuracy': accuracy}

  def logits(self, params, images_BxHxWxC):
    """Class logits BxK (float32) of images in [-1, 1]."""
    return _apply(self, params, images_BxHxWxC, features=False)

  def features(self, params, images_BxHxWxC):
    """Pooled penultimate features BxF (float32) of images in [-1, 1]."""
    return _apply(self, params, images_BxHxWxC, features=True)[1]

  # Tasks are static arguments of jitted functions: identity hashing is what we want.
  __hash__ = object.__hash__


@functools.partial(jax.jit, static_argnames=('task', 'features'))
def _apply(task, params, images_BxHxWxC, *, features):
  return task.model.apply({'params': params}, jnp.asarray(images_BxHxWxC, jnp.float32),
                          features=features)
