"""Parity of zoo's DiT with diffusers' DiTTransformer2DModel through zoo.convert.dit."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from zoo.convert import dit as convert_dit
from zoo.models import dit

torch.set_num_threads(2)

TINY = dit.preset('tiny')
# diffusers' CombinedTimestepLabelEmbeddings uses downscale_freq_shift=1 (the original DiT: 0).
DIFFUSERS_FREQ_SHIFT = 1.0
EMB = 'transformer_blocks.0.norm1.emb.'


def _torch_model(seed=0):
  torch.manual_seed(seed)
  hidden, heads = TINY['hidden_size'], TINY['num_heads']
  model = DiTTransformer2DModel(
      num_attention_heads=heads, attention_head_dim=hidden // heads,
      in_channels=TINY['in_channels'], out_channels=2 * TINY['in_channels'],
      num_layers=TINY['depth'], sample_size=TINY['input_size'], patch_size=TINY['patch_size'],
      num_embeds_ada_norm=TINY['num_classes'], norm_eps=1e-6).eval()
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():  # The zero-initialised adaLN / output layers must matter.
      p.add_(0.2 * torch.randn(p.shape, generator=gen))
    # A converted checkpoint has one timestep/label embedder; diffusers keeps a copy per block.
    state = model.state_dict()
    for key in state:
      if '.norm1.emb.' in key:
        state[key].copy_(state[EMB + key.split('.norm1.emb.')[1]])
  return model


def _numpy_state_dict(torch_model):
  """What safetensors.numpy.load_file gives for the model's saved safetensors."""
  return {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}


def test_positions_match_diffusers():
  ref = get_2d_sincos_pos_embed(64, 6, base_size=6, output_type='pt').numpy()
  np.testing.assert_allclose(dit.sincos_pos_embed(64, 6), ref, atol=1e-6)


def _run_both(t_B):
  torch_model = _torch_model()
  params = convert_dit.from_diffusers(_numpy_state_dict(torch_model), TINY)
  rng = np.random.default_rng(0)
  x_BxHxWxC = rng.standard_normal((len(t_B), 8, 8, 4)).astype(np.float32)
  labels_B = np.array([3, 10, 0])[:len(t_B)]  # 10 = the null class.
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x_BxHxWxC.transpose(0, 3, 1, 2)),
                      timestep=torch.from_numpy(t_B), class_labels=torch.from_numpy(labels_B),
                      return_dict=False)[0].numpy().transpose(0, 2, 3, 1)

  def zoo(freq_shift):
    model = dit.DiT(**(TINY | {'freq_shift': freq_shift}))
    return np.asarray(model.apply({'params': params}, x_BxHxWxC, t_B, labels_B=labels_B))

  return zoo, ref


def test_dit_matches_diffusers():
  zoo, ref = _run_both(np.array([0.0, 17.0, 250.0], np.float32))
  out = zoo(DIFFUSERS_FREQ_SHIFT)
  assert out.shape == ref.shape == (3, 8, 8, 8)
  assert np.abs(ref).max() > 1.0  # The comparison is not between zero maps.
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  # Without diffusers' shift the frequency grid differs measurably: the field is needed.
  assert np.abs(zoo(0.0) - ref).max() > 1e-2


def test_dit_matches_diffusers_at_large_t():
  """At t=999 float32 sin/cos phases carry ~5e-5 error (t * ulp) in torch and zoo alike.

  Both are that far from a float64 embedding, so compare relative to the output scale.
  """
  zoo, ref = _run_both(np.array([999.0, 640.0], np.float32))
  scale = np.abs(ref).max()
  assert scale > 1.0
  assert np.abs(zoo(DIFFUSERS_FREQ_SHIFT) - ref).max() <= 1e-4 * scale


def _flat(params):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_facebook_names_round_trip_exactly():
  """diffusers -> zoo (parity-tested above) -> facebookresearch/DiT names -> zoo, bit-exact."""
  params = convert_dit.from_diffusers(_numpy_state_dict(_torch_model()), TINY)
  state = convert_dit.to_facebook(params)
  assert state['blocks.1.attn.qkv.weight'].shape == (96, 32)
  assert state['x_embedder.proj.weight'].shape == (32, 4, 2, 2)  # OIHW, as torch stores it.
  assert 't_embedder.mlp.2.bias' in state and 'final_layer.adaLN_modulation.1.weight' in state
  grid = TINY['input_size'] // TINY['patch_size']
  state['pos_embed'] = dit.sincos_pos_embed(TINY['hidden_size'], grid)[None]
  back = _flat(convert_dit.from_facebook(state, TINY))
  want = _flat(params)
  assert back.keys() == want.keys()
  for key, value in want.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


@pytest.mark.parametrize('edit,match', [
    (lambda sd: sd.pop('transformer_blocks.1.attn1.to_k.weight'),
     "lacks diffusers key 'transformer_blocks.1.attn1.to_k.weight'"),
    (lambda sd: sd.pop('transformer_blocks.1.ff.net.2.bias'),
     r"lacks keys \['transformer_blocks.1.ff.net.2.bias'\]"),
    (lambda sd: sd.update({'transformer_blocks.0.norm2.weight': np.ones(32, np.float32)}),
     "'transformer_blocks.0.norm2.weight' is not a DiTTransformer2DModel parameter"),
    (lambda sd: sd['transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias'].__iadd__(1),
     "'transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias' differs"),
    (lambda sd: sd.update({'proj_out_2.bias': np.zeros(16, np.float32)}),
     r"'proj_out_2.bias' has shape \(16,\)"),
])
def test_diffusers_converter_names_bad_keys(edit, match):
  state = _numpy_state_dict(_torch_model())
  edit(state)
  with pytest.raises(ValueError, match=match):
    convert_dit.from_diffusers(state, TINY)


def test_facebook_converter_names_bad_keys():
  params = convert_dit.from_diffusers(_numpy_state_dict(_torch_model()), TINY)
  state = convert_dit.to_facebook(params)
  with pytest.raises(ValueError, match=r"lacks keys \['y_embedder.embedding_table.weight'\]"):
    convert_dit.from_facebook({k: v for k, v in state.items() if 'y_embedder' not in k}, TINY)
  with pytest.raises(ValueError, match="'blocks.2.mlp.fc1.bias' is not used"):
    convert_dit.from_facebook(state | {'blocks.2.mlp.fc1.bias': np.zeros(128)}, TINY)
  with pytest.raises(ValueError, match='pos_embed is not the 2-D sin-cos table'):
    convert_dit.from_facebook(state | {'pos_embed': np.zeros((1, 16, 32))}, TINY)
  # Text conditioning is a zoo extension: its params round-trip by the same naming rule.
  t2i = dit.preset('tiny-t2i')
  missing = "lacks keys .*'blocks.0.cross_attn.q_linear.weight'"
  with pytest.raises(ValueError, match=missing):
    convert_dit.from_facebook({k: v for k, v in state.items() if 'y_embedder' not in k}, t2i)
