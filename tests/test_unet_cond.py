"""Cross-attention (SD-style) UNet: shapes, names, context masking, config errors, remat."""


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

KWARGS = unet.preset('tiny-t2i')
T_B = np.array([3.0, 900.0], np.float32)


def _example(batch=2, res=8, channels=4, ctx_len=5, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((batch, res, res, channels)).astype(np.float32),
          rng.standard_normal((batch, ctx_len, KWARGS['context_dim'])).astype(np.float32))






def _paths(tree):
  return {'/'.join(k.key for k in path[:-1]) for path, _ in
          jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize('res,channels', [(8, 4), (32, 3)])
def test_tiny_t2i_shapes(res, channels):
  model = unet.UNet(**(KWARGS | dict(in_channels=channels, out_channels=channels)))
  x, ctx = _example(res=res, channels=channels)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, T_B, context_BxLxD=ctx)
  out = jax.eval_shape(model.apply, variables, x, T_B, context_BxLxD=ctx,
                       context_mask_BxL=jnp.ones(ctx.shape[:2], bool))
  assert out.shape == x.shape and out.dtype == jnp.float32
  unet.check_config(KWARGS, res)


def test_cross_attention_parameter_names_shapes_and_axes():
  model = unet.UNet(**(KWARGS | dict(transformer_layers_per_block=2)))
  x, ctx = _example()
  boxed = jax.eval_shape(model.init, jax.random.key(0), x, T_B, context_BxLxD=ctx)
  shapes = nn.unbox(boxed)['params']
  block = 'down_blocks_1/attentions_0/transformer_blocks_1'
  expected_some = {
      'down_blocks_1/attentions_0/norm', 'down_blocks_1/attentions_0/proj_in',
      f'{block}/norm1', f'{block}/attn1/to_q', f'{block}/attn2/to_k', f'{block}/attn2/to_out_0',
      f'{block}/norm3', f'{block}/ff/net_0/proj', f'{block}/ff/net_2',
      'mid_block/attentions_0/transformer_blocks_0/attn2/to_v', 'mid_block/resnets_1/conv1',
      'up_blocks_0/attentions_1/proj_out', 'up_blocks_0/upsamplers_0/conv'}
  assert expected_some <= _paths(shapes)
  assert not {'down_blocks_0/attentions_0/norm', 'up_blocks_1/attentions_0/norm'} & _paths(shapes)
  attn2 = shapes['down_blocks_1']['attentions_0']['transformer_blocks_1']['attn2']
  assert set(attn2['to_k']) == {'kernel'} and attn2['to_k']['kernel'].shape == (32, 32)
  assert set(attn2['to_out_0']) == {'kernel', 'bias'}
  ff = shapes['down_blocks_1']['attentions_0']['transformer_blocks_1']['ff']
  assert ff['net_0']['proj']['kernel'].shape == (32, 2 * 4 * 32)
  assert shapes['down_blocks_1']['attentions_0']['proj_in']['kernel'].shape == (1, 1, 32, 32)
  spec = nn.get_partition_spec(boxed)['params']['mid_block']['attentions_0']
  assert spec['transformer_blocks_0']['attn2']['to_k']['kernel'] == P(None, 'heads')
  assert spec['transformer_blocks_0']['ff']['net_0']['proj']['kernel'] == P('embed', 'mlp')
  linear = unet.UNet(**(KWARGS | dict(use_linear_projection=True)))
  lin = jax.eval_shape(linear.init, jax.random.key(0), x, T_B, context_BxLxD=ctx)['params']
  assert nn.unbox(lin)['mid_block']['attentions_0']['proj_out']['kernel'].shape == (32, 32)


def test_context_mask_hides_masked_tokens():
  model = unet.UNet(**KWARGS)
  x, ctx = _example(ctx_len=5)
  mask_BxL = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  params = random_params(model, x, T_B, context_BxLxD=ctx, context_mask_BxL=mask_BxL)
  run = fast_jit(lambda p, c: model.apply({'params': p}, x, T_B, context_BxLxD=c,
                                           context_mask_BxL=mask_BxL), params, ctx)
  base = np.asarray(run(params, ctx))
  masked_changed, unmasked_changed = ctx.copy(), ctx.copy()
  masked_changed[0, 3:] += 5.0
  unmasked_changed[0, 1] += 5.0
  np.testing.assert_allclose(np.asarray(run(params, masked_changed))[0], base[0], atol=1e-6)
  assert np.abs(np.asarray(run(params, unmasked_changed))[0] - base[0]).max() > 1e-3
  # Row 1 sees every token, so the same edit on row 1's tail is visible.
  tail_changed = ctx.copy()
  tail_changed[1, 3:] += 5.0
  out = np.asarray(run(params, tail_changed))
  np.testing.assert_array_equal(out[0], base[0])
  assert np.abs(out[1] - base[1]).max() > 1e-3


def test_remat_gives_same_output_and_gradients():
  x, ctx = _example()
  # One level (cross-attention down, mid and up) keeps the two backward graphs small.
  small = KWARGS | dict(block_out_channels=(16,), down_block_types=('CrossAttnDownBlock2D',),
                        up_block_types=('CrossAttnUpBlock2D',), dropout=0.1)
  plain, remat = unet.UNet(**small), unet.UNet(**(small | dict(remat=True)))
  params = random_params(plain, x, T_B, context_BxLxD=ctx)
  remat_shapes = jax.eval_shape(remat.init, jax.random.key(0), x, T_B, context_BxLxD=ctx)
  assert _paths(nn.unbox(remat_shapes)['params']) == _paths(params)

  def loss(model, p, train):
    out = model.apply({'params': p}, x, T_B, context_BxLxD=ctx, train=train,
                      rngs={'dropout': jax.random.key(1)})
    return jnp.mean(jnp.square(out - x)), out

  # Dropout is on in training, so equal results also show that the recomputation redraws the
  # same dropout masks. One program for all three keeps the CPU compile to one.
  def everything(p):
    return (jax.value_and_grad(lambda q: loss(plain, q, True), has_aux=True)(p),
            jax.value_and_grad(lambda q: loss(remat, q, True), has_aux=True)(p),
            loss(plain, p, False)[1])

  ((loss_p, out_p), grad_p), ((loss_r, out_r), grad_r), out_eval = fast_jit(
      everything, params)(params)
  assert float(jnp.abs(out_p - out_eval).max()) > 1e-4  # dropout really was active
  np.testing.assert_allclose(out_r, out_p, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss_r, loss_p, rtol=1e-5)
  for (path, g_r), g_p in zip(jax.tree_util.tree_leaves_with_path(grad_r),
                              jax.tree_util.tree_leaves(grad_p)):
    np.testing.assert_allclose(g_r, g_p, atol=1e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


BAD_CONFIGS = [
    (dict(context_dim=0), 'need model.context_dim > 0'),
    (dict(context_dim=0, down_block_types=('DownBlock2D',) * 2,
          up_block_types=('UpBlock2D',) * 2), 'need model.context_dim > 0'),
    (dict(num_attention_heads=3), 'model.num_attention_heads=3 must divide'),
    (dict(num_attention_heads=0), 'model.num_attention_heads=0 must be >= 1'),
    (dict(transformer_layers_per_block=0), 'model.transformer_layers_per_block=0'),
    (dict(mid_block_type='MidCross'), "model.mid_block_type='MidCross'; allowed: "),
    (dict(mid_block_attention=False), 'model.mid_block_attention=False contradicts'),
    (dict(down_block_types=('DownBlock2D', 'CrossAttnDown')), 'CrossAttnDownBlock2D'),
]


@pytest.mark.parametrize('overrides,match', BAD_CONFIGS)
def test_check_config_rejects(overrides, match):
  with pytest.raises(ValueError, match=match):
    unet.check_config(KWARGS | overrides, 8)


def test_model_rejects_bad_inputs_early():
  model = unet.UNet(**KWARGS)
  x, ctx = _example()
  init = lambda **kw: jax.eval_shape(model.init, jax.random.key(0), x, T_B, **kw)
  with pytest.raises(ValueError, match='pooled_BxD must be None'):
    init(context_BxLxD=ctx, pooled_BxD=jnp.zeros((2, 32)))
  with pytest.raises(ValueError, match='context_dim=32: pass context_BxLxD'):
    init()
  with pytest.raises(ValueError, match='width 7 but model.context_dim=32'):
    init(context_BxLxD=jnp.zeros((2, 5, 7)))
  with pytest.raises(ValueError, match='context_mask_BxL must be None or shaped'):
    init(context_BxLxD=ctx, context_mask_BxL=jnp.ones((2, 4), bool))


def test_sd15_preset_is_stable_diffusion_15():
  kwargs = unet.preset('sd15')
  unet.check_config(kwargs, 64)
  model = unet.UNet(**kwargs)
  x = jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32)
  ctx = jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, T_B[:1],
                                   context_BxLxD=ctx))['params']
  assert layers.param_count(shapes) == 859_520_964
  attn = shapes['up_blocks_3']['attentions_2']['transformer_blocks_0']
  assert attn['attn2']['to_k']['kernel'].shape == (768, 320)
  assert attn['ff']['net_0']['proj']['kernel'].shape == (320, 2560)
  assert 'attentions_0' not in shapes['down_blocks_3']
  assert 'attentions_0' not in shapes['up_blocks_0']
