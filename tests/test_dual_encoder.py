"""DualEncoder: outputs, init of the logit scale/bias, padding, causality, presets, configs."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import math  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from zoo import models  # noqa: E402
from zoo.convert import transformers as convert  # noqa: E402
from zoo.models import dual_encoder  # noqa: E402
from zoo.models import text  # noqa: E402

from conftest import random_params  # noqa: E402

LEN, EOS = 8, 2


def _images(batch=2, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)


def _texts():
  """Three right-padded rows ending in EOS (lengths 8, 5, 3) and their mask."""
  tokens = np.random.default_rng(1).integers(3, 113, (3, LEN)).astype(np.int32)
  lengths = np.array([LEN, 5, 3])
  mask = np.arange(LEN)[None] < lengths[:, None]
  tokens[np.arange(3), lengths - 1] = EOS
  tokens[~mask] = 0
  return tokens, mask


@pytest.fixture(scope='module', params=['clip-tiny', 'siglip-tiny'])
def tiny(request):
  config = models.config('dual_encoder', request.param)
  models.check_config(config, 32)
  model = models.build(config)
  tokens, mask = _texts()
  variables = jax.jit(model.init)(jax.random.key(0), _images(1), tokens[:1], mask[:1])
  return request.param, model, variables


def test_outputs_init_and_param_names(tiny):
  name, model, variables = tiny
  params = nn.unbox(variables['params'])
  tokens, mask = _texts()
  out = jax.jit(model.apply)({'params': params}, _images(), tokens, mask)
  assert out['image'].shape == (2, 32) and out['text'].shape == (3, 32)
  for key in ('image', 'text'):
    assert out[key].dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, atol=1e-5)
  logits = dual_encoder.logits(out)
  np.testing.assert_allclose(logits, out['scale'] * out['image'] @ out['text'].T + out['bias'],
                             atol=1e-5)
  assert logits.shape == (2, 3)
  encode_image = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode_image'))
  encode_text = jax.jit(lambda p, t, m: model.apply({'params': p}, t, m, method='encode_text'))
  np.testing.assert_allclose(encode_image(params, _images()), out['image'], atol=1e-6)
  np.testing.assert_allclose(encode_text(params, tokens, mask), out['text'], atol=1e-6)
  if name == 'clip-tiny':
    assert set(params) == {'vision_model', 'text_model', 'visual_projection', 'text_projection',
                           'logit_scale'}
    np.testing.assert_allclose(params['logit_scale'], math.log(1 / 0.07), rtol=1e-6)
    np.testing.assert_allclose(out['scale'], 1 / 0.07, rtol=1e-5)
    assert float(out['bias']) == 0.0
    assert 'pre_layrnorm' in params['vision_model']
  else:
    assert set(params) == {'vision_model', 'text_model', 'logit_scale', 'logit_bias'}
    assert 'head' in params['vision_model'] and 'head' in params['text_model']
    np.testing.assert_allclose(out['scale'], 10.0, rtol=1e-5)
    assert float(out['bias']) == -10.0
    # big_vision / HF SigLIP init: text position and token embeddings std 1/sqrt(D).
    embeddings = params['text_model']['embeddings']
    for table in ('position_embedding', 'token_embedding'):
      np.testing.assert_allclose(embeddings[table]['embedding'].std(), 32 ** -0.5, rtol=0.1)
  assert params['logit_scale'].shape == ()


def test_padding_changes_nothing(tiny):
  name, model, variables = tiny
  tokens, mask = _texts()
  other = np.where(mask, tokens, np.array([EOS, 112, 7, 9, 11, 5, 4, 3])[None])
  encode_text = jax.jit(lambda t, m: model.apply(variables, t, m, method='encode_text'))
  a, b = encode_text(tokens, mask), encode_text(other, mask)
  np.testing.assert_allclose(a, b, atol=1e-6)
  if name == 'siglip-tiny':  # Bidirectional: without the mask every row would see the padding.
    assert np.abs(np.asarray(encode_text(other, np.ones_like(mask))) - np.asarray(a)).max() > 1e-3


def _text_embedding_jacobian(model, variables, tokens, mask):
  """d text embedding / d (token + position embedding) at each position: Ex L x D."""

  def run(delta_1xLxD):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, text.Embeddings) and context.method_name == '__call__':
        out = out + delta_1xLxD
      return out

    with nn.intercept_methods(add_delta):
      return model.apply(variables, tokens, mask, method='encode_text')[0]

  return jax.jit(jax.jacobian(run))(jnp.zeros((1, LEN, 32)))[:, 0]


def test_clip_text_is_causal_siglip_is_not(tiny):
  """The pooled EOS (position 4) has exactly zero gradient from real tokens after it in CLIP."""
  name, model, variables = tiny
  tokens, _ = _texts()
  row = tokens[1:2].copy()
  row[0, 5:] = [7, 8, 9]  # Real (unmasked) tokens after the first EOS.
  mask = np.ones_like(row, bool)
  influence_L = np.abs(np.asarray(_text_embedding_jacobian(model, variables, row, mask))).sum(
      axis=(0, 2))
  if name == 'clip-tiny':  # pool='eos': the first EOS, at position 4.
    assert (influence_L[:5] > 0).all() and (influence_L[5:] == 0).all()
  else:  # pool='last', bidirectional: every token counts.
    assert (influence_L > 0).all()


def _count(preset):
  model = models.build(models.config('dual_encoder', preset))
  size = model.image['image_size']
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, 4), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def test_full_presets_build_with_public_param_counts():
  """HF openai/clip-vit-base-patch32 and google/siglip-base-patch16-224 (test_*_parity checks
  these numbers against transformers)."""
  assert _count('clip-vit-b32') == 151_277_313
  assert _count('siglip-b16-224') == 203_155_970
  models.check_config(models.config('dual_encoder', 'siglip-b16-224'), 224)


def test_config_merges_nested_overrides_and_defaults_are_clip_b32():
  config = models.config('dual_encoder', 'clip-tiny', image={'patch_size': 4})
  assert config.image.patch_size == 4 and config.image.width == 32
  models.check_config(config, 32)
  assert isinstance(models.kwargs(config)['image'], dict)
  default = dual_encoder.DualEncoder()
  assert default.image['patch_size'] == 32 and default.text['width'] == 512
  assert models.fields('dual_encoder')['embed_dim'] == 512


@pytest.mark.parametrize('preset,overrides,match', [
    ('clip-tiny', {'image': {'patch_size': 5}},
     'model.image.image_size=32 must be divisible by model.image.patch_size=5'),
    ('clip-tiny', {'image': {'pool': 'token'}}, r"model.image.pool='token'"),
    ('clip-tiny', {'text': {'act': 'relu'}}, r"model.text.act='relu'"),
    ('clip-tiny', {'text': {'width': 30}}, 'model.text.width=30 must be divisible'),
    ('clip-tiny', {'image': {'dropout': 0.1}}, r"unknown key\(s\) \['dropout'\] in "
     'config.model.image'),
    ('clip-tiny', {'image': {'patch_size': '8'}}, 'config.model.image.patch_size must be int'),
    ('clip-tiny', {'image': {'num_classes': 3}}, 'model.image.num_classes=3 must be 0'),
    ('clip-tiny', {'text': {'projection_dim': 32}}, 'model.text.projection_dim=32 must be 0'),
    ('clip-tiny', {'text': {'head_dim': 32}}, r"model.text.head_dim=32 must be 0 for kind='clip'"),
    ('clip-tiny', {'logit_bias_init': -10.0}, 'model.logit_bias_init=-10.0 must be 0.0'),
    ('clip-tiny', {'kind': 'align'}, r"model.kind='align'; allowed: \['clip', 'siglip'\]"),
    ('siglip-tiny', {'text': {'projection_dim': 32}}, 'set at most one'),
    ('siglip-tiny', {'embed_dim': 16}, 'model.image.width=32 must equal model.embed_dim=16'),
    ('siglip-tiny', {'text': {'head_dim': 16}},
     'model.text.head_dim=16 must equal model.embed_dim=32'),
])
def test_bad_configs_name_the_nested_key(preset, overrides, match):
  with pytest.raises(ValueError, match=match):
    models.check_config(models.config('dual_encoder', preset, **overrides), 32)


def test_resolution_must_match_and_unknown_preset():
  with pytest.raises(ValueError, match='resolution=64 must equal model.image.image_size=32'):
    models.check_config(models.config('dual_encoder', 'clip-tiny'), 64)
  with pytest.raises(ValueError, match='unknown dual_encoder preset'):
    dual_encoder.preset('clip-vit-h14')


def test_conv_stem_tower_builds_and_refuses_hf_export():
  """A CLIP with the ViT's convolutional stem trains like any other; HF has no stem to export to."""
  config = models.config('dual_encoder', 'clip-tiny', image=dict(stem_channels=(8, 16, 16)))
  models.check_config(config, 32)
  model = models.build(config)
  tokens, mask = _texts()
  params = random_params(model, _images(1), tokens[:1], mask[:1])
  assert params['vision_model']['embeddings']['patch_embedding']['kernel'].shape[:2] == (1, 1)
  with pytest.raises(ValueError, match=r'convolutional stem \(model.image.stem_channels\)'):
    convert.to_hf_dual(params)
  with pytest.raises(ValueError, match=r'model.image.stem_channels=\[8, 16\]'):
    models.check_config(models.config('dual_encoder', 'clip-tiny',
                                      image=dict(stem_channels=(8, 16))), 32)
