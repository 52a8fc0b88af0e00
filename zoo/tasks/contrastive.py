"""Contrastive image-text training of a dual encoder: CLIP's softmax and SigLIP's sigmoid losses.

Legend: B global batch, b per-device batch (B / n), n devices along the data axes ('data' and
'fsdp' of the mesh), E embedding width.

The losses take L2-normalised embeddings, the temperature `scale` (exp of the learned log
scale) and, for the sigmoid loss, the `bias`:

  softmax (CLIP)   logits = scale img txt^T over the whole global batch; the mean of the
                   image->text and text->image cross-entropies with the diagonal as labels;
  sigmoid (SigLIP) -sum_ij log sigmoid(z_ij (scale img_i . txt_j + bias)) / B, z = +1 on the
                   diagonal and -1 elsewhere (big_vision's normalisation: per image, summed
                   over all texts).

Under the loop's `jax.jit` the embeddings are global arrays sharded over the batch, so the dense
forms let XLA gather them and every device holds the BxB logits. The chunked sigmoid form
(`sigmoid_loss_chunked`, big_vision's `chunked` / the SigLIP paper's efficient loss) runs under
`shard_map` instead: each device keeps its b images and the text embeddings travel around a
ring of `ppermute`s, so a device never holds more than b x b logits, in the forward pass and,
through its own VJP, in the backward pass.

The task (`config.task`): `loss` 'softmax' works with either model kind (a SigLIP model's
bias then does nothing: a softmax ignores a shift shared by a row, so the bias gets no
gradient); 'sigmoid' needs kind 'siglip', because it needs the learned bias. `chunked` picks the
ring form of the sigmoid loss. With `train.grad_accum` > 1 each micro-batch is its own contrast
set (fewer negatives than the global batch). LiT: see `ContrastiveTask`.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from data import captions
from zoo import checkpoint
from zoo import config as zoo_config
from zoo import models
from zoo import sharding


def _similarities(img_BxE, txt_BxE):
  return jnp.einsum('ie,je->ij', img_BxE, txt_BxE, preferred_element_type=jnp.float32)


def softmax_loss(img_BxE, txt_BxE, scale):
  """CLIP's symmetric cross-entropy over all pairs of the (global) batch."""
  logits_BxB = scale * _similarities(img_BxE, txt_BxE)
  labels_B = jnp.arange(logits_BxB.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits_BxB, labels_B).mean()
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits_BxB.T, labels_B).mean()
  return 0.5 * (i2t + t2i)


def _pair_signs(rows, cols, diagonal):
  """z: -1 everywhere, +1 on the diagonal when this block pairs images with their own texts."""
  if not diagonal:
    return jnp.full((rows, cols), -1.0, jnp.float32)
  return 2.0 * jnp.eye(rows, cols, dtype=jnp.float32) - 1.0


def _sigmoid_sum(img_bxE, txt_bxE, scale, bias, diagonal):
  logits_bxb = scale * _similarities(img_bxE, txt_bxE) + bias
  z_bxb = _pair_signs(*logits_bxb.shape, diagonal)
  return -jnp.sum(jax.nn.log_sigmoid(z_bxb * logits_bxb))


def sigmoid_loss(img_BxE, txt_BxE, scale, bias):
  """SigLIP's pairwise sigmoid loss, dense: the BxB logits of the (global) batch at once."""
  return _sigmoid_sum(img_BxE, txt_BxE, scale, bias, True) / img_BxE.shape[0]


def data_axes(mesh):
  """The mesh axes the batch is split over (those of `sharding.BATCH_AXES` the mesh has)."""
  return tuple(a for a in sharding.BATCH_AXES if a in mesh.axis_names)


def _ring_size(mesh):
  return math.prod(mesh.shape[a] for a in data_axes(mesh))


def _shift(x, axes, n):
  """Sends each device's block to the next device of the ring over `axes`."""
  return jax.lax.ppermute(x, axes, perm=[(i, (i + 1) % n) for i in range(n)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring_sigmoid_sum(img_bxE, txt_bxE, scale, bias, axes, n):
  """This device's images against every text block: the sum of their b x B loss terms."""
  total = _sigmoid_sum(img_bxE, txt_bxE, scale, bias, True)

  def step(carry, _):
    txt_j, total = carry
    txt_j = _shift(txt_j, axes, n)
    return (txt_j, total + _sigmoid_sum(img_bxE, txt_j, scale, bias, False)), None

  (_, total), _ = jax.lax.scan(step, (txt_bxE, total), None, length=n - 1)
  return total


def _ring_fwd(img_bxE, txt_bxE, scale, bias, axes, n):
  return _ring_sigmoid_sum(img_bxE, txt_bxE, scale, bias, axes, n), (img_bxE, txt_bxE, scale,
                                                                       bias)


def _block_grads(g, img_bxE, txt_bxE, scale, bias, diagonal):
  """(d img, d txt, d scale, d bias) of g * one block's loss sum."""
  sims_bxb = _similarities(img_bxE, txt_bxE)
  z_bxb = _pair_signs(*sims_bxb.shape, diagonal)
  # d/dl of -log sigmoid(z l) is -z sigmoid(-z l).
  dlogits_bxb = -g * z_bxb * jax.nn.sigmoid(-z_bxb * (scale * sims_bxb + bias))
  d_img = scale * dlogits_bxb @ txt_bxE
  d_txt = scale * dlogits_bxb.T @ img_bxE
  return d_img, d_txt, jnp.sum(dlogits_bxb * sims_bxb), jnp.sum(dlogits_bxb)


def _ring_bwd(axes, n, residuals, g):
  # The text gradient accumulates in a block that travels with its text block around the ring;
  # one last shift brings it home. Memory stays b x b, as in the forward pass.
  img_bxE, txt_bxE, scale, bias = residuals
  d_img, d_txt, d_scale, d_bias = _block_grads(g, img_bxE, txt_bxE, scale, bias, True)

  def step(carry, _):
    txt_j, d_txt_j, d_img, d_scale, d_bias = carry
    txt_j, d_txt_j = _shift((txt_j, d_txt_j), axes, n)
    di, dt, ds, db = _block_grads(g, img_bxE, txt_j, scale, bias, False)
    return (txt_j, d_txt_j + dt, d_img + di, d_scale + ds, d_bias + db), None

  (_, d_txt, d_img, d_scale, d_bias), _ = jax.lax.scan(
      step, (txt_bxE, d_txt, d_img, d_scale, d_bias), None, length=n - 1)
  return d_img, _shift(d_txt, axes, n), d_scale, d_bias


_ring_sigmoid_sum.defvjp(_ring_fwd, _ring_bwd)


def sigmoid_loss_chunked(img_BxE, txt_BxE, scale, bias, mesh):
  """`sigmoid_loss` with per-device memory O(b^2): text blocks travel around the data axes.

  Equal to the dense loss in value and gradient. On a mesh whose data axes hold one device it
  is the dense loss.
  """
  axes, n = data_axes(mesh), _ring_size(mesh)
  if n == 1:
    return sigmoid_loss(img_BxE, txt_BxE, scale, bias)

  def body(img_bxE, txt_bxE, scale, bias):
    # Varying copies: each device's VJP returns its share of d scale / d bias, and the
    # transpose of this cast sums the shares.
    scale, bias = jax.lax.pcast((scale, bias), axes, to='varying')
    total = _ring_sigmoid_sum(img_bxE, txt_bxE, scale, bias, axes, n)
    return jax.lax.psum(total, axes) / (n * img_bxE.shape[0])

  batch = P(axes)
  return jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, P(), P()), out_specs=P())(
      img_BxE, txt_BxE, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32))


def _own_and_best_other(img_bxE, txt_bxE):
  sims_bxb = _similarities(img_bxE, txt_bxE)
  eye_bxb = jnp.eye(*sims_bxb.shape, dtype=bool)
  return jnp.diagonal(sims_bxb), jnp.max(jnp.where(eye_bxb, -jnp.inf, sims_bxb), axis=1)


def image_to_text_accuracy(img_BxE, txt_BxE):
  """Fraction of images whose own text is strictly the most similar in the batch."""
  own_B, best_other_B = _own_and_best_other(img_BxE, txt_BxE)
  return jnp.mean(own_B > best_other_B)


def image_to_text_accuracy_chunked(img_BxE, txt_BxE, mesh):
  """`image_to_text_accuracy` over the ring of text blocks (never a BxB array)."""
  axes, n = data_axes(mesh), _ring_size(mesh)
  if n == 1:
    return image_to_text_accuracy(img_BxE, txt_BxE)

  def body(img_bxE, txt_bxE):
    own_b, best_b = _own_and_best_other(img_bxE, txt_bxE)

    def step(carry, _):
      txt_j, best_b = carry
      txt_j = _shift(txt_j, axes, n)
      return (txt_j, jnp.maximum(best_b, _similarities(img_bxE, txt_j).max(axis=1))), None

    (_, best_b), _ = jax.lax.scan(step, (txt_bxE, best_b), None, length=n - 1)
    hits = jnp.sum(own_b > best_b, dtype=jnp.float32)
    return jax.lax.psum(hits, axes) / (n * img_bxE.shape[0])

  batch = P(axes)
  return jax.shard_map(body, mesh=mesh, in_specs=(batch, batch), out_specs=P())(
      img_BxE, txt_BxE)


# ---------------------------------------------------------------------------------------------
# The task.

LOSSES = ('softmax', 'sigmoid')
MODELS = ('dual_encoder',)
SCHEMA = {'name': str, 'loss': str, 'chunked': bool, 'image_from': str, 'image_subtree': str,
          'lock_image': bool}
# OpenCLIP clamps the learned temperature at 100 (openai/CLIP#46); softmax loss only.
MAX_SOFTMAX_SCALE = 100.0
# A ViT classifier run's parameters that a dual encoder's image tower does not have.
CLASSIFIER_KEYS = ('classifier',)


# Tower fields that change neither the params nor the function (compute settings).
_COMPUTE_FIELDS = ('num_classes', 'dtype', 'remat')


def _text_fields(config):
  return models.fields('text') | dict(config.model.text)


def _check_text(config):
  if 'text' not in config.data:
    raise ValueError('the contrastive task needs captions: set config.data.text '
                     f'({captions.SCHEMA_HINT})')
  text_kw = _text_fields(config)
  if config.data.text.max_len > text_kw['max_len']:
    raise ValueError(f'config.data.text.max_len={config.data.text.max_len} exceeds '
                     f"config.model.text.max_len={text_kw['max_len']}")
  tokenizer = captions.build_tokenizer(config.data.text)
  if tokenizer.vocab_size > text_kw['vocab_size']:
    raise ValueError(f'config.data.text.tokenizer={config.data.text.tokenizer!r} has '
                     f'{tokenizer.vocab_size} ids but config.model.text.vocab_size is '
                     f"{text_kw['vocab_size']}")
  if text_kw['pool'] == 'eos' and text_kw['eos_token_id'] != tokenizer.eos_id:
    raise ValueError(f"config.model.text.eos_token_id={text_kw['eos_token_id']} must be the "
                     f"tokenizer's EOS id {tokenizer.eos_id} for pool='eos'")


def _check_loss(config):
  task = config.task
  zoo_config.check_choice(task.loss, LOSSES, 'config.task.loss')
  kind = (models.fields('dual_encoder') | models.kwargs(config.model))['kind']
  if task.loss == 'sigmoid' and kind != 'siglip':
    raise ValueError(f"config.task.loss='sigmoid' needs config.model.kind='siglip': it needs "
                     f'the learned logit_bias (SigLIP b, which balances one positive against '
                     f"B - 1 negatives) and kind={kind!r} has none; use loss='softmax'")
  if task.chunked and task.loss != 'sigmoid':
    raise ValueError("config.task.chunked=True is for loss='sigmoid' (the softmax needs every "
                     'logit of a row at once)')


# Where a run's image tower sits in its params, by the run's model.
TOWER_SUBTREES = {'dual_encoder': 'vision_model', 'vit': ''}


def source_tower(workdir, key='config.task.image_from'):
  """(model name, ViT fields) of the image tower the run `workdir` trained (its config.json);
  `key` names the setting that points there, for the errors."""
  model = zoo_config.run_config(workdir, key, 'train the image tower first (see '
                                'experiments/clip_shapes.py)').model
  if model.name == 'dual_encoder':
    return model.name, models.fields('vit') | dict(model.image)
  if model.name == 'vit':
    return model.name, models.fields('vit') | models.kwargs(model)
  raise ValueError(f'{key}={workdir!r} trained a {model.name!r}; the image tower comes from a '
                   f'{" or a ".join(map(repr, TOWER_SUBTREES))} run')


def _check_image_from(config, *, must_exist=False):
  """The tower of `image_from` against config.model.image, once that run exists.

  A config names its source run before the run is trained (experiment defaults point at
  workdirs/...): validation checks the tower when the run is there, building the task
  requires it.
  """
  task = config.task
  if not task.image_from:
    for key in ('lock_image', 'image_subtree'):
      if task[key]:
        raise ValueError(f'config.task.{key}={task[key]!r} needs config.task.image_from (the '
                         'run whose image tower to start from)')
    return
  if not must_exist and not os.path.isfile(os.path.join(task.image_from, 'config.json')):
    return
  name, source = source_tower(task.image_from)
  subtree = TOWER_SUBTREES[name]
  if task.image_subtree != subtree:
    raise ValueError(f'config.task.image_subtree={task.image_subtree!r}: the image tower of the '
                     f'{name!r} run {task.image_from!r} is at {subtree!r}')
  ours = models.fields('vit') | dict(config.model.image)
  differ = sorted(k for k in ours if k not in _COMPUTE_FIELDS and ours[k] != source.get(k))
  if differ:
    raise ValueError('config.model.image differs from the tower of config.task.image_from='
                     f'{task.image_from!r} in ' + ', '.join(
                         f'{k} ({ours[k]!r} here, {source.get(k)!r} there)' for k in differ))


def _ring_mesh(config):
  """The loop's mesh (the same devices, the same shape), for the ring of the chunked loss.

  Checked here rather than in `check_config`: counting devices starts the backend, which a
  multi-process run must not do before `jax.distributed.initialize`.
  """
  mesh = sharding.make_mesh(config.mesh)
  ring, micro = _ring_size(mesh), config.train.batch_size // config.train.grad_accum
  if micro % ring:
    raise ValueError(f'config.task.chunked=True splits each batch of {micro} examples '
                     f'(config.train.batch_size / grad_accum) over the {ring} devices of the '
                     f'data axes: make it a multiple of {ring}')
  return mesh


class ContrastiveTask:
  """`init`, `loss` (CLIP softmax or SigLIP sigmoid) and `predict['encode_image' | 'encode_text']`.

  LiT (locked-image tuning): `image_from` names a run whose image tower initialises
  `vision_model`, a dual encoder's (`image_subtree='vision_model'`) or a ViT classifier's
  (`image_subtree=''`, its `classifier` layer left out); `lock_image` freezes it (no updates,
  no optimizer state, no gradient computed through it).
  """

  conditioning = 'none'  # Not a generator; see zoo/evals/generation.py.

  @staticmethod
  def check_config(config):
    task = config.task
    zoo_config.check_keys(task, 'task', SCHEMA)
    zoo_config.check_choice(config.model.get('name', None), MODELS, 'config.model.name')
    models.check_config(config.model, config.data.resolution)
    _check_loss(config)
    _check_text(config)
    _check_image_from(config)

  def __init__(self, config):
    task = self.cfg = config.task
    self.model = models.build(config.model)
    self.tokenizer = captions.build_tokenizer(config.data.text)
    self.max_len = config.data.text.max_len
    self.mesh = _ring_mesh(config) if task.chunked else None
    self.frozen = ('vision_model',) if task.lock_image else ()
    self.pretrained = {}
    if task.image_from:
      _check_image_from(config, must_exist=True)
      self.pretrained['vision_model'] = checkpoint.Source(
          task.image_from, task.image_subtree, ignore=CLASSIFIER_KEYS)
    self.predict = {'encode_image': self.encode_image, 'encode_text': self.encode_text}

  def init(self, rng, batch):
    """Boxed params {vision_model, text_model, ...} for a batch of this shape."""
    return self.model.init({'params': rng}, batch['image'], batch['tokens'],
                           batch['tokens_mask'])['params']

  def loss(self, params, batch, rng, train=True):
    """The contrastive loss over the global batch, the in-batch image->text accuracy, scale, bias.

    The softmax loss clamps the temperature at MAX_SOFTMAX_SCALE, as OpenCLIP.
    """
    if 'vision_model' in self.frozen:
      params = {**params, 'vision_model': jax.lax.stop_gradient(params['vision_model'])}
    out = self.model.apply({'params': params}, batch['image'], batch['tokens'],
                           batch['tokens_mask'], train=train, rngs={'dropout': rng})
    img_BxE, txt_BxE, scale, bias = out['image'], out['text'], out['scale'], out['bias']
    if self.cfg.loss == 'softmax':
      scale = jnp.minimum(scale, MAX_SOFTMAX_SCALE)
      loss = softmax_loss(img_BxE, txt_BxE, scale)
    elif self.cfg.chunked:
      loss = sigmoid_loss_chunked(img_BxE, txt_BxE, scale, bias, self.mesh)
    else:
      loss = sigmoid_loss(img_BxE, txt_BxE, scale, bias)
    img_BxE, txt_BxE = jax.lax.stop_gradient((img_BxE, txt_BxE))
    if self.cfg.chunked:
      accuracy = image_to_text_accuracy_chunked(img_BxE, txt_BxE, self.mesh)
    else:
      accuracy = image_to_text_accuracy(img_BxE, txt_BxE)
    return loss, {'loss': loss, 'accuracy': accuracy, 'scale': scale, 'bias': bias}

  def encode_image(self, params, images_BxHxWxC):
    """L2-normalised image embeddings BxE (float32) of images in [-1, 1]."""
    return _encode_image(self, params, images_BxHxWxC)

  def encode_text(self, params, tokens_BxL, mask_BxL):
    """L2-normalised text embeddings BxE (float32); mask True = real token."""
    return _encode_text(self, params, tokens_BxL, mask_BxL)

  # Tasks are static arguments of jitted functions: identity hashing is what we want.
  __hash__ = object.__hash__


@functools.partial(jax.jit, static_argnames=('task',))
def _encode_image(task, params, images_BxHxWxC):
  return task.model.apply({'params': params}, jnp.asarray(images_BxHxWxC, jnp.float32),
                          method='encode_image')


@functools.partial(jax.jit, static_argnames=('task',))
def _encode_text(task, params, tokens_BxL, mask_BxL):
  return task.model.apply({'params': params}, jnp.asarray(tokens_BxL, jnp.int32),
                          jnp.asarray(mask_BxL, bool), method='encode_text')
