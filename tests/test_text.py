"""TextTransformer: causality, padding invariance, pooling, parameter counts, remat, configs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import text_tokenizers
from zoo import models
from zoo.models import text

TINY = text.preset('tiny')
LEN = 8


def _model(**overrides):
  return text.TextTransformer(**(TINY | overrides))


def _tokens(batch=2, length=LEN, seed=0):
  tokens = np.random.default_rng(seed).integers(3, TINY['vocab_size'], (batch, length))
  return tokens.astype(np.int32)


def _params(model, length=LEN):
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, length), jnp.int32))['params']


def _features_given_embeddings(model, params, tokens):
  """features(delta): the model with `delta` added to the embeddings output (token + position)."""

  def run(delta_BxLxD):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, text.Embeddings) and context.method_name == '__call__':
        out = out + delta_BxLxD
      return out

    with nn.intercept_methods(add_delta):
      return jax.jit(model.apply)({'params': params}, tokens)[0]

  return run


@pytest.mark.parametrize('causal', [True, False])
def test_causality(causal):
  """d features[t] / d embedding[s] is exactly zero for s > t when causal (nanodo's test)."""
  model = _model(causal=causal)
  params, tokens = _params(model), _tokens(batch=1)
  run = _features_given_embeddings(model, params, tokens)
  jac = jax.jit(jax.jacobian(run))(jnp.zeros((1, LEN, TINY['width'])))  # 1xLxD x 1xLxD
  influence_LxL = np.abs(np.asarray(jac)[0, :, :, 0]).sum(axis=(1, 3))  # [t, s]
  future = np.triu(np.ones((LEN, LEN), bool), k=1)
  assert (influence_LxL[~future] > 0).all()
  if causal:
    assert (influence_LxL[future] == 0).all()
  else:
    assert (influence_LxL[future] > 0).all()


@pytest.mark.parametrize('pool,causal', [('last', False), ('mean', False), ('eos', True),
                                         ('argmax', False)])
def test_padded_tokens_change_nothing(pool, causal):
  model = _model(pool=pool, causal=causal)
  params = _params(model)
  eos = TINY['eos_token_id']
  tokens = _tokens(batch=2)
  lengths = np.array([5, 3])
  mask = np.arange(LEN)[None] < lengths[:, None]
  tokens[np.arange(2), lengths - 1] = eos
  tokens[~mask] = 0
  other = tokens.copy()
  # Padding that would win every pooling rule if it were looked at: EOS and the largest id.
  other[0, 5:], other[1, 3:] = [eos, TINY['vocab_size'] - 1, 7], [TINY['vocab_size'] - 1, eos,
                                                                   eos, 9, 11]
  feat, pooled = jax.jit(model.apply)({'params': params}, tokens, mask)
  feat2, pooled2 = jax.jit(model.apply)({'params': params}, other, mask)
  np.testing.assert_allclose(np.asarray(feat2)[mask], np.asarray(feat)[mask], atol=1e-6, rtol=0)
  np.testing.assert_allclose(pooled2, pooled, atol=1e-6, rtol=0)
  assert pooled.shape == (2, TINY['projection_dim'])
  if not causal:  # Without the mask, padding is visible to every position.
    unmasked = np.asarray(jax.jit(model.apply)({'params': params}, other)[0])
    assert np.abs(unmasked[mask] - np.asarray(feat)[mask]).max() > 1e-3


def test_pooling_positions_and_mean():
  eos = 2
  tokens = jnp.array([[1, 9, eos, 9, eos, 0], [1, 4, 4, 40, eos, 0]])
  mask = jnp.array([[True] * 5 + [False], [True] * 5 + [False]])
  np.testing.assert_array_equal(text.pool_index('eos', tokens, mask, eos), [2, 4])
  np.testing.assert_array_equal(text.pool_index('argmax', tokens, mask, eos), [1, 3])
  np.testing.assert_array_equal(text.pool_index('last', tokens, mask, eos), [4, 4])
  model = _model(pool='mean', projection_dim=0)
  params = _params(model)
  feat, pooled = jax.jit(model.apply)({'params': params}, tokens, mask)
  np.testing.assert_allclose(pooled, np.asarray(feat)[:, :5].mean(1), atol=1e-6)
  assert pooled.shape == (2, TINY['width'])


def test_fully_masked_rows_are_finite():
  """A left-padded row: query 0 sees no key at all under the causal mask; no NaN, also in grads."""
  model = _model()
  params, tokens = _params(model), _tokens()
  mask = np.array([[False, False] + [True] * (LEN - 2), [False] * LEN])

  def loss(p):
    feat, pooled = model.apply({'params': p}, tokens, mask)
    return jnp.sum(feat ** 2) + jnp.sum(pooled ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(value)
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


def _count(preset, **overrides):
  model = text.TextTransformer(**(text.preset(preset) | overrides))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 77), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def _clip_text_count(vocab, ctx, width, depth, proj):
  """HF CLIPTextModel(WithProjection) parameters, by formula."""
  attn = 4 * (width * width + width)
  mlp = width * 4 * width + 4 * width + 4 * width * width + width
  layer = attn + mlp + 2 * 2 * width
  return vocab * width + ctx * width + depth * layer + 2 * width + width * proj


def test_clip_param_counts():
  # openai/clip-vit-base-patch32: CLIPTextModel 63,165,952; with projection 63,428,096.
  assert _count('clip-vit-b32-text', projection_dim=0) == 63_165_952
  assert _count('clip-vit-b32-text') == 63_428_096 == _clip_text_count(49408, 77, 512, 12, 512)
  assert _count('clip-vit-l14-text') == _clip_text_count(49408, 77, 768, 12, 768)
  assert _count('clip-vit-l14-text') == 123_650_304


def test_remat_matches():
  tokens, mask = _tokens(), np.arange(LEN)[None] < np.array([[LEN], [4]])
  model, remat = _model(), _model(remat=True)
  params = _params(model)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(_params(remat))

  def loss(m, p):
    feat, pooled = m.apply({'params': p}, tokens, mask)
    return jnp.sum(feat * feat) + jnp.sum(pooled)

  v1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  v2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
  np.testing.assert_allclose(v2, v1, rtol=1e-6)
  # Same math; XLA may fuse the recomputed forward differently, so allow float32 rounding of
  # the overall gradient scale (k_proj biases have an exactly-zero gradient: pure rounding).
  scale = max(np.abs(g).max() for g in jax.tree_util.tree_leaves(g1))
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * scale, rtol=1e-4), g1, g2)


def test_param_names_axes_and_init():
  model = _model(width=64, num_heads=4, vocab_size=2000, depth=2)
  variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
  params = nn.meta.unbox(variables['params'])
  layer = params['encoder']['layers_0']
  assert set(layer) == {'self_attn', 'layer_norm1', 'mlp', 'layer_norm2'}
  assert set(layer['self_attn']) == {'q_proj', 'k_proj', 'v_proj', 'out_proj'}
  assert set(params['text_projection']) == {'kernel'}
  specs = nn.get_partition_spec(variables)['params']
  assert tuple(specs['embeddings']['token_embedding']['embedding']) == ('vocab', 'embed')
  assert tuple(specs['encoder']['layers_1']['mlp']['fc1']['kernel']) == ('embed', 'mlp')
  assert tuple(specs['encoder']['layers_1']['self_attn']['out_proj']['kernel']) == (
      'heads', 'embed')
  # OpenAI CLIP init (NUMERICS.md Multimodal 4.1).
  np.testing.assert_allclose(params['embeddings']['token_embedding']['embedding'].std(), 0.02,
                             rtol=0.05)
  np.testing.assert_allclose(params['embeddings']['position_embedding']['embedding'].std(), 0.01,
                             rtol=0.3)
  np.testing.assert_allclose(layer['self_attn']['q_proj']['kernel'].std(), 64 ** -0.5, rtol=0.05)
  np.testing.assert_allclose(layer['mlp']['fc1']['kernel'].std(), 128 ** -0.5, rtol=0.05)


def test_bfloat16_close_to_float32():
  tokens = _tokens()
  params = _params(_model())
  f32 = jax.jit(_model().apply)({'params': params}, tokens)
  bf16 = jax.jit(_model(dtype='bfloat16').apply)({'params': params}, tokens)
  for a, b in zip(f32, bf16):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(b, a, atol=0.1)


def test_tiny_preset_matches_shapes_tokenizer_and_registry():
  tok = text_tokenizers.get('shapes')
  assert (TINY['vocab_size'], TINY['eos_token_id']) == (tok.vocab_size, tok.eos_id)
  config = models.config('text', 'tiny')
  models.check_config(config, resolution=None)
  ids, mask = tok.encode(['A red circle.', 'How many shapes are there?'], TINY['max_len'])
  feat, pooled = jax.jit(models.build(config).apply)({'params': _params(models.build(config), 32)},
                                            ids, mask)
  assert feat.shape == (2, 32, 32) and pooled.shape == (2, 32)
  with pytest.raises(ValueError, match="model.pool='first'"):
    models.check_config(models.config('text', 'tiny', pool='first'), resolution=None)


@pytest.mark.parametrize('overrides,match', [
    ({'act': 'relu'}, r"model.act='relu'.*quick_gelu"),
    ({'pool': 'cls'}, r"model.pool='cls'.*'eos', 'argmax', 'last', 'mean'"),
    ({'width': 30}, 'model.width=30 must be divisible by model.num_heads=4'),
    ({'eos_token_id': 113}, r'model.eos_token_id=113'),
    ({'dtype': 'float16'}, 'model.dtype'),
    ({'projection_dim': -1}, 'model.projection_dim=-1'),
    ({'num_heads': 0}, 'model.num_heads=0'),
    ({'norm_eps': 0.0}, 'model.norm_eps'),
    ({'dropout': 0.1}, r"unknown text config keys \['dropout'\]"),
])
def test_bad_configs(overrides, match):
  with pytest.raises(ValueError, match=match):
    text.check_config(TINY | overrides, resolution=None)


def test_bad_inputs():
  model = _model()
  params = _params(model)
  with pytest.raises(ValueError, match='model.max_len=32'):
    jax.jit(model.apply)({'params': params}, jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match='mask_BxL shape'):
    jax.jit(model.apply)({'params': params}, jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), bool))
  with pytest.raises(ValueError, match='unknown text preset'):
    text.preset('clip-vit-h14-text')
