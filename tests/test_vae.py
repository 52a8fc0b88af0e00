"""Shapes, parameter counts, posterior and latent-scaling conventions of the SD AutoencoderKL."""

import math

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax.core import meta  # noqa: E402

from zoo.models import vae  # noqa: E402
from zoo.nn import layers  # noqa: E402

# A 3-level tiny VAE (f=4) so that a middle level has both a downsampler and an upsampler.
TINY3 = vae.preset('tiny') | dict(block_out_channels=(16, 32, 32))


@pytest.fixture(scope='module')
def tiny3():
  """(model, params, encode+decode+call outputs) on a fixed 2x16x16x3 input."""
  model = vae.AutoencoderKL(**TINY3)
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1.0, maxval=1.0)

  @jax.jit
  def run(x):
    params = meta.unbox(model.init(jax.random.key(0), x)['params'])
    recon, mean, logvar = model.apply({'params': params}, x)
    dec = model.apply({'params': params}, mean, method='decode')
    sampled, _, _ = model.apply({'params': params}, x, rng=jax.random.key(2))
    return params, dict(mean=mean, logvar=logvar, dec=dec, recon=recon, sampled=sampled)

  params, out = run(x)
  return model, params, out


def _param_shapes(name):
  model = vae.AutoencoderKL(**vae.preset(name))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
  return meta.unbox(shapes['params'])


@pytest.fixture(scope='module')
def sd_shapes():
  return _param_shapes('sd')


def test_param_counts(sd_shapes):
  # sd/sd3 counts are diffusers' AutoencoderKL on the meta device (SD1.5 and SD3 configs).
  assert layers.param_count(sd_shapes) == 83_653_863
  assert layers.param_count(_param_shapes('sd3')) == 83_819_683
  assert layers.param_count(_param_shapes('tiny')) == 658_375
  # SDXL and Flux share those architectures and differ only in the latent scaling.
  assert vae.preset('sdxl') == vae.preset('sd') | dict(scaling_factor=0.13025)
  assert vae.preset('flux') == vae.preset('sd3') | dict(scaling_factor=0.3611, shift_factor=0.1159)


def test_sd_param_names_follow_diffusers(sd_shapes):
  p = sd_shapes
  enc, dec = p['encoder'], p['decoder']
  assert set(p) == {'encoder', 'decoder', 'quant_conv', 'post_quant_conv'}
  assert enc['conv_in']['kernel'].shape == (3, 3, 3, 128)
  assert set(enc['down_blocks_1']['resnets_0']) == {
      'norm1', 'conv1', 'norm2', 'conv2', 'conv_shortcut'}
  assert enc['down_blocks_0']['downsamplers_0']['conv']['kernel'].shape == (3, 3, 128, 128)
  assert 'downsamplers_0' not in enc['down_blocks_3']
  assert set(enc['mid_block']) == {'resnets_0', 'attentions_0', 'resnets_1'}
  assert set(enc['mid_block']['attentions_0']) == {
      'group_norm', 'to_q', 'to_k', 'to_v', 'to_out_0'}
  assert enc['conv_out']['kernel'].shape == (3, 3, 512, 8)
  assert p['quant_conv']['kernel'].shape == (1, 1, 8, 8)
  assert p['post_quant_conv']['kernel'].shape == (1, 1, 4, 4)
  assert dec['conv_in']['kernel'].shape == (3, 3, 4, 512)
  assert set(dec['up_blocks_0']) == {'resnets_0', 'resnets_1', 'resnets_2', 'upsamplers_0'}
  assert dec['up_blocks_3']['resnets_0']['conv_shortcut']['kernel'].shape == (1, 1, 256, 128)
  assert 'upsamplers_0' not in dec['up_blocks_3']
  assert dec['conv_out']['kernel'].shape == (3, 3, 128, 3)
  assert 'time_emb_proj' not in enc['down_blocks_0']['resnets_0']


def test_no_quant_conv_and_no_mid_attention():
  model = vae.AutoencoderKL(**vae.preset('tiny'), use_quant_conv=False, mid_block_attention=False)
  p = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3))))['params']
  assert set(p) == {'encoder', 'decoder'}
  assert 'attentions_0' not in p['encoder']['mid_block']
  assert 'attentions_0' not in p['decoder']['mid_block']


def test_shapes_dtypes_and_mode_decoding(tiny3):
  _, _, out = tiny3
  # f = 2**(levels - 1) = 4.
  assert out['mean'].shape == out['logvar'].shape == (2, 4, 4, 4)
  for key in ('dec', 'recon', 'sampled'):
    assert out[key].shape == (2, 16, 16, 3) and out[key].dtype == jnp.float32
  # Without an rng the forward pass decodes the posterior mean.
  np.testing.assert_allclose(out['recon'], out['dec'], atol=1e-6)
  assert float(jnp.max(jnp.abs(out['sampled'] - out['recon']))) > 1e-4


def test_logvar_is_clipped(tiny3):
  model, params, _ = tiny3

  @jax.jit
  def encode(logvar_bias):
    # Channels 4: of the moments are logvar; a huge bias saturates them whatever the input.
    bias = params['quant_conv']['bias'].at[4:].set(logvar_bias).at[:4].set(0.0)
    p = {**params, 'quant_conv': {**params['quant_conv'], 'bias': bias}}
    return model.apply({'params': p}, jnp.zeros((1, 4, 4, 3)), method='encode')

  for bias, expected in ((1e4, vae.LOGVAR_MAX), (-1e4, vae.LOGVAR_MIN)):
    mean, logvar = encode(bias)
    np.testing.assert_array_equal(logvar, jnp.full(logvar.shape, expected))
    assert float(jnp.max(jnp.abs(mean))) < 1e3


def test_latent_scaling_convention():
  mean = jnp.full((1, 2, 2, 4), 0.5)
  logvar = jnp.full((1, 2, 2, 4), -2.0)
  z = vae.to_latent(mean, logvar, None, scaling=1.5305, shift=0.0609)
  np.testing.assert_allclose(z, (0.5 - 0.0609) * 1.5305, rtol=1e-6)
  np.testing.assert_allclose(vae.from_latent(z, scaling=1.5305, shift=0.0609), mean, rtol=1e-6)
  # Defaults are SD1's: scale 0.18215, no shift.
  np.testing.assert_allclose(vae.to_latent(mean, logvar), 0.5 * 0.18215, rtol=1e-6)
  rng = jax.random.key(3)
  sample = vae.sample_posterior(mean, logvar, rng)
  np.testing.assert_allclose(vae.to_latent(mean, logvar, rng, 2.0, 0.25), (sample - 0.25) * 2.0,
                             rtol=1e-6)


def test_posterior_sample_statistics():
  n = 200_000
  mean = jnp.full((n, 1, 1, 2), jnp.array([1.5, -3.0]))
  logvar = jnp.full((n, 1, 1, 2), jnp.array([math.log(0.25), math.log(4.0)]))
  s = vae.sample_posterior(mean, logvar, jax.random.key(0)).reshape(n, 2)
  # Standard errors: sigma / sqrt(n) <= 0.0045; allow ~5 of them.
  np.testing.assert_allclose(jnp.mean(s, axis=0), [1.5, -3.0], atol=0.025)
  np.testing.assert_allclose(jnp.std(s, axis=0), [0.5, 2.0], rtol=0.01)
  np.testing.assert_array_equal(vae.sample_posterior(mean, logvar, None), mean)
  a = vae.sample_posterior(mean[:4], logvar[:4], jax.random.key(5))
  np.testing.assert_array_equal(a, vae.sample_posterior(mean[:4], logvar[:4], jax.random.key(5)))


@pytest.mark.parametrize('kwargs, resolution, match', [
    (dict(block_out_channels=(32, 48)), None, 'model.block_out_channels entry 48'),
    (dict(norm_num_groups=0), None, 'model.norm_num_groups'),
    (dict(block_out_channels=()), None, 'model.block_out_channels'),
    (dict(layers_per_block=0), None, 'model.layers_per_block'),
    (dict(latent_channels=0), None, 'model.latent_channels'),
    (dict(dtype='float16'), None, 'model.dtype'),
    (dict(scaling_factor=0.0), None, 'model.scaling_factor'),
    (dict(bogus=1), None, 'bogus'),
    (dict(), 68, r'resolution=68 must be divisible by .*=8'),
])
def test_check_config_errors(kwargs, resolution, match):
  with pytest.raises(ValueError, match=match):
    vae.check_config(kwargs, resolution)


def test_check_config_accepts_presets():
  for name in vae.PRESETS:
    vae.check_config(vae.preset(name), 256)
  with pytest.raises(ValueError, match='allowed'):
    vae.preset('nope')


def test_bad_inputs_raise():
  model = vae.AutoencoderKL(**TINY3)
  with pytest.raises(ValueError, match='input height=6'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 6, 8, 3))))
  with pytest.raises(ValueError, match='model.in_channels=3'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
