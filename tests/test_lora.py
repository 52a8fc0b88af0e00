"""LoRA: merge == the unmerged forward, a run trains the adapters alone, files load back (zoo
and diffusers / PEFT), and bad settings fail before anything compiles."""

import os

import jax
import numpy as np
import pytest

from conftest import REPO
from conftest import random_params
from zoo import config as zoo_config
from zoo import main as zoo_main
from zoo import models
from zoo import runs
from zoo import train
from zoo.nn import lora


def _tiny_unet():
  model = models.build(models.config('unet', preset='tiny', num_classes=4, context_dim=12,
                                     down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                                     up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
                                     mid_block_type='UNetMidBlock2DCrossAttn',
                                     num_attention_heads=2))
  rng = np.random.default_rng(0)
  args = (rng.standard_normal((2, 8, 8, 3)).astype(np.float32), np.array([5.0, 500.0], np.float32))
  kwargs = dict(labels_B=np.array([1, 4]),
                context_BxLxD=rng.standard_normal((2, 3, 12)).astype(np.float32))
  return model, random_params(model, *args, **kwargs), args, kwargs


def _nonzero(adapters, seed=1):
  """Adapters whose B is not zero (a fresh one is: it must leave the model unchanged)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
      if p[-1].key == 'lora_b' else x, adapters)


def test_merged_equals_unmerged_forward_and_unmerge_inverts():
  model, params, args, kwargs = _tiny_unet()
  adapters = lora.init(jax.random.key(0), params, 4, lora.DEFAULT_TARGETS)
  found = lora.targets_of(params, lora.DEFAULT_TARGETS)
  assert any('attn2' in '/'.join(p) for p in found) and any('ff' in p for p in found)
  base = model.apply({'params': params}, *args, **kwargs)
  # A fresh adapter (B = 0) is the identity, exactly.
  np.testing.assert_array_equal(
      model.apply({'params': lora.merge(params, adapters, 2.0)}, *args, **kwargs), base)
  adapters = _nonzero(adapters)
  merged = model.apply({'params': lora.merge(params, adapters, 2.0)}, *args, **kwargs)
  unmerged = lora.apply_unmerged(model, params, adapters, 2.0, *args, **kwargs)
  assert np.abs(np.asarray(merged) - np.asarray(base)).max() > 1e-2  # the adapters matter
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=2e-5, rtol=0)
  back = lora.unmerge(lora.merge(params, adapters, 2.0), adapters, 2.0)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_diffusers_loads_our_unet_lora_file(tmp_path):
  """A zoo-trained U-Net LoRA, saved in the diffusers / PEFT naming, loads into diffusers'
  UNet2DConditionModel (`load_lora_adapter`) and computes what zoo's merged model does."""
  torch = pytest.importorskip('torch')
  from diffusers import UNet2DConditionModel
  from zoo.convert import hub
  torch.manual_seed(0)
  ref = UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=4,
      norm_num_groups=8, cross_attention_dim=12).eval()
  ref.save_pretrained(tmp_path / 'hf')
  converted = hub.read('diffusers-unet', str(tmp_path / 'hf'))
  params, rank, alpha = converted.params, 4, 8.0
  adapters = _nonzero(lora.init(jax.random.key(1), params, rank, lora.DEFAULT_TARGETS))
  path = str(tmp_path / 'pytorch_lora_weights.safetensors')
  lora.save(path, adapters, rank=rank, alpha=alpha, naming='diffusers')

  # Loads back as the same model (alpha / rank is folded into B in this naming).
  again, r, a = lora.load(path, params)
  assert (r, a) == (rank, rank)
  for x, y in zip(jax.tree.leaves(lora.merge(params, again, a / r)),
                  jax.tree.leaves(lora.merge(params, adapters, alpha / rank))):
    np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)

  model = models.build(models.config('unet', **converted.kwargs))
  rng = np.random.default_rng(2)
  x, ctx = rng.standard_normal((1, 8, 8, 4)), rng.standard_normal((1, 3, 12))
  x, ctx, t = x.astype(np.float32), ctx.astype(np.float32), np.array([30.0], np.float32)
  got = model.apply({'params': lora.merge(params, adapters, alpha / rank)}, x, t,
                    context_BxLxD=ctx)
  ref.load_lora_adapter(path, prefix='unet')
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
               encoder_hidden_states=torch.from_numpy(ctx)).sample
  np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def _lora_config(base, **lora_kw):
  config = zoo_config.load(os.path.join(REPO, 'experiments', 'shapes_diffusion.py:smoke=True'),
                           ['--config.mesh.data=1', '--config.train.progress_bar=false',
                            '--config.train.steps=6'], validate_config=False)
  config.evals = zoo_config.ConfigDict()  # The run is sampled below instead.
  config.lora = zoo_config.ConfigDict(dict(rank=2, alpha=4.0, targets=lora.DEFAULT_TARGETS,
                                           base_from=str(base)) | lora_kw)
  return zoo_config.validate(config)


def test_lora_run_trains_adapters_only_and_exports(shapes_diffusion_run, tmp_path):
  base, base_config, _ = shapes_diffusion_run
  workdir = str(tmp_path / 'lora')
  state = train.train_and_evaluate(_lora_config(base), workdir)
  base_params = runs.load(str(base))[2]['ema_params']
  for a, b in zip(jax.tree.leaves(state['params']['base']), jax.tree.leaves(base_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # frozen, bit for bit
  trained = sum(x.size for x in jax.tree.leaves(state['params']['lora']))
  total = sum(x.size for x in jax.tree.leaves(state['params']['base']))
  assert 0 < trained < 0.05 * total
  b_moved = [np.abs(np.asarray(v['lora_b'])).max() for v in jax.tree.leaves(
      state['params']['lora'], is_leaf=lambda n: isinstance(n, dict) and 'lora_b' in n)]
  assert max(b_moved) > 0  # B starts at zero: the adapters trained

  # The adapters as a file load back as the run's (EMA) adapters, and the merged export is
  # the base plus them.
  file = str(tmp_path / 'adapters.safetensors')
  assert zoo_main.main(['export', '--workdir', workdir, '--lora', '--out', file]) == 0
  ema = runs.load(workdir)[2]['ema_params']
  adapters, rank, alpha = lora.load(file, jax.device_get(ema['base']))
  merged = lora.merge(jax.device_get(ema['base']), adapters, alpha / rank)
  want = lora.merge(jax.device_get(ema['base']), jax.device_get(ema['lora']), 4.0 / 2)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  assert zoo_main.main(['export', '--workdir', workdir, '--out', str(tmp_path / 'merged')]) == 0
  assert os.path.isfile(tmp_path / 'merged' / 'diffusion_pytorch_model.safetensors')
  del base_config


def test_bad_lora_settings_fail_before_compiling(shapes_diffusion_run, tmp_path):
  base = shapes_diffusion_run[0]
  with pytest.raises(ValueError, match='unknown key'):
    _lora_config(base, dropout=0.1)
  other = tmp_path / 'other'
  other.mkdir()
  theirs = zoo_config.load(os.path.join(REPO, 'experiments', 'shapes_diffusion.py:smoke=True'))
  theirs.model.block_out_channels = (8, 16)
  (other / 'config.json').write_text(zoo_config.to_json(theirs))
  with pytest.raises(ValueError, match='block_out_channels'):
    _lora_config(other)
  model, params, _, _ = _tiny_unet()
  with pytest.raises(ValueError, match='matches no 2-D kernel'):
    lora.check(params, 2, 'nothing_named_so')
  with pytest.raises(ValueError, match=r'rank=999 must be in \[1, '):
    lora.check(params, 999, lora.DEFAULT_TARGETS)
  del model
  with pytest.raises(ValueError, match='no pickles'):
    lora.load(str(tmp_path / 'x.bin'), params)
  wrong = lora.init(jax.random.key(0), params, 2, 'to_q/kernel$')
  path = str(tmp_path / 'w.safetensors')
  lora.save(path, wrong, rank=2, alpha=2.0)
  with pytest.raises(ValueError, match='not a Dense layer of this model'):
    lora.load(path, {'conv_in': params['conv_in']})
