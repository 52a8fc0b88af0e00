"""Numerical parity of zoo's UNet and Attention with diffusers (PyTorch) on copied weights."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    Attention as TorchAttention, AttnAddedKVProcessor, AttnProcessor)

from zoo.convert import diffusers as convert  # noqa: E402
from zoo.models import unet  # noqa: E402
from zoo.nn import layers  # noqa: E402

torch.set_num_threads(2)


def torch_to_zoo(state_dict) -> dict:
  """zoo params (jnp arrays) from a torch module's state dict, through zoo.convert."""
  numpy_dict = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
  return jax.tree.map(jnp.asarray, convert.state_dict_to_params(numpy_dict))


def _randomize(module: torch.nn.Module, seed: int):
  """Perturbs every parameter so norm scales/biases and zero-initialised biases matter."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _flat_shapes(tree):
  return {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _zoo_and_torch(zoo_kwargs, torch_kwargs, seed):
  torch.manual_seed(seed)
  ref = UNet2DModel(**torch_kwargs).eval()
  _randomize(ref, seed)
  return unet.UNet(**zoo_kwargs), ref


CASES = {
    # SD-style embedding, multi-head attention, class-conditional with the null row.
    'class_conditional': (
        unet.preset('tiny') | dict(num_classes=10),
        dict(sample_size=16, block_out_channels=(16, 24), layers_per_block=1,
             down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
             up_block_types=('AttnUpBlock2D', 'UpBlock2D'), attention_head_dim=8,
             norm_num_groups=8, num_class_embeds=11)),
    # google/ddpm-* style: TF (0, 1) downsample padding, sin-first embedding, one head;
    # attention on a level that also downsamples, two resnets per level.
    'ddpm_style': (
        dict(block_out_channels=(16, 24), layers_per_block=2,
             down_block_types=('AttnDownBlock2D', 'DownBlock2D'),
             up_block_types=('UpBlock2D', 'AttnUpBlock2D'),
             attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6,
             flip_sin_to_cos=False, freq_shift=1.0, downsample_padding=0),
        dict(sample_size=16, block_out_channels=(16, 24), layers_per_block=2,
             down_block_types=('AttnDownBlock2D', 'DownBlock2D'),
             up_block_types=('UpBlock2D', 'AttnUpBlock2D'),
             attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6,
             flip_sin_to_cos=False, freq_shift=1, downsample_padding=0)),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_unet_matches_diffusers(case):
  zoo_kwargs, torch_kwargs = CASES[case]
  model, ref = _zoo_and_torch(zoo_kwargs, torch_kwargs, seed=len(case))
  rng = np.random.default_rng(0)
  x_BxHxWxC = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  t_B = np.array([3.0, 517.25], np.float32)
  labels = np.array([2, 10]) if model.num_classes else None

  with torch.no_grad():
    expected = ref(torch.from_numpy(x_BxHxWxC.transpose(0, 3, 1, 2)), torch.from_numpy(t_B),
                   class_labels=None if labels is None else torch.from_numpy(labels)).sample
  expected = expected.numpy().transpose(0, 2, 3, 1)

  params = torch_to_zoo(ref.state_dict())
  shapes = nn.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), x_BxHxWxC, t_B, labels_B=labels)))['params']
  assert _flat_shapes(params) == _flat_shapes(shapes)
  forward = lambda p: model.apply({'params': p}, x_BxHxWxC, t_B, labels_B=labels)
  # Backend optimisation off halves the CPU compile; numerics stay within the tolerance.
  got = jax.jit(forward).lower(params).compile({'xla_backend_optimization_level': 0})(params)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)


def test_ddpm_cifar10_param_count_matches_diffusers():
  kwargs = unet.preset('ddpm-cifar10')
  with torch.device('meta'):
    ref = UNet2DModel(
        sample_size=32, block_out_channels=kwargs['block_out_channels'],
        layers_per_block=kwargs['layers_per_block'],
        down_block_types=kwargs['down_block_types'], up_block_types=kwargs['up_block_types'],
        attention_head_dim=None, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
        downsample_padding=0)
  expected = sum(p.numel() for p in ref.parameters())
  shapes = jax.eval_shape(unet.UNet(**kwargs).init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
  assert layers.param_count(shapes['params']) == expected == 35_746_307


def _attention_pair(only_cross, seed):
  channels, head_dim, groups, ctx_dim = 16, 4, 4, 12
  kwargs = dict(query_dim=channels, heads=channels // head_dim, dim_head=head_dim, bias=True,
                upcast_softmax=True, norm_num_groups=groups, eps=1e-5)
  if only_cross:
    ref = TorchAttention(cross_attention_dim=ctx_dim, residual_connection=True,
                         processor=AttnProcessor(), **kwargs)
  else:
    ref = TorchAttention(added_kv_proj_dim=ctx_dim, processor=AttnAddedKVProcessor(), **kwargs)
  _randomize(ref, seed)
  zoo = layers.Attention(head_dim=head_dim, num_groups=groups, context_dim=ctx_dim,
                         only_cross_attention=only_cross)
  return zoo, ref.eval()


@pytest.mark.parametrize('only_cross', [False, True])
def test_cross_attention_matches_diffusers(only_cross):
  zoo, ref = _attention_pair(only_cross, seed=1 + only_cross)
  rng = np.random.default_rng(1)
  x_BxHxWxC = rng.standard_normal((2, 4, 4, 16)).astype(np.float32)
  ctx_BxLxD = rng.standard_normal((2, 5, 12)).astype(np.float32)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x_BxHxWxC.transpose(0, 3, 1, 2)),
                   encoder_hidden_states=torch.from_numpy(ctx_BxLxD))
  expected = expected.numpy().transpose(0, 2, 3, 1)
  params = torch_to_zoo(ref.state_dict())
  got = zoo.apply({'params': params}, x_BxHxWxC, ctx_BxLxD)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)
