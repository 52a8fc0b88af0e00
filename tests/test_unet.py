"""UNet and shared layers: shapes, sizes, conditioning, precision, axis names, config errors."""

import math

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from zoo.models import unet  # noqa: E402
from zoo.nn import layers  # noqa: E402

from conftest import random_params, fast_jit

# Computed once with diffusers 0.42.1 UNet2DModel for ddpm-cifar10 (tests/test_unet_parity.py
# re-derives it); the others are zoo-only presets, pinned so size changes are deliberate.
PINNED_PARAMS = {'tiny': 117_643, 'digits': 2_504_257, 'ddpm-cifar10': 35_746_307,
                 'tiny-t2i': 253_364, 'sd15': 859_520_964}
RESOLUTION = {'tiny': 16, 'digits': 16, 'ddpm-cifar10': 32, 'tiny-t2i': 8, 'sd15': 64}
T_B = np.array([0.0, 999.0], np.float32)


def _inputs(model, res=16, batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal(
      (batch, res, res, model.in_channels)).astype(np.float32)






def _reference_embedding(t, dim, flip, shift, max_period=10000.0):
  """diffusers get_timestep_embedding, transcribed to numpy float32."""
  half = dim // 2
  exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - shift)
  args = t.astype(np.float32)[:, None] * np.exp(exponent.astype(np.float32))[None, :]
  emb = np.concatenate([np.sin(args), np.cos(args)], axis=-1)
  if flip:
    emb = np.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = np.pad(emb, ((0, 0), (0, 1)))
  return emb


@pytest.mark.parametrize('flip,shift', [(True, 0.0), (False, 1.0)])
@pytest.mark.parametrize('dim', [32, 7])
def test_timestep_embedding_matches_diffusers_formula(flip, shift, dim):
  t = np.array([0.0, 1.0, 37.5, 999.0], np.float32)
  got = np.asarray(layers.timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift))
  assert got.shape == (4, dim) and got.dtype == np.float32
  # exp() differs by an ulp between numpy and XLA; at t=999 that is ~1e-4 of phase.
  np.testing.assert_allclose(got, _reference_embedding(t, dim, flip, shift), atol=2e-4)
  half = dim // 2
  if flip:  # frequency 1 comes first: [cos(t), ..., sin(t), ...]
    np.testing.assert_allclose(got[:, 0], np.cos(t), atol=1e-6)
    np.testing.assert_allclose(got[:, half], np.sin(t), atol=1e-6)
  else:  # with shift 1 the last frequency is exactly 1/max_period
    np.testing.assert_allclose(got[:, half - 1], np.sin(t / 10000.0), atol=1e-6)
  if dim % 2:
    assert np.all(got[:, -1] == 0.0)


@pytest.mark.parametrize('name', sorted(unet.PRESETS))
def test_preset_shapes_and_pinned_param_counts(name):
  model = unet.UNet(**unet.preset(name))
  x = jnp.zeros((2, RESOLUTION[name], RESOLUTION[name], model.in_channels))
  ctx = dict(context_BxLxD=jnp.zeros((2, 7, model.context_dim))) if model.context_dim else {}
  variables = jax.eval_shape(model.init, jax.random.key(0), x, T_B, **ctx)
  assert set(variables) == {'params'}
  assert layers.param_count(variables['params']) == PINNED_PARAMS[name]
  out = jax.eval_shape(model.apply, variables, x, T_B, **ctx)
  assert out.shape == x.shape[:3] + (model.out_channels,) and out.dtype == jnp.float32
  unet.check_config(unet.preset(name), RESOLUTION[name])


# One fully conditioned tiny model (class + text context + dropout) serves several tests:
# every distinct UNet graph costs seconds of XLA compile on CPU.
COND_KWARGS = unet.preset('tiny') | dict(num_classes=3, context_dim=6, dropout=0.5)
COND_T = np.array([999, 999, 0], np.int32)


@pytest.fixture(scope='module')
def conditioned():
  """One sample thrice through the conditioned tiny UNet.

  Returns x, context, params, run(params, context) and its outputs on `context`:
  default_null = rows (t=999, no labels), (999, no labels), (0, no labels), eval mode;
  explicit = (scalar t=999.0, label 3 = null), (999.0, 0), (999.0, 3), eval mode;
  trained = default_null's inputs with train=True (dropout 0.5).
  """
  model = unet.UNet(**COND_KWARGS)
  x = np.repeat(_inputs(model, batch=1), 3, axis=0)
  ctx = np.random.default_rng(1).standard_normal((3, 5, 6)).astype(np.float32)
  params = random_params(model, x, 0.0, labels_B=jnp.zeros((3,), jnp.int32), context_BxLxD=ctx)

  def outputs(p, c):
    apply = lambda *args, **kw: model.apply({'params': p}, x, *args, context_BxLxD=c, **kw)
    # No 'dropout' rng outside training: it must not be needed there.
    return (apply(jnp.asarray(COND_T)),
            apply(999.0, labels_B=jnp.array([3, 0, 3])),
            apply(jnp.asarray(COND_T), train=True, rngs={'dropout': jax.random.key(0)}))

  run = fast_jit(outputs, params, ctx)
  return x, ctx, params, run, run(params, ctx)


def test_forward_time_and_class_conditioning(conditioned):
  _, _, params, _, (default_null, explicit, _) = conditioned
  assert params['class_embedding']['embedding'].shape == (4, 64)
  assert default_null.shape == (3, 16, 16, 3) and bool(jnp.all(jnp.isfinite(default_null)))
  # Scalar float t == broadcast int t, and omitted labels == the null row `num_classes`.
  np.testing.assert_allclose(explicit[0], default_null[0], atol=1e-6)
  assert float(jnp.abs(explicit[1] - explicit[0]).max()) > 1e-3  # labels condition
  assert float(jnp.abs(default_null[2] - default_null[0]).max()) > 1e-3  # t conditions


def test_context_and_dropout(conditioned):
  x, ctx, params, run, (default_null, _, trained) = conditioned
  assert params['mid_block']['attentions_0']['add_k_proj']['kernel'].shape == (6, 24)
  assert float(jnp.abs(trained - default_null).max()) > 1e-3  # dropout active in training
  again = run(params, ctx)
  np.testing.assert_array_equal(again[0], default_null)  # eval is deterministic
  assert float(jnp.abs(run(params, ctx + 1.0)[0] - default_null).max()) > 1e-3
  with pytest.raises(ValueError, match='context_dim'):
    unet.UNet(**COND_KWARGS).apply({'params': params}, x, COND_T)


def test_parameter_names_follow_diffusers():
  model = unet.UNet(**unet.preset('tiny'))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)), T_B[:1])
  paths = {'/'.join(k.key for k in path[:-1])
           for path, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(shapes)['params'])}
  expected_some = {
      'conv_in', 'time_embedding/linear_1', 'time_embedding/linear_2',
      'down_blocks_0/resnets_0/norm1', 'down_blocks_0/resnets_0/time_emb_proj',
      'down_blocks_0/downsamplers_0/conv', 'down_blocks_1/resnets_0/conv_shortcut',
      'down_blocks_1/attentions_0/group_norm', 'down_blocks_1/attentions_0/to_out_0',
      'mid_block/resnets_0/conv2', 'mid_block/attentions_0/to_q', 'mid_block/resnets_1/norm2',
      'up_blocks_0/resnets_1/conv_shortcut', 'up_blocks_0/attentions_1/to_v',
      'up_blocks_0/upsamplers_0/conv', 'up_blocks_1/resnets_1/conv1', 'conv_norm_out',
      'conv_out'}
  assert expected_some <= paths
  # No sampler past the last level, no shortcut where widths already match.
  forbidden = {'down_blocks_1/downsamplers_0/conv', 'up_blocks_1/upsamplers_0/conv',
               'down_blocks_0/resnets_0/conv_shortcut', 'up_blocks_1/resnets_2/conv1',
               'class_embedding'}
  assert not forbidden & paths


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32(conditioned):
  x, ctx, params, _, (out32, _, _) = conditioned
  model16 = unet.UNet(**(COND_KWARGS | dict(dtype='bfloat16')))
  boxed = jax.eval_shape(model16.init, jax.random.key(0), x, COND_T, context_BxLxD=ctx)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(boxed)} == {jnp.dtype('float32')}
  out16 = fast_jit(lambda p: model16.apply({'params': p}, x, COND_T, context_BxLxD=ctx),
                    params)(params)
  assert out16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out16)))
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert 0.0 < rel < 0.05


def test_group_norm_bfloat16_input_is_normalised_in_float32():
  x = jnp.asarray(np.random.default_rng(0).normal(300.0, 2.0, (2, 4, 4, 8)), jnp.bfloat16)
  norm = layers.GroupNorm(num_groups=2, dtype=jnp.bfloat16)
  y = norm.apply(norm.init(jax.random.key(0), x), x)
  assert y.dtype == jnp.bfloat16
  groups = np.asarray(y, np.float32).reshape(2, 16, 2, 4)
  np.testing.assert_allclose(groups.mean(axis=(1, 3)), 0.0, atol=0.02)
  np.testing.assert_allclose(groups.std(axis=(1, 3)), 1.0, atol=0.02)


def test_logical_axis_names_on_parameters():
  model = unet.UNet(**(unet.preset('tiny') | dict(num_classes=3)))
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)), T_B[:1])
  spec = nn.get_partition_spec(boxed)['params']
  # Image-facing channel axes (3 RGB channels) stay unsharded.
  assert spec['conv_in']['kernel'] == P(None, None, None, 'conv_out')
  assert spec['conv_in']['bias'] == P('conv_out')
  assert spec['conv_out']['kernel'] == P(None, None, 'conv_in', None)
  assert spec['conv_out']['bias'] == P(None)
  assert spec['time_embedding']['linear_1']['kernel'] == P('embed', 'mlp')
  assert spec['time_embedding']['linear_2']['bias'] == P('embed')
  assert spec['class_embedding']['embedding'] == P(None, 'embed')
  attn = spec['mid_block']['attentions_0']
  assert attn['to_q']['kernel'] == P('embed', 'heads')
  assert attn['to_out_0']['kernel'] == P('heads', 'embed')
  assert attn['group_norm']['scale'] == P()
  shapes = nn.unbox(boxed)['params']
  for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
    if leaf.ndim == 4 and path[0].key not in ('conv_in', 'conv_out'):
      node = spec
      for key in path:
        node = node[key.key]
      assert node == P(None, None, 'conv_in', 'conv_out'), jax.tree_util.keystr(path)


def test_masked_context_tokens_are_ignored():
  attn = layers.Attention(head_dim=4, num_groups=4, context_dim=6)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 3, 3, 8)).astype(np.float32)
  ctx = rng.standard_normal((2, 4, 6)).astype(np.float32)
  variables = {'params': random_params(attn, x, ctx)}
  mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)

  def run(v):
    return (attn.apply(v, x, ctx, mask), attn.apply(v, x, ctx),
            attn.apply(v, x[:1], ctx[:1, :2]), attn.apply(v, x[1:], ctx[1:]))

  masked, unmasked, first_truncated, second_full = fast_jit(run, variables)(variables)
  np.testing.assert_allclose(masked[0], first_truncated[0], atol=1e-6)
  np.testing.assert_allclose(masked[1], second_full[0], atol=1e-6)
  assert float(jnp.abs(masked[0] - unmasked[0]).max()) > 1e-4


BAD_CONFIGS = [
    (dict(down_block_types=('DownBlock2D',)), 16, 'model.down_block_types has 1 entries'),
    (dict(up_block_types=('UpBlock2D', 'CrossAttnUp')), 16, "allowed: \\['UpBlock2D'"),
    (dict(down_block_types=('DownBlock2D', 'Attn')), 16, 'model.down_block_types'),
    (dict(block_out_channels=(16, 20)), 16, 'model.norm_num_groups=8'),
    (dict(attention_head_dim=7), 16, 'model.attention_head_dim=7'),
    (dict(dtype='float16'), 16, "allowed: \\['bfloat16', 'float32'\\]"),
    (dict(downsample_padding=2), 16, 'model.downsample_padding'),
    (dict(layers_per_block=0), 16, 'model.layers_per_block'),
    (dict(dropout=1.0), 16, 'model.dropout'),
    (dict(sample_size=32), 16, "unknown UNet config keys \\['sample_size'\\]"),
    (dict(), 15, 'resolution=15 must be divisible by .*=2'),
]


@pytest.mark.parametrize('overrides,resolution,match', BAD_CONFIGS)
def test_check_config_rejects(overrides, resolution, match):
  with pytest.raises(ValueError, match=match):
    unet.check_config(unet.preset('tiny') | overrides, resolution)


def test_model_rejects_bad_inputs_early():
  model = unet.UNet(**unet.preset('tiny'))
  init = lambda x, **kw: jax.eval_shape(model.init, jax.random.key(0), x, T_B, **kw)
  with pytest.raises(ValueError, match='in_channels=3'):
    init(jnp.zeros((2, 16, 16, 1)))
  with pytest.raises(ValueError, match='input width=9'):
    init(jnp.zeros((2, 16, 9, 3)))
  with pytest.raises(ValueError, match='num_classes=0'):
    init(jnp.zeros((2, 16, 16, 3)), labels_B=jnp.zeros((2,), jnp.int32))


def test_preset_returns_copy_and_rejects_unknown():
  cfg = unet.preset('tiny')
  cfg['layers_per_block'] = 99
  assert unet.PRESETS['tiny'].get('layers_per_block') == 1
  with pytest.raises(ValueError,
                     match="allowed: \\['ddpm-cifar10', 'digits', 'sd15', 'tiny', 'tiny-t2i'\\]"):
    unet.preset('huge')
