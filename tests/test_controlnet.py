"""ControlNet models: the zero-initialised copy leaves the base exact; scale, combine, errors."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import perturbed, random_params  # noqa: E402
from zoo import models  # noqa: E402
from zoo.models import controlnet  # noqa: E402
from zoo.models import dit  # noqa: E402
from zoo.models import unet  # noqa: E402

UNET = unet.preset('tiny') | dict(num_classes=3)
DIT = dit.preset('tiny') | dict(input_size=8, in_channels=3, num_classes=3, depth=3)
RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
T = np.array([5, 700], np.int32)
LABELS = np.array([0, 3], np.int32)  # 3 = the null class.


def _unet_pair(factor=1):
  widths = (8, 16)[:1 + (factor > 1)]
  base, control = unet.UNet(**UNET), controlnet.ControlNet(
      **UNET, conditioning_channels=1, conditioning_embedding_out_channels=widths)
  hint = RNG.uniform(size=(2, 8 * factor, 8 * factor, 1)).astype(np.float32)
  base_params = random_params(base, X, T, labels_B=LABELS)
  control_params = controlnet.from_base(
      jax.tree.map(np.asarray, random_params(control, X, T, hint, labels_B=LABELS, seed=1)),
      base_params)
  return base, base_params, control, control_params, hint


def _dit_pair():
  base = dit.DiT(**DIT)
  control = controlnet.DiTControlNet(**DIT, control_layers=2, conditioning_channels=3)
  hint = RNG.uniform(size=(2, 8, 8, 3)).astype(np.float32)
  base_params = random_params(base, X, T, labels_B=LABELS)
  control_params = controlnet.from_base(random_params(control, X, T, hint, labels_B=LABELS),
                                        base_params)
  return base, base_params, control, control_params, hint


def _zeroed(params):
  """The zero-initialised parts (zero convs, hint output, DiT input embed) set to zero again."""
  zero = ('controlnet_down_blocks', 'controlnet_mid_block', 'controlnet_blocks',
          'pos_embed_input')
  return {k: jax.tree.map(np.zeros_like, v) if k.startswith(zero) else v
          for k, v in params.items()}


@pytest.mark.parametrize('pair', [_unet_pair, _dit_pair])
def test_zero_initialised_controlnet_leaves_the_base_unchanged(pair):
  base, base_params, control, control_params, hint = pair()
  params = _zeroed(control_params)
  residuals = control.apply({'params': params}, X, T, hint, labels_B=LABELS)
  for r in jax.tree.leaves(residuals):
    assert not np.any(np.asarray(r))
  plain = base.apply({'params': base_params}, X, T, labels_B=LABELS)
  controlled = base.apply({'params': base_params}, X, T, labels_B=LABELS, control=residuals)
  # To float rounding: adding (zero) residuals changes the program, whose reductions XLA may
  # vectorise differently.
  np.testing.assert_allclose(np.asarray(controlled), np.asarray(plain), rtol=0, atol=2e-6)
  # Trained (non-zero) zero convs do steer the base.
  residuals = control.apply({'params': perturbed(params)}, X, T, hint, labels_B=LABELS)
  steered = base.apply({'params': base_params}, X, T, labels_B=LABELS, control=residuals)
  assert np.abs(np.asarray(steered) - np.asarray(plain)).max() > 1e-3


def test_fresh_init_is_zero_and_copies_the_base():
  base, base_params, control, _, hint = _unet_pair()
  fresh = control.init(jax.random.key(0), X, T, hint, labels_B=LABELS)['params']
  fresh = controlnet.from_base(nn.unbox(fresh), base_params)
  for k in ('conv_in', 'time_embedding', 'class_embedding', 'down_blocks_1', 'mid_block'):
    for a, b in zip(jax.tree.leaves(fresh[k]), jax.tree.leaves(base_params[k])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  residuals = control.apply({'params': fresh}, X, T, hint, labels_B=LABELS)
  assert all(not np.any(np.asarray(r)) for r in jax.tree.leaves(residuals))


def test_hint_factor_scale_and_combine():
  base, base_params, control, params, hint = _unet_pair(factor=2)
  assert control.hint_factor == 2
  params = perturbed(params)
  one = control.apply({'params': params}, X, T, hint, labels_B=LABELS)
  half = control.apply({'params': params}, X, T, hint, labels_B=LABELS, conditioning_scale=0.5)
  zero = control.apply({'params': params}, X, T, hint, labels_B=LABELS, conditioning_scale=0.0)
  for a, b, z in zip(jax.tree.leaves(one), jax.tree.leaves(half), jax.tree.leaves(zero)):
    np.testing.assert_allclose(np.asarray(b), 0.5 * np.asarray(a), rtol=1e-6, atol=1e-7)
    assert not np.any(np.asarray(z))
  both = controlnet.combine([half, half])
  for a, b in zip(jax.tree.leaves(both), jax.tree.leaves(one)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match='at least one'):
    controlnet.combine([])


def test_errors_name_the_problem():
  base, base_params, control, params, hint = _unet_pair()
  with pytest.raises(ValueError, match=r'hint is \(2, 16, 16, 1\).*needs \(2, 8, 8, 1\)'):
    control.apply({'params': params}, X, T, np.zeros((2, 16, 16, 1), np.float32),
                  labels_B=LABELS)
  with pytest.raises(ValueError, match='do not fit this UNet'):
    residuals = control.apply({'params': params}, X, T, hint, labels_B=LABELS)
    base.apply({'params': base_params}, X, T, labels_B=LABELS,
               control=controlnet.Residuals(residuals.down[:-1], residuals.mid))
  _, dit_params, _, _, _ = _dit_pair()
  with pytest.raises(ValueError, match='share no entry'):
    controlnet.from_base(params, dit_params)
  bad = models.config('controlnet', 'tiny')
  bad.hint_size = 3
  with pytest.raises(ValueError, match='hint_size'):
    models.check_config(bad, 16)
  with pytest.raises(ValueError, match='unknown'):
    models.config('controlnet', 'tiny', hint_size=3)
  with pytest.raises(ValueError, match=r'control_layers=4 must lie in \[1, model.depth=3\]'):
    models.check_config(models.config('dit_controlnet', 'tiny', depth=3, control_layers=4), 8)
  dit_base, dit_base_params, dit_control, dit_control_params, dit_hint = _dit_pair()
  residuals = dit_control.apply({'params': dit_control_params}, X, T, dit_hint, labels_B=LABELS)
  with pytest.raises(ValueError, match='do not fit this DiT'):
    dit_base.apply({'params': dit_base_params}, X, T, labels_B=LABELS,
                   control=residuals + residuals)
