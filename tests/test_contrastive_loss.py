"""Contrastive losses on 8 fake devices: global-batch softmax, dense and chunked sigmoid.

Each loss is checked against a float64 numpy reference (value and analytic gradients w.r.t.
both embeddings, the scale and the bias), sharded against unsharded, and the chunked sigmoid
loss against the dense one; the compiled chunked loss is checked never to hold a global BxB
(or any B-long) array on a device.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from zoo import config as zoo_config
from zoo import sharding
from zoo.tasks import contrastive

B, E = 32, 8


def mesh_of(data, fsdp=1, tensor=1):
  return sharding.make_mesh(zoo_config.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def embeddings(batch=B, width=E, seed=0):
  """L2-normalised pairs; the first quarter of the texts lean towards their images."""
  rng = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  img = unit(rng.standard_normal((batch, width)))
  txt = unit(rng.standard_normal((batch, width)))
  txt[:batch // 4] = unit(img[:batch // 4] + 0.3 * txt[:batch // 4])
  return img.astype(np.float32), txt.astype(np.float32)


def reference(img, txt, scale, bias, kind):
  """(loss, d img, d txt, d scale, d bias) in float64 numpy, the gradients by hand."""
  img, txt = img.astype(np.float64), txt.astype(np.float64)
  sims = img @ txt.T
  logits = scale * sims + bias
  n = len(img)
  if kind == 'softmax':
    def log_softmax(x):
      x = x - x.max(axis=1, keepdims=True)
      return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    rows, cols = log_softmax(logits), log_softmax(logits.T)
    loss = -0.5 * (np.trace(rows) + np.trace(cols)) / n
    eye = np.eye(n)
    dlogits = 0.5 * ((np.exp(rows) - eye) + (np.exp(cols) - eye).T) / n
  else:
    z = 2.0 * np.eye(n) - 1.0
    loss = np.sum(np.logaddexp(0.0, -z * logits)) / n
    dlogits = -z / (1.0 + np.exp(z * logits)) / n
  return (loss, scale * dlogits @ txt, scale * dlogits.T @ img, np.sum(dlogits * sims),
          np.sum(dlogits))


def value_and_grads(fn, img, txt, scale, bias):
  out = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(img, txt, scale, bias)
  return [np.asarray(out[0]), *map(np.asarray, out[1])]


def assert_close(got, want, atol):
  for name, g, w in zip(('loss', 'd_img', 'd_txt', 'd_scale', 'd_bias'), got, want):
    np.testing.assert_allclose(g, w, atol=atol, rtol=1e-5, err_msg=name)


def sharded(mesh, *arrays):
  batch = NamedSharding(mesh, P(contrastive.data_axes(mesh)))
  return [jax.device_put(x, batch) for x in arrays]


SCALE, BIAS = jnp.float32(10.0), jnp.float32(-3.0)


def test_softmax_loss_sees_the_global_batch_when_sharded():
  img, txt = embeddings()
  softmax = lambda i, t, s, b: contrastive.softmax_loss(i, t, s)  # noqa: E731
  want = reference(img, txt, 10.0, 0.0, 'softmax')  # Its d_bias is 0: softmax is shift-free.
  plain = value_and_grads(softmax, img, txt, SCALE, BIAS)
  assert_close(plain, want, atol=1e-6)
  mesh = mesh_of(4, 2)
  gi, gt = sharded(mesh, img, txt)
  assert len(gi.sharding.device_set) == 8
  assert_close(value_and_grads(softmax, gi, gt, SCALE, BIAS), plain, atol=1e-6)
  # Per-device (local) softmax losses would differ: the negatives come from every device.
  local = np.mean([reference(img[i:i + 4], txt[i:i + 4], 10.0, 0.0, 'softmax')[0]
                   for i in range(0, B, 4)])
  assert abs(float(plain[0]) - local) > 0.1


def test_dense_sigmoid_loss_matches_the_reference_sharded_or_not():
  img, txt = embeddings()
  want = reference(img, txt, 10.0, -3.0, 'sigmoid')
  plain = value_and_grads(contrastive.sigmoid_loss, img, txt, SCALE, BIAS)
  assert_close(plain, want, atol=1e-6)
  gi, gt = sharded(mesh_of(8), img, txt)
  assert_close(value_and_grads(contrastive.sigmoid_loss, gi, gt, SCALE, BIAS), plain, atol=1e-6)


@pytest.mark.parametrize('shape', [(4, 2, 1), (2, 1, 4), (1, 1, 1)])
def test_chunked_sigmoid_loss_equals_the_dense_loss(shape):
  """Data x fsdp ring of 8, a ring of 2 replicated over 4 tensor devices, a single device."""
  mesh = mesh_of(*shape)
  img, txt = embeddings()
  dense = value_and_grads(contrastive.sigmoid_loss, img, txt, SCALE, BIAS)
  chunked = lambda *args: contrastive.sigmoid_loss_chunked(*args, mesh)  # noqa: E731
  assert_close(value_and_grads(chunked, *sharded(mesh, img, txt), SCALE, BIAS), dense, atol=1e-5)
  # Unsharded inputs are laid out by shard_map itself.
  assert_close(value_and_grads(chunked, img, txt, SCALE, BIAS), dense, atol=1e-5)
  accuracy = jax.jit(lambda i, t: contrastive.image_to_text_accuracy_chunked(i, t, mesh))
  want = contrastive.image_to_text_accuracy(img, txt)
  assert 0.0 < float(want) < 1.0
  assert float(accuracy(*sharded(mesh, img, txt))) == float(want)


def test_accuracy_counts_images_whose_own_text_is_most_similar():
  img, txt = embeddings(batch=4, width=4)
  sims = img @ txt.T
  want = np.mean(sims.argmax(axis=1) == np.arange(4))
  assert float(contrastive.image_to_text_accuracy(img, txt)) == want
  assert float(contrastive.image_to_text_accuracy(img, img)) == 1.0


def compiled_grad(loss_fn, devices, local_batch, width):
  """The compiled value-and-grad of `loss_fn(img, txt, scale, bias, mesh)` on a data ring."""
  mesh = mesh_of(devices)
  batch = NamedSharding(mesh, P(contrastive.data_axes(mesh)))
  emb = jax.ShapeDtypeStruct((devices * local_batch, width), jnp.float32, sharding=batch)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  fn = jax.value_and_grad(lambda i, t, s, b: loss_fn(i, t, s, b, mesh), argnums=(0, 1, 2, 3))
  return jax.jit(fn).lower(emb, emb, scalar, scalar).compile()


def test_chunked_sigmoid_never_holds_a_global_batch_array():
  local, width = 64, 4
  dense_fn = lambda i, t, s, b, mesh: contrastive.sigmoid_loss(i, t, s, b)  # noqa: E731
  temp = {}
  for devices in (2, 8):
    global_batch = devices * local
    for name, fn in (('chunked', contrastive.sigmoid_loss_chunked), ('dense', dense_fn)):
      compiled = compiled_grad(fn, devices, local, width)
      temp[name, devices] = compiled.memory_analysis().temp_size_in_bytes
      dims = {int(d) for shape in re.findall(r'\[([\d,]+)\]', compiled.as_text())
              for d in shape.split(',')}
      # The per-device program of the dense loss gathers all texts (B rows); the ring never does.
      assert (global_batch in dims) == (name == 'dense'), (name, devices, sorted(dims))
  # Dense temporaries grow with the global batch (b x B logits per device); the ring's do not.
  assert temp['dense', 8] > 2 * temp['dense', 2]
  assert temp['chunked', 8] <= 1.25 * temp['chunked', 2]
  assert temp['chunked', 8] < 4 * local * 8 * local  # Below one b x B float32 block.
