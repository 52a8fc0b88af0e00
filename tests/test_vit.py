"""ViT: pooling (cls / map / gap), parameter names and counts, classifier head, configs."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from zoo import models  # noqa: E402
from zoo.models import vit  # noqa: E402

from conftest import random_params  # noqa: E402

TINY = vit.preset('tiny')


def _model(style='clip', **overrides):
  return vit.ViT(**(vit.STYLES[style] | TINY | overrides))


def _images(batch=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)


def _init(model):
  return jax.jit(model.init)(jax.random.key(0), _images(1))


@pytest.mark.parametrize('style,pool', [('clip', 'cls'), ('siglip', 'map'), ('siglip', 'gap')])
def test_pools_shapes_and_names(style, pool):
  model = _model(style, pool=pool)
  variables = _init(model)
  params = nn.unbox(variables['params'])
  pooled, state = jax.jit(lambda p, x: model.apply({'params': p}, x, mutable=['intermediates']))(
      params, _images())
  tokens = state['intermediates']['tokens'][0]
  assert pooled.shape == (2, 32) and pooled.dtype == jnp.float32
  assert tokens.shape == (2, 16 + (pool == 'cls'), 32)
  emb = params['embeddings']
  assert ('class_embedding' in emb) == (pool == 'cls')
  assert ('bias' in emb['patch_embedding']) == (style == 'siglip')
  assert ('pre_layrnorm' in params) == (style == 'clip')
  assert ('head' in params) == (pool == 'map')
  assert emb['position_embedding']['embedding'].shape == (16 + (pool == 'cls'), 32)
  assert set(params['encoder']['layers_1']) == {'self_attn', 'layer_norm1', 'mlp', 'layer_norm2'}
  if pool == 'cls':  # post_layernorm of the class token.
    np.testing.assert_allclose(pooled, tokens[:, 0], atol=1e-6)
  elif pool == 'gap':
    np.testing.assert_allclose(pooled, tokens.mean(1), atol=1e-6)
  else:
    head = params['head']
    assert head['probe'].shape == (1, 1, 32)
    assert set(head) == {'probe', 'attention', 'layernorm', 'mlp'}
    assert set(head['attention']) == {'q_proj', 'k_proj', 'v_proj', 'out_proj'}
  specs = nn.get_partition_spec(variables)['params']
  assert tuple(specs['embeddings']['patch_embedding']['kernel']) == (None, None, None, 'embed')
  assert tuple(specs['encoder']['layers_0']['mlp']['fc1']['kernel']) == ('embed', 'mlp')


def test_map_head_is_attention_pooling():
  """The MAP head output is invariant to permuting the tokens (no positions after the encoder)."""
  head = vit.MAPHead(num_heads=4, mlp_dim=64, act='gelu_tanh', norm_eps=1e-6, dtype=jnp.float32)
  x = np.random.default_rng(0).standard_normal((2, 10, 32)).astype(np.float32)
  params = jax.jit(head.init)(jax.random.key(0), x)
  apply = jax.jit(head.apply)
  out = apply(params, x)
  np.testing.assert_allclose(apply(params, x[:, ::-1]), out, atol=1e-5)
  assert out.shape == (2, 32)


def test_classifier_head_and_features():
  model = _model(num_classes=5)
  params = nn.unbox(_init(model)['params'])
  logits, pooled = jax.jit(lambda p, x: model.apply({'params': p}, x, features=True))(
      params, _images())
  assert logits.shape == (2, 5) and pooled.shape == (2, 32)
  assert not np.any(np.asarray(logits))  # Zero-initialised head.
  assert set(params['classifier']) == {'kernel', 'bias'}


def test_image_norm_clip_maps_to_openai_statistics():
  x = _images()
  params = nn.unbox(_init(_model())['params'])
  raw = jax.jit(_model(image_norm='clip').apply)({'params': params}, x)
  mean, std = np.array(vit.CLIP_MEAN), np.array(vit.CLIP_STD)
  normalised = (((x + 1) / 2 - mean) / std).astype(np.float32)
  np.testing.assert_allclose(raw, jax.jit(_model().apply)({'params': params}, normalised),
                             atol=1e-5)


def test_bfloat16_and_remat_close_to_float32():
  x = _images()
  model = _model('siglip')
  params = nn.unbox(_init(model)['params'])
  f32 = jax.jit(model.apply)({'params': params}, x)
  bf16 = jax.jit(_model('siglip', dtype='bfloat16').apply)({'params': params}, x)
  remat = jax.jit(_model('siglip', remat=True).apply)({'params': params}, x)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, atol=0.1)
  np.testing.assert_allclose(remat, f32, atol=1e-5)


def _count(name, **overrides):
  model = vit.ViT(**(vit.preset(name) | overrides))
  size = model.image_size
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def test_param_counts():
  # timm vit_base_patch16_224 (class token, patch bias, no pre-LN, 1000 classes): 86,567,656.
  assert _count('B/16', pool='cls', pre_norm=False, patch_bias=True, num_classes=1000) == (
      86_567_656)
  # The vision tower of HF openai/clip-vit-base-patch32 (CLIPVisionModel): 87,456,000.
  assert _count('B/32', **vit.STYLES['clip']) == 87_456_000
  assert _count('tiny') == 23_936


def test_conv_stem_names_shapes_and_gradients():
  """stem_channels: conv + (max-pool, residual block) per width + 1x1 patch embedding."""
  model = _model(stem_channels=(8, 16, 16), depth=1)
  params = random_params(model, _images(1))
  emb = params['embeddings']
  assert set(emb) == {'stem_conv', 'stem_blocks_0', 'stem_blocks_1', 'stem_blocks_2',
                      'stem_norm', 'patch_embedding', 'class_embedding', 'position_embedding'}
  assert emb['stem_conv']['kernel'].shape == (3, 3, 3, 8)
  assert emb['patch_embedding']['kernel'].shape == (1, 1, 16, 32)
  assert 'shortcut' in emb['stem_blocks_1'] and 'shortcut' not in emb['stem_blocks_2']
  # The stem is on the path: every stem parameter gets a finite, non-zero gradient.
  grads = jax.jit(jax.grad(lambda p: model.apply({'params': p}, _images()).sum()))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads['embeddings']):
    assert np.isfinite(g).all() and np.abs(g).max() > 0, jax.tree_util.keystr(path)


def test_registry_and_presets():
  config = models.config('vit', 'tiny', num_classes=3)
  models.check_config(config, 32)
  with pytest.raises(ValueError, match=r'resolution=64 must equal model.image_size=32'):
    models.check_config(config, 64)
  assert set(vit.PRESETS) >= {'Ti/16', 'S/16', 'S/32', 'B/16', 'B/32', 'L/14', 'L/16', 'tiny'}
  assert vit.preset('L/14') == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16,
                                    patch_size=14)
  with pytest.raises(ValueError, match='unknown ViT preset'):
    vit.preset('H/14')


@pytest.mark.parametrize('overrides,match', [
    ({'patch_size': 5}, 'model.image_size=32 must be divisible by model.patch_size=5'),
    ({'width': 30}, 'model.width=30 must be divisible by model.num_heads=4'),
    ({'pool': 'token'}, r"model.pool='token'.*'cls', 'map', 'gap'"),
    ({'act': 'relu'}, r"model.act='relu'.*quick_gelu"),
    ({'image_norm': 'imagenet'}, r"model.image_norm='imagenet'.*'none', 'clip'"),
    ({'image_norm': 'clip', 'in_channels': 1}, 'model.in_channels=1 must be 3'),
    ({'num_classes': -1}, 'model.num_classes=-1'),
    ({'norm_eps': 0.0}, 'model.norm_eps'),
    ({'dtype': 'float16'}, 'model.dtype'),
    ({'dropout': 0.1}, r"unknown ViT config keys \['dropout'\]"),
    ({'stem_channels': (8, 16)}, r'model.stem_channels=\[8, 16\].*model.patch_size=8'),
    ({'stem_channels': (8, 12, 16)}, r'model.stem_channels=\[8, 12, 16\].*multiple of 8'),
])
def test_bad_configs(overrides, match):
  with pytest.raises(ValueError, match=match):
    vit.check_config(TINY | overrides, resolution=None)


def test_bad_inputs():
  model = _model()
  with pytest.raises(ValueError, match=r'Bx32x32x3 \(model.image_size'):
    model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
