"""zoo.nn.mitigations: pruning and ToMe merging against numpy references, sparse / low-rank
attention against masked full attention, the reducing encoder's schedule, config errors."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.models import text
from zoo.nn import mitigations as mit

from conftest import random_params

B, N, D, HEADS = 2, 16, 32, 4


def _x(n=N, seed=0, width=D):
  return np.random.default_rng(seed).standard_normal((B, n, width)).astype(np.float32)


def _attention(**kw):
  return mit.SelfAttention(HEADS, 2, jnp.float32, **kw)


def _flops(compiled):
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']


@pytest.mark.parametrize('protect', [0, 2])
def test_prune_keeps_top_scores_in_order(protect):
  rng = np.random.default_rng(0)
  x, score = _x(), rng.standard_normal((B, N)).astype(np.float32)
  score[:, :protect] = -10.0  # Protected tokens would lose on score alone.
  keep = 5
  x_BxPxD, index_BxP = jax.jit(mit.prune, static_argnums=(2, 3))(x, score, keep, protect)
  assert x_BxPxD.shape == (B, keep, D) and index_BxP.shape == (B, keep)
  for b in range(B):
    ranked = [i for i in np.argsort(-score[b], kind='stable') if i >= protect]
    want = np.sort(np.concatenate([np.arange(protect), ranked[:keep - protect]]))
    np.testing.assert_array_equal(index_BxP[b], want)
    np.testing.assert_array_equal(x_BxPxD[b], x[b, want])


def test_prune_rejects_bad_keep():
  x, score = _x(), np.zeros((B, N), np.float32)
  for keep in (0, N + 1):
    with pytest.raises(ValueError, match='keep'):
      mit.prune(x, score, keep)
  with pytest.raises(ValueError, match='protect'):
    mit.prune(x, score, 2, protect=3)


def _merge_reference(x, size, metric, r):
  """ToMe bipartite soft matching + weighted average, one row at a time, float64 loops."""
  xs, sizes = [], []
  for b in range(x.shape[0]):
    m = metric[b] / np.linalg.norm(metric[b], axis=-1, keepdims=True)
    sim = m[0::2] @ m[1::2].T
    best, match = sim.max(1), sim.argmax(1)
    merged = set(sorted(range(len(best)), key=lambda i: -best[i])[:r])
    dst_sum = {j: x[b, 2 * j + 1] * size[b, 2 * j + 1] for j in range(sim.shape[1])}
    dst_size = {j: size[b, 2 * j + 1] for j in range(sim.shape[1])}
    for i in merged:
      dst_sum[match[i]] = dst_sum[match[i]] + x[b, 2 * i] * size[b, 2 * i]
      dst_size[match[i]] += size[b, 2 * i]
    rest = [i for i in range(len(best)) if i not in merged]
    xs.append([x[b, 2 * i] for i in rest] + [dst_sum[j] / dst_size[j] for j in dst_sum])
    sizes.append([size[b, 2 * i] for i in rest] + [dst_size[j] for j in dst_size])
  return np.array(xs), np.array(sizes)


@pytest.mark.parametrize('n,r', [(16, 5), (15, 4), (9, 100)])
def test_merge_matches_numpy_reference(n, r):
  rng = np.random.default_rng(n)
  x = rng.standard_normal((B, n, 8))
  size = rng.integers(1, 4, (B, n)).astype(np.float64)
  metric = rng.standard_normal((B, n, 6))
  x_out, size_out = jax.jit(mit.merge, static_argnums=3)(
      x.astype(np.float32), size.astype(np.float32), metric.astype(np.float32), r)
  r_clipped = min(r, n // 2)
  assert x_out.shape == (B, n - r_clipped, 8) and size_out.shape == (B, n - r_clipped)
  x_want, size_want = _merge_reference(x, size, metric, r_clipped)
  np.testing.assert_allclose(x_out, x_want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(size_out, size_want)
  np.testing.assert_array_equal(np.sum(size_out, 1), np.sum(size, 1))


def test_merge_identity_constant_and_protect():
  x, size = _x(), np.ones((B, N), np.float32)
  x_out, size_out = mit.merge(x, size, x, 0)
  assert x_out is x and size_out is size
  const = np.ones((B, N, D), np.float32)
  x_out, size_out = mit.merge(const, size, const, 6)
  np.testing.assert_allclose(x_out, np.ones((B, N - 6, D)), rtol=1e-6)
  np.testing.assert_array_equal(np.sum(size_out, 1), [N, N])
  # A protected class token stays first and whole even when it matches a token perfectly.
  x_cls = x.copy()
  x_cls[:, 1] = x_cls[:, 0]
  x_out, size_out = mit.merge(x_cls, size, x_cls, N // 2, protect=1)
  assert x_out.shape == (B, N - (N - 1) // 2, D)
  np.testing.assert_array_equal(x_out[:, 0], x_cls[:, 0])
  np.testing.assert_array_equal(size_out[:, 0], [1, 1])


def test_allowed_mask_window_and_block():
  grid = mit.allowed_mask('window', 16, window=1)  # 4x4 grid
  assert np.flatnonzero(grid[5]).tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
  assert np.flatnonzero(grid[0]).tolist() == [0, 1, 4, 5]
  assert not grid[3, 4]  # Neighbours in the flat order, opposite ends of the grid.
  assert (grid == grid.T).all()
  flat = mit.allowed_mask('window', 10, window=2)  # Not a square: 1-D.
  assert flat[0, 2] and not flat[0, 3] and flat[9, 7] and not flat[9, 6]
  block = mit.allowed_mask('block', 6, block=4)
  want = np.zeros((6, 6), bool)
  want[:4, :4] = want[4:, 4:] = True
  np.testing.assert_array_equal(block, want)
  for args, kwargs, message in ((('window', 16), dict(window=-1), 'window=-1'),
                                (('block', 16), dict(block=0), 'block=0'),
                                (('ring', 16), {}, "kind='ring'"),
                                (('block', 0), dict(block=2), 'n=0')):
    with pytest.raises(ValueError, match=message):
      mit.allowed_mask(*args, **kwargs)


def test_full_equals_text_attention_and_stats():
  x = _x()
  allowed = np.random.default_rng(1).random((B, N, N)) < 0.7
  allowed[0, 3] = False  # A fully masked query row.
  params = random_params(_attention(), x)
  ref = text.SelfAttention(HEADS, 2, jnp.float32)
  for mask in (None, allowed):
    out, stats = jax.jit(_attention().apply)({'params': params}, x, mask)
    np.testing.assert_array_equal(out, jax.jit(ref.apply)({'params': params}, x, mask))
  # received from a numpy softmax of the projections, under the mask.
  proj = {n: x @ np.asarray(params[f'{n}_proj']['kernel']) + np.asarray(params[f'{n}_proj'][
      'bias']) for n in 'qk'}
  q, k = (proj[n].reshape(B, N, HEADS, D // HEADS) for n in 'qk')
  logits = np.einsum('bqak,bmak->baqm', q, k) / np.sqrt(D // HEADS)
  logits = np.where(allowed[:, None], logits, -1e30)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(stats['received_BxN'], probs.mean((1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['keys_BxNxK'], k.mean(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n', [16, 14])
def test_block_equals_masked_full(n):
  x = _x(n)
  params = {'params': random_params(_attention(), x)}
  mask = mit.allowed_mask('block', n, block=4)[None]
  want, want_stats = jax.jit(_attention().apply)(params, x, mask)
  out, stats = jax.jit(_attention(kind='block', block=4).apply)(params, x)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats['received_BxN'], want_stats['received_BxN'], atol=1e-6)


def test_window_equals_masked_full_and_combines_with_allowed():
  x = _x()
  params = {'params': random_params(_attention(), x)}
  allowed = np.random.default_rng(2).random((B, N, N)) < 0.8
  grid = mit.allowed_mask('window', N, window=1)[None]
  for mask, want_mask in ((None, grid), (allowed, allowed & grid)):
    out, _ = jax.jit(_attention(kind='window', window=1).apply)(params, x, mask)
    np.testing.assert_array_equal(out, jax.jit(_attention().apply)(params, x, want_mask)[0])
  with pytest.raises(ValueError, match='allowed'):
    _attention(kind='block').apply(params, x, allowed)


def test_block_costs_fewer_flops():
  x = jnp.zeros((1, 64, D))
  params = {'params': random_params(_attention(), x)}
  flops = {kind: _flops(jax.jit(_attention(kind=kind, block=16).apply).lower(params, x)
                        .compile()) for kind in ('full', 'block')}
  # Attention is half the full layer's work here; 4 blocks of 16 cut it to a quarter.
  assert flops['block'] < 0.8 * flops['full']


def test_nystrom_with_all_landmarks_is_full_attention():
  x = _x()
  params = {'params': random_params(_attention(), x)}
  want, _ = jax.jit(_attention().apply)(params, x)
  out, _ = jax.jit(_attention(kind='nystrom', rank=N).apply)(params, x)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  approx, stats = jax.jit(_attention(kind='nystrom', rank=4).apply)(params, x)
  assert approx.shape == (B, N, D) and np.isfinite(approx).all()
  assert not np.allclose(approx, want, atol=1e-3)  # 4 landmarks do approximate.
  v = (x @ np.asarray(params['params']['v_proj']['kernel']) +
       np.asarray(params['params']['v_proj']['bias'])).reshape(B, N, HEADS, D // HEADS)
  np.testing.assert_allclose(stats['received_BxN'], np.linalg.norm(v, axis=-1).mean(-1),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='rank'):
    _attention(kind='nystrom', rank=5).apply(params, x)


def test_linformer_params_and_projection():
  x = _x()
  module = _attention(kind='linformer', rank=4)
  params = nn.unbox(jax.jit(module.init)(jax.random.key(0), x))['params']
  for name in ('lowrank_e', 'lowrank_f'):
    assert params[name].shape == (N, 4)
    assert 0.3 < float(np.std(params[name])) * 2 < 1.7  # std 1/sqrt(rank) = 0.5
  out, _ = jax.jit(module.apply)({'params': params}, x)
  assert out.shape == (B, N, D)
  # Identity projections (rank = N) turn Linformer into full attention.
  eye = dict(params, lowrank_e=jnp.eye(N), lowrank_f=jnp.eye(N))
  want, _ = jax.jit(_attention().apply)({'params': params}, x)
  out, _ = jax.jit(_attention(kind='linformer', rank=N).apply)({'params': eye}, x)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


ENC = dict(depth=2, num_heads=HEADS, mlp_dim=64, act='gelu', norm_eps=1e-5, dtype=jnp.float32)


def test_reducing_encoder_without_reduction_is_text_encoder():
  x = _x()
  params = {'params': random_params(mit.ReducingEncoder(**ENC), x)}
  out, size = jax.jit(mit.ReducingEncoder(**ENC).apply)(params, x)
  want = jax.jit(text.Encoder(**ENC, remat=False).apply)(params, x)
  np.testing.assert_array_equal(out, want)
  np.testing.assert_array_equal(size, np.ones((B, N)))


@pytest.mark.parametrize('reduce,extra', [('prune', dict(prune_keep=0.3)),
                                          ('merge', dict(merge_r=3))])
def test_reducing_encoder_schedule(reduce, extra):
  """Reduction happens between layers, from the previous layer's statistics."""
  x = _x()
  enc = mit.ReducingEncoder(**ENC, reduce=reduce, reduce_from=1, **extra)
  params = random_params(enc, x)
  out, size = jax.jit(enc.apply)({'params': params}, x)
  want_n = mit.output_tokens(N, 2, reduce, 1, extra.get('prune_keep', 0.5),
                             extra.get('merge_r', 0))
  assert out.shape == (B, want_n, D) and size.shape == (B, want_n)
  assert want_n == (5 if reduce == 'prune' else N - 3)  # ceil(0.3 * 16); 16 - r
  if reduce == 'merge':
    np.testing.assert_array_equal(np.sum(size, 1), [N, N])
  else:
    np.testing.assert_array_equal(size, np.ones((B, want_n)))
  layer = mit.EncoderLayer(HEADS, 64, 'gelu', 2, 1e-5, jnp.float32)
  h, stats = jax.jit(layer.apply)({'params': params['layers_0']}, x)
  if reduce == 'prune':
    h, _ = mit.prune(h, stats['received_BxN'], want_n)
  else:
    h, _ = mit.merge(h, np.ones((B, N), np.float32), stats['keys_BxNxK'], 3)
  want, _ = jax.jit(layer.apply)({'params': params['layers_1']}, h)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_output_tokens():
  assert mit.layer_tokens(16, 4, 'merge', 1, 0.5, 3) == (16, 13, 10, 7)
  assert mit.output_tokens(16, 4, 'merge', 2, 0.5, 100) == 4  # 16 -> 8 -> 4: r <= N // 2
  assert mit.output_tokens(17, 3, 'merge', 1, 0.5, 100, protect=1) == 5  # 17 -> 9 -> 5
  assert mit.output_tokens(10, 4, 'prune', 2, 0.3, 0) == 3  # Not 4: 0.3 * 10 > 3 in floats.
  assert mit.output_tokens(10, 4, 'prune', 2, 0.05, 0, protect=2) == 2
  assert mit.output_tokens(16, 4, 'none', 1, 0.1, 5) == 16


GOOD = dict(kind='full', reduce='none', window=1, block=16, rank=4, prune_keep=0.5, merge_r=0,
            num_tokens=16)


@pytest.mark.parametrize('bad,key', [
    (dict(kind='sparse'), "attention='sparse'; allowed: ['full'"),
    (dict(reduce='drop'), "reduce='drop'; allowed: ['none'"),
    (dict(prune_keep=0.0), 'prune_keep'), (dict(prune_keep=1.5), 'prune_keep'),
    (dict(merge_r=-1), 'merge_r'), (dict(rank=0), 'rank'), (dict(block=0), 'block'),
    (dict(window=-1), 'window'), (dict(kind='nystrom', rank=5), 'rank=5'),
    (dict(kind='linformer', rank=17), 'rank=17'),
])
def test_config_check_names_the_key(bad, key):
  mit.config_check(**GOOD)
  with pytest.raises(ValueError, match=re.escape(f'model.vision.{key}')):
    mit.config_check(**(GOOD | bad))


def test_config_check_every_layer():
  mit.config_check(**(GOOD | dict(kind='nystrom', reduce='prune')), depth=3)
  with pytest.raises(ValueError, match=r'rank=4 must divide the token count 13 \(layer 1\)'):
    mit.config_check(**(GOOD | dict(kind='nystrom', reduce='merge', merge_r=3)), depth=3)
  with pytest.raises(ValueError, match='reduce_from=2'):
    mit.config_check(**(GOOD | dict(reduce='merge')), depth=2, reduce_from=2)
