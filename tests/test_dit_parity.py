"""Numerical parity of zoo's DiT with diffusers' DiTTransformer2DModel on copied weights."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DiTTransformer2DModel  # noqa: E402
from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: E402

from zoo.models import dit  # noqa: E402

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


def _linear(sd, prefix):
  return {'kernel': jnp.asarray(sd[prefix + '.weight'].T),
          'bias': jnp.asarray(sd[prefix + '.bias'])}


def diffusers_to_zoo(state_dict, depth) -> dict:
  """zoo DiT params from a diffusers DiTTransformer2DModel state dict (fp32 numpy copies).

  Conv OIHW -> HWIO, linear W -> W.T, to_q/to_k/to_v concatenated into the fused `qkv`, and
  the block-0 embedders become the single t_embedder / y_embedder.
  """
  sd = {k: v.detach().cpu().numpy() for k, v in state_dict.items()}
  params = {
      'x_embedder': {'proj': {'kernel': jnp.asarray(sd['pos_embed.proj.weight'].transpose(
          2, 3, 1, 0)), 'bias': jnp.asarray(sd['pos_embed.proj.bias'])}},
      't_embedder': {'mlp_0': _linear(sd, EMB + 'timestep_embedder.linear_1'),
                     'mlp_2': _linear(sd, EMB + 'timestep_embedder.linear_2')},
      'y_embedder': {'embedding_table': {'embedding': jnp.asarray(
          sd[EMB + 'class_embedder.embedding_table.weight'])}},
      'final_layer': {'adaLN_modulation_1': _linear(sd, 'proj_out_1'),
                      'linear': _linear(sd, 'proj_out_2')},
  }
  for i in range(depth):
    pre = f'transformer_blocks.{i}.'
    qkv = [_linear(sd, f'{pre}attn1.to_{n}') for n in 'qkv']
    params[f'blocks_{i}'] = {
        'adaLN_modulation_1': _linear(sd, pre + 'norm1.linear'),
        'attn': {'qkv': {'kernel': jnp.concatenate([q['kernel'] for q in qkv], axis=1),
                         'bias': jnp.concatenate([q['bias'] for q in qkv])},
                 'proj': _linear(sd, pre + 'attn1.to_out.0')},
        'mlp': {'fc1': _linear(sd, pre + 'ff.net.0.proj'), 'fc2': _linear(sd, pre + 'ff.net.2')},
    }
  return params


def test_positions_match_diffusers():
  ref = get_2d_sincos_pos_embed(64, 6, base_size=6, output_type='pt').numpy()
  np.testing.assert_allclose(dit.sincos_pos_embed(64, 6), ref, atol=1e-6)


def _run_both(t_B):
  torch_model = _torch_model()
  params = diffusers_to_zoo(torch_model.state_dict(), TINY['depth'])
  rng = np.random.default_rng(0)
  x_BxHxWxC = rng.standard_normal((len(t_B), 8, 8, 4)).astype(np.float32)
  labels_B = np.array([3, 10, 0])[:len(t_B)]  # 10 = the null class.
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x_BxHxWxC.transpose(0, 3, 1, 2)),
                      timestep=torch.from_numpy(t_B), class_labels=torch.from_numpy(labels_B),
                      return_dict=False)[0].numpy().transpose(0, 2, 3, 1)

  def zoo(freq_shift):
    model = dit.DiT(**(TINY | dict(freq_shift=freq_shift)))
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
