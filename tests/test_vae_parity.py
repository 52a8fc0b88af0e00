"""Numerical parity of zoo's AutoencoderKL with diffusers' (PyTorch) on converted weights."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL as TorchAutoencoderKL  # noqa: E402
from flax.core import meta  # noqa: E402

from zoo.convert import diffusers as convert  # noqa: E402
from zoo.models import vae  # noqa: E402

torch.set_num_threads(2)


def torch_to_zoo(state_dict) -> dict:
  """zoo params (jnp arrays) from a torch module's state dict, through zoo.convert."""
  numpy_dict = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
  return jax.tree.map(jnp.asarray, convert.state_dict_to_params(numpy_dict))


def _flat_shapes(tree):
  return {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


CASES = {
    # 3 levels: encoder downsamplers on levels 0-1, decoder upsamplers on up_blocks 0-1.
    'sd_like': dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                    norm_num_groups=8),
    # SD3/Flux style: 2 resnets per level, no quant convs, no mid-block attention.
    'no_quant_no_attn': dict(block_out_channels=(16, 24), layers_per_block=2, latent_channels=6,
                             norm_num_groups=8, use_quant_conv=False, mid_block_attention=False),
}


def _reference(kw, seed):
  torch.manual_seed(seed)
  levels = len(kw['block_out_channels'])
  ref = TorchAutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=kw['block_out_channels'],
      down_block_types=('DownEncoderBlock2D',) * levels,
      up_block_types=('UpDecoderBlock2D',) * levels, layers_per_block=kw['layers_per_block'],
      latent_channels=kw['latent_channels'], norm_num_groups=kw['norm_num_groups'],
      use_quant_conv=kw.get('use_quant_conv', True),
      use_post_quant_conv=kw.get('use_quant_conv', True),
      mid_block_add_attention=kw.get('mid_block_attention', True)).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    # Perturb everything so norm scales/biases and zero-initialised biases matter.
    for p in ref.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return ref


@pytest.mark.parametrize('case', sorted(CASES))
def test_encode_decode_match_diffusers(case):
  kw = CASES[case]
  ref = _reference(kw, seed=0)
  model = vae.AutoencoderKL(**kw)
  x_BxHxWxC = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  params = torch_to_zoo(ref.state_dict())
  shapes = meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x_BxHxWxC)))
  assert _flat_shapes(params) == _flat_shapes(shapes['params'])

  @jax.jit
  def run(params, x, z):
    mean, logvar = model.apply({'params': params}, x, method='encode')
    return mean, logvar, model.apply({'params': params}, z, method='decode')

  f = 2 ** (len(kw['block_out_channels']) - 1)
  z_BxhxwxZ = np.random.default_rng(1).normal(
      size=(2, 16 // f, 16 // f, kw['latent_channels'])).astype(np.float32)
  mean, logvar, dec = run(params, x_BxHxWxC, z_BxhxwxZ)
  with torch.no_grad():
    posterior = ref.encode(torch.from_numpy(x_BxHxWxC).permute(0, 3, 1, 2)).latent_dist
    ref_dec = ref.decode(torch.from_numpy(z_BxhxwxZ).permute(0, 3, 1, 2)).sample
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  for name, got, want in (('mean', mean, posterior.mean), ('logvar', logvar, posterior.logvar),
                          ('decode', dec, ref_dec)):
    want = nhwc(want)
    assert got.shape == want.shape, name
    err = float(np.max(np.abs(np.asarray(got) - want)))
    assert err <= 1e-4, f'{name}: max abs err {err} (scale {np.max(np.abs(want)):.3g})'
