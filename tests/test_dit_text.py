"""DiT text conditioning (cross-attention on tokens, pooled embedding into adaLN) and remat."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.models import dit
from zoo.nn import layers

from conftest import perturbed

CFG = dit.preset('tiny-t2i')
MODEL = dit.DiT(**CFG)
T_B = np.array([3.0, 700.0], np.float32)
L = 5


def _inputs(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 8, 8, 4)).astype(np.float32)
  ctx = rng.standard_normal((batch, L, CFG['context_dim'])).astype(np.float32)
  pooled = rng.standard_normal((batch, CFG['pooled_dim'])).astype(np.float32)
  return x, ctx, pooled




@pytest.fixture(scope='module')
def t2i():
  model = MODEL
  x, ctx, pooled = _inputs()
  boxed = model.init(jax.random.key(0), x, T_B, context_BxLxD=ctx, pooled_BxD=pooled)
  return model, nn.unbox(boxed)['params'], boxed['params']


def _apply(model, params, x, ctx, pooled, mask=None):
  return np.asarray(model.apply({'params': params}, x, T_B[:len(x)], context_BxLxD=ctx,
                                context_mask_BxL=mask, pooled_BxD=pooled))


def test_shapes_param_count_and_axes(t2i):
  model, params, boxed = t2i
  x, ctx, pooled = _inputs()
  out = _apply(model, perturbed(params), x, ctx, pooled)
  assert out.shape == (2, 8, 8, 8) and np.all(np.isfinite(out))
  d, c, p = CFG['hidden_size'], CFG['context_dim'], CFG['pooled_dim']
  tiny_unconditional = 51_168 - (10 + 1) * d  # 'tiny' without its label table.
  cross_per_block = (d * d + d) + (d * 2 * d + 2 * d) + (d * d + d)  # q, kv, proj.
  extra = CFG['depth'] * cross_per_block + (c * d + d) + (p * d + d) + (d * d + d)
  assert layers.param_count(params) == tiny_unconditional + extra == 62_432
  assert boxed['blocks_0']['cross_attn']['kv_linear']['kernel'].names == ('embed', 'heads')
  assert boxed['context_embedder']['kernel'].names == (None, 'embed')
  assert boxed['pooled_embedder']['linear_2']['kernel'].names == ('mlp', 'embed')


def test_output_exactly_zero_at_init(t2i):
  model, params, _ = t2i
  x, ctx, pooled = _inputs(seed=3)
  assert np.all(_apply(model, params, x, ctx, pooled) == 0.0)
  for i in range(CFG['depth']):
    proj = params[f'blocks_{i}']['cross_attn']['proj']
    assert not np.any(proj['kernel']) and not np.any(proj['bias'])


def test_context_mask_hides_masked_tokens(t2i):
  model, params, _ = t2i
  params = perturbed(params)
  x, ctx, pooled = _inputs()
  mask = np.array([[True] * 3 + [False] * 2, [True] * 4 + [False]])
  ref = _apply(model, params, x, ctx, pooled, mask)
  garbage = ctx.copy()
  garbage[~mask] = 1e3 * np.random.default_rng(5).standard_normal((3, CFG['context_dim']))
  np.testing.assert_array_equal(_apply(model, params, x, garbage, pooled, mask), ref)
  # Example 0 sees exactly its first 3 tokens: the same as a 3-token context without a mask.
  short = _apply(model, params, x[:1], ctx[:1, :3], pooled[:1])
  np.testing.assert_allclose(short, ref[:1], atol=1e-5, rtol=0)
  # A visible token matters, and None means all visible.
  assert np.abs(_apply(model, params, x, ctx, pooled) - ref).max() > 1e-3
  np.testing.assert_array_equal(_apply(model, params, x, ctx, pooled, np.ones((2, L), bool)),
                                _apply(model, params, x, ctx, pooled))


def test_fully_masked_context_adds_nothing(t2i):
  model, params, _ = t2i
  params = perturbed(params)
  x, ctx, pooled = _inputs()
  no_cross = jax.tree.map(lambda a: a, params)
  for i in range(CFG['depth']):
    proj = no_cross[f'blocks_{i}']['cross_attn']['proj']
    no_cross[f'blocks_{i}']['cross_attn']['proj'] = jax.tree.map(np.zeros_like, proj)
  mask = np.array([[False] * L, [True] * L])
  out = _apply(model, params, x, ctx, pooled, mask)
  np.testing.assert_allclose(out[:1], _apply(model, no_cross, x, ctx, pooled)[:1], atol=1e-6,
                             rtol=0)
  np.testing.assert_array_equal(out[1:], _apply(model, params, x, ctx, pooled)[1:])


@jax.jit
def _sgd_step(params, lr=0.5):
  """One plain SGD step on the MSE to a fixed random target."""
  x, ctx, pooled = _inputs()
  target = np.random.default_rng(9).standard_normal((2, 8, 8, 8)).astype(np.float32)
  grads = jax.grad(lambda p: jnp.mean(jnp.square(MODEL.apply(
      {'params': p}, x, T_B, context_BxLxD=ctx, pooled_BxD=pooled) - target)))(params)
  return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def _sgd_trajectory(params, steps):
  trajectory = []
  for _ in range(steps):
    params = _sgd_step(params)
    trajectory.append(params)
  return trajectory


@jax.jit
def _text_sensitivity(params):
  """max |d out| along a random direction of (context, pooled): (by context, by pooled)."""
  x, ctx, pooled = _inputs()
  _, d_ctx, d_pooled = _inputs(seed=7)

  def out(c, p):
    return MODEL.apply({'params': params}, x, T_B, context_BxLxD=c, pooled_BxD=p)

  by_ctx = jax.jvp(lambda c: out(c, pooled), (ctx,), (d_ctx,))[1]
  by_pooled = jax.jvp(lambda p: out(ctx, p), (pooled,), (d_pooled,))[1]
  return jnp.stack([jnp.abs(by_ctx).max(), jnp.abs(by_pooled).max()])


def test_text_inputs_reach_the_output_after_sgd(t2i):
  """adaLN-Zero: step 1 moves only the final linear; from step 2 on text steers the output.

  A fully zero-initialised pooled_embedder would never get a gradient (silu(0) = 0 feeds its
  linear_2, and linear_2 = 0 blocks linear_1): its N(0, 0.02) init keeps the path alive.
  """
  _, params, _ = t2i
  one, two = _sgd_trajectory(params, 2)
  np.testing.assert_array_equal(_text_sensitivity(params), [0.0, 0.0])
  np.testing.assert_array_equal(_text_sensitivity(one), [0.0, 0.0])
  by_ctx, by_pooled = _text_sensitivity(two)
  # jvp is exact: any non-zero is a live path. The pooled one is second order in the small
  # adaLN and pooled_embedder weights, hence tiny after two steps.
  assert by_ctx > 1e-4 and by_pooled > 0.0
  dead = jax.tree.map(lambda a: a, params)
  dead['pooled_embedder'] = jax.tree.map(np.zeros_like, params['pooled_embedder'])
  assert _text_sensitivity(_sgd_trajectory(dead, 3)[-1])[1] == 0.0


def test_remat_matches_outputs_and_grads(t2i):
  _, params, _ = t2i
  params = perturbed(params)
  x, ctx, pooled = _inputs()
  mask = np.array([[True] * 3 + [False] * 2, [True] * L])

  def value_and_grad(remat):
    model = dit.DiT(**(CFG | {'remat': remat}))
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.square(model.apply(
        {'params': p}, x, T_B, context_BxLxD=ctx, context_mask_BxL=mask,
        pooled_BxD=pooled)))))(params)

  (v0, g0), (v1, g1) = value_and_grad(False), value_and_grad(True)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)
  assert float(np.abs(g0['blocks_0']['cross_attn']['q_linear']['kernel']).max()) > 0


def test_norm_eps_is_used(t2i):
  _, params, _ = t2i
  params = perturbed(params)
  x, ctx, pooled = _inputs()
  ref = _apply(dit.DiT(**CFG), params, x, ctx, pooled)
  big = _apply(dit.DiT(**(CFG | {'norm_eps': 10.0})), params, x, ctx, pooled)
  assert np.abs(big - ref).max() > 1e-3


@pytest.mark.parametrize('drop,extra,match', [
    ('context', {}, 'context_BxLxD is missing but model.context_dim=32'),
    ('pooled', {}, 'pooled_BxD is missing but model.pooled_dim=32'),
    (None, {'labels_B': np.array([1, 2])}, 'model.num_classes=0'),
    (None, {'context_mask_BxL': np.ones((2, L + 1), bool)}, 'context_mask_BxL has shape'),
    (None, {'context_BxLxD': np.zeros((2, L, 16), np.float32)}, 'model.context_dim=32'),
    (None, {'pooled_BxD': np.zeros((3, 32), np.float32)}, 'batch 2'),
])
def test_bad_inputs_raise(t2i, drop, extra, match):
  model, params, _ = t2i
  x, ctx, pooled = _inputs()
  kwargs = {'context_BxLxD': ctx, 'pooled_BxD': pooled}
  kwargs.pop({'context': 'context_BxLxD', 'pooled': 'pooled_BxD', None: 'none'}[drop], None)
  with pytest.raises(ValueError, match=match):
    model.apply({'params': params}, x, T_B, **(kwargs | extra))


def test_inputs_the_config_does_not_use_raise():
  model = dit.DiT(**dit.preset('tiny'))
  x, _, pooled = _inputs()
  params = nn.unbox(model.init(jax.random.key(0), x, T_B))['params']
  with pytest.raises(ValueError, match='pooled_BxD given but model.pooled_dim=0'):
    model.apply({'params': params}, x, T_B, pooled_BxD=pooled)
  with pytest.raises(ValueError, match='context_mask_BxL given without context_BxLxD'):
    model.apply({'params': params}, x, T_B, context_mask_BxL=np.ones((2, L), bool))


@pytest.mark.parametrize('overrides,match', [
    ({'context_dim': -4}, 'model.context_dim=-4'),
    ({'pooled_dim': -1}, 'model.pooled_dim=-1'),
    ({'norm_eps': -1e-6}, 'model.norm_eps=-1e-06'),
    ({'contextdim': 8}, r"unknown DiT config keys \['contextdim'\]"),
])
def test_bad_configs_raise_naming_the_key(overrides, match):
  dit.check_config(CFG, 8)
  with pytest.raises(ValueError, match=match):
    dit.check_config(CFG | overrides, 8)
