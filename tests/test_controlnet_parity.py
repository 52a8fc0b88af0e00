"""Parity of zoo's ControlNet (and the UNet's control input) with diffusers `ControlNetModel`.

Weights travel as from a real checkpoint: torch state dict -> safetensors -> numpy ->
`zoo.convert.diffusers.state_dict_to_params`. The base is diffusers' `UNet2DConditionModel`
fed `down_block_additional_residuals` / `mid_block_additional_residual`.
"""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import ControlNetModel  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from tests import test_unet_cond_parity as cond_parity  # noqa: E402
from zoo.models import controlnet  # noqa: E402
from zoo.models import unet  # noqa: E402

torch.set_num_threads(2)

RES, HINT_WIDTHS, NUM_CLASSES = cond_parity.RES, (8, 16), 4
TORCH_CONTROL = {k: v for k, v in cond_parity.TORCH_BASE.items()
                 if k not in ('sample_size', 'out_channels', 'up_block_types')}


def _torch(t):
  return torch.from_numpy(np.ascontiguousarray(t))


def _nchw(x):
  return _torch(x.transpose(0, 3, 1, 2))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('classes', [0, NUM_CLASSES])
def test_controlnet_and_controlled_unet_match_diffusers(classes, tmp_path):
  torch.manual_seed(classes)
  extra = dict(num_class_embeds=classes + 1) if classes else {}
  ref_base = UNet2DConditionModel(**cond_parity.TORCH_BASE, **extra).eval()
  ref_control = ControlNetModel(**TORCH_CONTROL, conditioning_embedding_out_channels=HINT_WIDTHS,
                                **extra).eval()
  cond_parity._randomize(ref_base, seed=1)
  cond_parity._randomize(ref_control, seed=2)
  rng = np.random.default_rng(3)
  x, t, ctx, _ = cond_parity._inputs(masked=False)
  hint = rng.uniform(size=(2, 2 * RES, 2 * RES, 3)).astype(np.float32)
  labels = np.array([1, classes], np.int64) if classes else None
  scale = 0.7
  with torch.no_grad():
    down, mid = ref_control(_nchw(x), _torch(t), encoder_hidden_states=_torch(ctx),
                            controlnet_cond=_nchw(hint), conditioning_scale=scale,
                            class_labels=None if labels is None else _torch(labels),
                            return_dict=False)
    expected = ref_base(_nchw(x), _torch(t), encoder_hidden_states=_torch(ctx),
                        class_labels=None if labels is None else _torch(labels),
                        down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample

  kw = dict(cond_parity.ZOO_BASE, num_classes=classes)
  model = controlnet.ControlNet(**kw, conditioning_embedding_out_channels=HINT_WIDTHS)
  control_params = cond_parity._via_safetensors(ref_control, tmp_path)
  base_params = cond_parity._via_safetensors(ref_base, tmp_path)
  call = dict(labels_B=labels, context_BxLxD=ctx)
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, hint, **call)))
  assert cond_parity._flat_shapes(control_params) == cond_parity._flat_shapes(shapes['params'])
  got = jax.jit(lambda p: model.apply({'params': p}, x, t, hint, conditioning_scale=scale,
                                      **call))(control_params)
  assert len(got.down) == len(down) == 4
  for g, e in zip((*got.down, got.mid), (*down, mid)):
    np.testing.assert_allclose(np.asarray(g), _nhwc(e), atol=1e-4, rtol=1e-4)
  out = jax.jit(lambda p, c: unet.UNet(**kw).apply({'params': p}, x, t, control=c, **call))(
      base_params, got)
  assert np.abs(np.asarray(out) - _nhwc(expected)).max() <= 1e-4
