"""Parity with transformers: TextTransformer vs CLIPTextModel(WithProjection), and the 'clip'
tokenizer vs CLIPTokenizer.

Weights travel as they would from the Hub: torch -> safetensors.torch file ->
safetensors.numpy -> zoo.convert.transformers.from_hf_clip_text.
"""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import json  # noqa: E402

import flax.linen as nn  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import safetensors.numpy  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from data import text_tokenizers  # noqa: E402
from zoo.convert import transformers as convert  # noqa: E402
from zoo.models import text  # noqa: E402

from conftest import perturbed_hf_model  # noqa: E402

torch.set_num_threads(2)

VOCAB, WIDTH, DEPTH, HEADS, MAX_LEN, PROJ = 100, 32, 2, 4, 16, 24
NEW_EOS = 50  # Any id but 2: HF pools the first position holding it.
MERGES = [('h', 'e'), ('l', 'l'), ('l', 'o</w>'), ('he', 'l'), ('w', 'o'), ('wo', 'r'),
          ('l', 'd</w>'), ('c', 'a'), ('ca', 't</w>')]


def _hf_config(eos_token_id, act='quick_gelu'):
  return transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=3 * WIDTH,
      num_hidden_layers=DEPTH, num_attention_heads=HEADS, max_position_embeddings=MAX_LEN,
      projection_dim=PROJ, hidden_act=act, layer_norm_eps=1e-5, eos_token_id=eos_token_id,
      bos_token_id=1, pad_token_id=0, attn_implementation='eager')


def _hf_model(cls, config, tmp_path, seed=0):
  """A random HF model (LayerNorms and biases perturbed too) and its params through safetensors."""
  model = perturbed_hf_model(cls, config, seed)
  path = str(tmp_path / 'model.safetensors')
  safetensors.torch.save_file(model.state_dict(), path)
  return model, convert.from_hf_clip_text(safetensors.numpy.load_file(path))


def _zoo_model(config, pool, projection_dim):
  return text.TextTransformer(
      vocab_size=VOCAB, max_len=MAX_LEN, width=WIDTH, depth=DEPTH, num_heads=HEADS,
      mlp_dim=3 * WIDTH, act=config.hidden_act, causal=True, pool=pool,
      eos_token_id=config.eos_token_id, projection_dim=projection_dim)


def _batch(eos):
  """Right-padded rows; row 0 holds a token larger than EOS, and EOS twice (first != argmax)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 90, size=(3, 12)).astype(np.int64)
  tokens[tokens == eos] = 3
  lengths = [12, 7, 4]
  mask = np.arange(12)[None] < np.array(lengths)[:, None]
  for b, n in enumerate(lengths):
    tokens[b, 0], tokens[b, n - 1], tokens[b, n:] = 1, eos, 0
  tokens[0, 5] = eos
  tokens[0, 8] = 95
  return tokens, mask


def _hf_run(model, tokens, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask))
  pooled = out.text_embeds if hasattr(out, 'text_embeds') else out.pooler_output
  return out.last_hidden_state.numpy(), pooled.numpy()


@pytest.mark.parametrize('eos_token_id,pool', [(NEW_EOS, 'eos'), (2, 'argmax')])
@pytest.mark.parametrize('with_projection', [False, True])
def test_matches_hf_clip_text(tmp_path, eos_token_id, pool, with_projection):
  """eos_token_id 2 is HF's legacy flag for OpenAI's argmax pooling; other ids pool the first EOS."""
  config = _hf_config(eos_token_id)
  cls = (transformers.CLIPTextModelWithProjection if with_projection
         else transformers.CLIPTextModel)
  model, params = _hf_model(cls, config, tmp_path)
  tokens, mask = _batch(eos_token_id)
  ref_feat, ref_pooled = _hf_run(model, tokens, mask)
  zoo = _zoo_model(config, pool, PROJ if with_projection else 0)
  feat, pooled = zoo.apply({'params': params}, tokens.astype(np.int32), mask)
  assert feat.shape == (3, 12, WIDTH) and pooled.shape == ref_pooled.shape
  assert np.abs(ref_feat).max() > 0.5
  np.testing.assert_allclose(np.asarray(feat), ref_feat, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), ref_pooled, atol=1e-4, rtol=0)
  # The two conventions pick different tokens in row 0, so the choice is really tested.
  other = _zoo_model(config, 'argmax' if pool == 'eos' else 'eos', zoo.projection_dim)
  _, other_pooled = other.apply({'params': params}, tokens.astype(np.int32), mask)
  assert np.abs(np.asarray(other_pooled)[0] - ref_pooled[0]).max() > 1e-2


def test_matches_hf_gelu_without_mask(tmp_path):
  """act='gelu' (exact erf GELU) and no attention mask: every position is real."""
  config = _hf_config(NEW_EOS, act='gelu')
  model, params = _hf_model(transformers.CLIPTextModel, config, tmp_path, seed=3)
  tokens, _ = _batch(NEW_EOS)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens))
  feat, pooled = _zoo_model(config, 'eos', 0).apply({'params': params}, tokens.astype(np.int32))
  np.testing.assert_allclose(np.asarray(feat), out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_b32_param_count_matches_hf():
  """The 'clip-vit-b32-text' preset has exactly the parameters of HF's B/32 text config."""
  config = transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
      num_attention_heads=8, max_position_embeddings=77, projection_dim=512)
  with torch.device('meta'):
    counts = [sum(p.numel() for p in cls(config).parameters())
              for cls in (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection)]
  assert counts == [63_165_952, 63_428_096]
  model = text.TextTransformer(**text.preset('clip-vit-b32-text'))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 77), np.int32))
  assert counts[1] == sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def test_converter_reads_full_clip_model_state_dict():
  """A CLIPModel state dict (vision tower, logit_scale) converts to the same text params."""
  config = transformers.CLIPConfig(
      text_config=_hf_config(NEW_EOS).to_dict(),
      vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, image_size=8, patch_size=4),
      projection_dim=PROJ)
  torch.manual_seed(0)
  full = {k: v.numpy() for k, v in transformers.CLIPModel(config).state_dict().items()}
  params = convert.from_hf_clip_text(full)
  assert set(params) == {'embeddings', 'encoder', 'final_layer_norm', 'text_projection'}
  np.testing.assert_array_equal(params['text_projection']['kernel'],
                                full['text_projection.weight'].T)
  zoo = _zoo_model(config.text_config, 'eos', PROJ)
  ref = jax.eval_shape(zoo.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), np.int32))
  got = jax.tree_util.tree_map(lambda x: x.shape, params)
  assert got == jax.tree_util.tree_map(lambda x: x.shape, nn.meta.unbox(ref['params']))


def _write_merges(tmp_path):
  path = tmp_path / 'merges.txt'
  path.write_text('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in MERGES))
  return str(path)


def test_clip_bpe_matches_transformers(tmp_path):
  """Same ids as transformers' CLIPTokenizer built from the derived vocab.json + merges.txt."""
  merges_path = _write_merges(tmp_path)
  (tmp_path / 'vocab.json').write_text(json.dumps(
      {s: i for i, s in enumerate(text_tokenizers.clip_vocabulary(MERGES))}))
  hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
  tok = text_tokenizers.get('clip', merges_path=merges_path)
  assert len(hf) == tok.vocab_size
  texts = ['hello world!', "Hello   WORLD, don't cat's 2024 café  naïve", 'x_y <tag> well-done ÄÖ',
           'a cat\tcatcat hellohello.', '日本 — ok?!']
  ids, mask = tok.encode(texts, max_len=64)
  for string, row, row_mask in zip(texts, ids, mask):
    assert row[row_mask].tolist() == hf(string)['input_ids']
    assert tok.decode(row) == hf.decode(hf(string)['input_ids'], skip_special_tokens=True)
