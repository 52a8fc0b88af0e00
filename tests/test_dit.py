"""DiT: adaLN-Zero init, shapes, pinned sizes, conditioning, fixed positions, config errors."""

import contextlib

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.models import dit
from zoo.nn import layers
from zoo.nn import stack

from conftest import perturbed

# DiT-XL/2's repo prints 675,129,632 = these 674,834,720 trainable params + the frozen
# 256x1152 pos_embed buffer (294,912), which zoo computes instead of storing.
PINNED_PARAMS = {'DiT-XL/2': 674_834_720, 'DiT-S/2': 32_865_056, 'tiny': 51_168}
T_B = np.array([1.0, 500.0], np.float32)


def _x(model, batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal(
      (batch, model.input_size, model.input_size, model.in_channels)).astype(np.float32)


def _init(model, **kwargs):
  return nn.unbox(model.init(jax.random.key(0), _x(model), T_B, **kwargs))['params']




@pytest.fixture(scope='module')
def tiny():
  model = dit.DiT(**dit.preset('tiny'))
  return model, _init(model)


def test_output_is_exactly_zero_at_init(tiny):
  model, params = tiny
  out = model.apply({'params': params}, _x(model), T_B, labels_B=np.array([3, 7]))
  assert out.shape == (2, 8, 8, 8) and out.dtype == jnp.float32
  assert np.all(np.asarray(out) == 0.0)


def test_zero_and_scaled_initialisers(tiny):
  _, params = tiny
  for block in ('blocks_0', 'blocks_1', 'final_layer'):
    ada = params[block]['adaLN_modulation_1']
    assert not np.any(ada['kernel']) and not np.any(ada['bias'])
  assert not np.any(params['final_layer']['linear']['kernel'])
  for w in (params['t_embedder']['mlp_0']['kernel'],
            params['y_embedder']['embedding_table']['embedding']):
    assert 0.015 < float(np.std(w)) < 0.025
  # xavier_uniform bound sqrt(6 / (fan_in + fan_out)); the patch conv uses fan_in = P*P*C.
  qkv = params['blocks_0']['attn']['qkv']['kernel']
  assert np.abs(qkv).max() <= np.sqrt(6 / (32 + 96)) and np.std(qkv) > 0.5 * np.sqrt(2 / 128)
  proj = params['x_embedder']['proj']['kernel']
  assert np.abs(proj).max() <= np.sqrt(6 / (2 * 2 * 4 + 32))
  assert np.abs(proj).max() > np.sqrt(6 / (2 * 2 * (4 + 32)))
  assert not np.any(params['blocks_0']['mlp']['fc1']['bias'])


@pytest.mark.parametrize('learn_sigma,patch,out_c', [(True, 4, 6), (False, 2, 3)])
def test_output_shapes(learn_sigma, patch, out_c):
  model = dit.DiT(**(dit.preset('tiny') | {'in_channels': 3, 'patch_size': patch,
                                               'learn_sigma': learn_sigma}))
  params = perturbed(_init(model))
  out = model.apply({'params': params}, _x(model), T_B)
  assert out.shape == (2, 8, 8, out_c) and np.all(np.isfinite(out))
  assert float(np.abs(out).max()) > 0


@pytest.mark.parametrize('name', sorted(PINNED_PARAMS))
def test_pinned_param_counts(name):
  model = dit.DiT(**dit.preset(name))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), _x(model, batch=1), T_B[:1]))
  assert layers.param_count(shapes['params']) == PINNED_PARAMS[name]


def test_presets_follow_the_paper():
  assert len([n for n in dit.PRESETS if n.startswith('DiT-')]) == 12
  assert dit.preset('DiT-L/4') == {'depth': 24, 'hidden_size': 1024, 'num_heads': 16, 'patch_size': 4}
  assert dit.preset('DiT-B/8')['hidden_size'] == 768
  for name in dit.PRESETS:
    dit.check_config(dit.preset(name), None)
  with pytest.raises(ValueError, match='DiT-XL/2'):
    dit.preset('DiT-XXL/2')


def test_null_class_is_the_default_label(tiny):
  model, params = tiny
  params = perturbed(params)
  apply = lambda labels: np.asarray(model.apply({'params': params}, _x(model), T_B,
                                                labels_B=labels))
  null = apply(np.full((2,), 10))
  np.testing.assert_array_equal(apply(None), null)
  assert np.abs(apply(np.array([0, 0])) - null).max() > 1e-3


def test_positions_are_fixed_not_params(tiny):
  _, params = tiny
  paths = ['/'.join(str(k.key) for k in p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  assert not [p for p in paths if 'pos' in p]
  pos_NxD = dit.sincos_pos_embed(8, 3)
  # Token (row 1, col 2), omega = [1, 1e-2]: first half encodes the column, second the row.
  omega = np.array([1.0, 0.01])
  want = np.concatenate([np.sin(2 * omega), np.cos(2 * omega), np.sin(omega), np.cos(omega)])
  np.testing.assert_allclose(pos_NxD[1 * 3 + 2], want, rtol=1e-6)


def test_unconditional_and_scalar_t():
  model = dit.DiT(**(dit.preset('tiny') | {'num_classes': 0}))
  params = perturbed(_init(model))
  assert 'y_embedder' not in params
  out_scalar = model.apply({'params': params}, _x(model), 5.0)
  out_vec = model.apply({'params': params}, _x(model), np.array([5.0, 5.0], np.float32))
  np.testing.assert_array_equal(out_scalar, out_vec)
  with pytest.raises(ValueError, match='num_classes=0'):
    model.apply({'params': params}, _x(model), 5.0, labels_B=np.array([1, 2]))


def test_bfloat16_compute_keeps_float32_params_and_output(tiny):
  _, params = tiny
  model = dit.DiT(**(dit.preset('tiny') | {'dtype': 'bfloat16'}))
  params = perturbed(params)
  out = model.apply({'params': params}, _x(model), T_B)
  ref = dit.DiT(**dit.preset('tiny')).apply({'params': params}, _x(model), T_B)
  assert out.dtype == jnp.float32
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.05 * np.abs(ref).max()


def test_parameters_carry_logical_axes():
  model = dit.DiT(**dit.preset('tiny'))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), _x(model), T_B))['params']
  assert boxed['blocks_0']['attn']['qkv']['kernel'].names == ('embed', 'heads')
  assert boxed['blocks_0']['mlp']['fc2']['kernel'].names == ('mlp', 'embed')
  assert boxed['x_embedder']['proj']['kernel'].names == (None, None, None, 'embed')
  assert boxed['y_embedder']['embedding_table']['embedding'].names == (None, 'embed')


def test_call_errors(tiny):
  model, params = tiny
  with pytest.raises(ValueError, match='context_BxLxD'):
    model.apply({'params': params}, _x(model), T_B, context_BxLxD=np.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match='model.input_size'):
    model.apply({'params': params}, np.zeros((2, 16, 16, 4), np.float32), T_B)


@pytest.mark.parametrize('overrides,resolution,match', [
    ({'input_size': 10, 'patch_size': 4}, None, 'model.input_size=10 .* model.patch_size=4'),
    ({'hidden_size': 30, 'num_heads': 4}, None, 'model.hidden_size=30 .* model.num_heads=4'),
    ({'hidden_size': 18, 'num_heads': 3}, None, 'model.hidden_size=18 .* divisible by 4'),
    ({}, 16, 'resolution=16 .* model.input_size=8'),
    ({'dtype': 'float16'}, None, "model.dtype='float16'; allowed"),
    ({'depth': 0}, None, 'model.depth=0'),
    ({'num_classes': -1}, None, 'model.num_classes=-1'),
    ({'mlp_ratio': 0.0}, None, 'model.mlp_ratio=0.0'),
    ({'freq_shift': 200.0}, None, 'model.freq_shift=200.0'),
    ({'cross_dim': 8}, None, 'unknown DiT config keys'),
    ({'context_dim': -1}, None, 'model.context_dim=-1'),
    ({'pooled_dim': -2}, None, 'model.pooled_dim=-2'),
    ({'norm_eps': 0.0}, None, 'model.norm_eps=0.0'),
])
def test_check_config_errors(overrides, resolution, match):
  with pytest.raises(ValueError, match=match):
    dit.check_config(dit.preset('tiny') | overrides, resolution)


def test_check_config_accepts_valid():
  dit.check_config(dit.preset('tiny'), 8)
  dit.check_config({}, 32)
  assert dit.MODEL is dit.DiT


@pytest.mark.parametrize('masked', [False, True])
def test_attention_probabilities_are_recomputed_in_the_backward_pass_not_stored(masked):
  b, n, a, k = 2, 16, 4, 8
  rng = np.random.default_rng(0)
  q, k_, v = (jnp.asarray(rng.standard_normal((b, n, a, k)), jnp.float32) for _ in range(3))
  mask = jnp.asarray(rng.random((b, n)) < 0.7) if masked else None

  def vjp_under(*settings):
    with contextlib.ExitStack() as within:
      for setting in settings:
        within.enter_context(setting())
      out, vjp = jax.vjp(lambda *qkv: layers.attention_heads(*qkv, mask), q, k_, v)
    return {x.shape for x in jax.tree.leaves(vjp)}, vjp(jnp.cos(out))

  # In a train step's gradient (stack.scanned) the probabilities are recomputed; outside one,
  # and when FLOPs are counted (stack.unrolled), stored.
  recomputed, grads = vjp_under(stack.scanned)
  stored, stored_grads = vjp_under(stack.scanned, stack.unrolled)
  plain, _ = vjp_under()
  probs = (b, a, n, n)
  assert probs not in recomputed and probs in stored and probs in plain
  for x, y in zip(grads, stored_grads):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
