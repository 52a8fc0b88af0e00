"""Parity of zoo's cross-attention UNet with diffusers `UNet2DConditionModel` on copied weights.

Weights travel as they would from a real checkpoint: torch state dict -> safetensors file ->
`safetensors.numpy.load_file` -> `zoo.convert.diffusers.state_dict_to_params`.
"""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from zoo.convert import diffusers as convert  # noqa: E402
from zoo.models import unet  # noqa: E402
from zoo.nn import layers  # noqa: E402

torch.set_num_threads(2)

CTX_LEN, CTX_DIM, RES = 6, 12, 8
# SD-like two-level layout: cross-attention on the top level (which also downsamples) and in
# the mid block. diffusers' `attention_head_dim` here is the head count (the SD1 quirk).
TORCH_BASE = dict(
    sample_size=RES, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    mid_block_type='UNetMidBlock2DCrossAttn', attention_head_dim=4, norm_num_groups=8,
    cross_attention_dim=CTX_DIM)
ZOO_BASE = dict(
    in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    mid_block_type='UNetMidBlock2DCrossAttn', num_attention_heads=4, norm_num_groups=8,
    context_dim=CTX_DIM)
VARIANTS = {
    'conv_proj': ({}, {}),
    'linear_proj_2_layers': (
        dict(use_linear_projection=True, transformer_layers_per_block=2),
        dict(use_linear_projection=True, transformer_layers_per_block=2)),
}


def _randomize(module: torch.nn.Module, seed: int):
  """Perturbs every parameter so norm scales/biases and zero-initialised biases matter."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _via_safetensors(ref, tmp_path):
  path = str(tmp_path / 'unet.safetensors')
  safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
  return jax.tree.map(jnp.asarray, convert.state_dict_to_params(safetensors.numpy.load_file(path)))


def _flat_shapes(tree):
  return {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _inputs(masked):
  rng = np.random.default_rng(0)
  x_BxHxWxC = rng.standard_normal((2, RES, RES, 4)).astype(np.float32)
  t_B = np.array([7.0, 811.5], np.float32)
  ctx_BxLxD = rng.standard_normal((2, CTX_LEN, CTX_DIM)).astype(np.float32)
  # Row 0 keeps 4 of 6 tokens (trailing padding), row 1 hides one token in the middle.
  mask_BxL = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 1]], bool) if masked else None
  return x_BxHxWxC, t_B, ctx_BxLxD, mask_BxL


@pytest.mark.parametrize('masked', [False, True])
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_unet_cond_matches_diffusers(variant, masked, tmp_path):
  zoo_extra, torch_extra = VARIANTS[variant]
  torch.manual_seed(len(variant))
  ref = UNet2DConditionModel(**TORCH_BASE, **torch_extra).eval()
  _randomize(ref, seed=len(variant))
  model = unet.UNet(**ZOO_BASE, **zoo_extra)
  x_BxHxWxC, t_B, ctx_BxLxD, mask_BxL = _inputs(masked)

  with torch.no_grad():
    expected = ref(torch.from_numpy(x_BxHxWxC.transpose(0, 3, 1, 2)), torch.from_numpy(t_B),
                   encoder_hidden_states=torch.from_numpy(ctx_BxLxD),
                   encoder_attention_mask=None if mask_BxL is None else torch.from_numpy(
                       mask_BxL.astype(np.float32))).sample
  expected = expected.numpy().transpose(0, 2, 3, 1)

  params = _via_safetensors(ref, tmp_path)
  kwargs = dict(context_BxLxD=ctx_BxLxD, context_mask_BxL=mask_BxL)
  shapes = nn.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), x_BxHxWxC, t_B, **kwargs)))['params']
  assert _flat_shapes(params) == _flat_shapes(shapes)
  forward = lambda p: model.apply({'params': p}, x_BxHxWxC, t_B, **kwargs)
  got = jax.jit(forward).lower(params).compile({'xla_backend_optimization_level': 0})(params)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(got) - expected).max() <= 1e-4


def _meta_state_dict_to_shapes(state_dict):
  """Converted zoo param shapes of a meta-device state dict, without allocating it."""
  zero_views = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in state_dict.items()}
  return convert.state_dict_to_params(zero_views)


def test_sd15_preset_matches_diffusers_param_tree_and_count():
  kwargs = unet.preset('sd15')
  with torch.device('meta'):
    ref = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
  torch_count = sum(p.numel() for p in ref.parameters())
  shapes = jax.eval_shape(
      unet.UNet(**kwargs).init, jax.random.key(0), jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)),
      context_BxLxD=jnp.zeros((1, 77, 768)))['params']
  assert layers.param_count(shapes) == torch_count == 859_520_964
  converted = _meta_state_dict_to_shapes(ref.state_dict())
  assert _flat_shapes(converted) == _flat_shapes(nn.unbox(shapes))
