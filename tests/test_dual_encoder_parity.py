"""Parity with transformers: DualEncoder vs CLIPModel and SiglipModel; open_clip names.

Weights travel as they would from the Hub: `save_pretrained` (config.json + model.safetensors)
-> zoo.convert.transformers.load_hf_dual. The open_clip state dict is written from the HF one
by the OpenAI -> HF table of NUMERICS.md Multimodal 4.3, inverted here by hand.
"""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from zoo.convert import transformers as convert  # noqa: E402
from zoo.models import dual_encoder  # noqa: E402
from zoo.models import vit  # noqa: E402

from conftest import perturbed_hf_model  # noqa: E402

torch.set_num_threads(2)

RES, PATCH, WIDTH, DEPTH, HEADS, MLP = 32, 8, 32, 2, 4, 64
VOCAB, MAX_LEN, EOS, EMBED = 100, 16, 50, 24
TOWER = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=DEPTH,
             num_attention_heads=HEADS)


def _clip_config():
  return transformers.CLIPConfig(
      text_config=TOWER | dict(vocab_size=VOCAB, max_position_embeddings=MAX_LEN,
                               eos_token_id=EOS, bos_token_id=1, pad_token_id=0),
      vision_config=TOWER | dict(image_size=RES, patch_size=PATCH),
      projection_dim=EMBED, attn_implementation='eager')


def _siglip_config():
  return transformers.SiglipConfig(
      text_config=TOWER | dict(vocab_size=VOCAB, max_position_embeddings=MAX_LEN,
                               eos_token_id=1, pad_token_id=1, bos_token_id=0),
      vision_config=TOWER | dict(image_size=RES, patch_size=PATCH),
      attn_implementation='eager')


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, RES, RES, 3)).astype(np.float32)
  tokens = rng.integers(3, 90, (3, 12)).astype(np.int64)
  tokens[tokens == EOS] = 3
  lengths = [12, 7, 4]
  mask = np.arange(12)[None] < np.array(lengths)[:, None]
  for b, n in enumerate(lengths):
    tokens[b, 0], tokens[b, n - 1], tokens[b, n:] = 1, EOS, 0
  return images, tokens, mask


def _nchw(images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _compare(zoo_kwargs, params, images, tokens, mask, ref):
  model = dual_encoder.DualEncoder(**zoo_kwargs)
  out = jax.jit(model.apply)({'params': params}, images, tokens.astype(np.int32), mask)
  np.testing.assert_allclose(out['image'], ref.image_embeds.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out['text'], ref.text_embeds.numpy(), atol=1e-4, rtol=0)
  logits = np.asarray(dual_encoder.logits(out))
  assert np.abs(logits).max() > 1.0
  np.testing.assert_allclose(logits, ref.logits_per_image.numpy(), atol=1e-4, rtol=0)


def test_clip_matches_hf(tmp_path):
  """HF takes OpenAI-normalised pixels; zoo takes [-1, 1] with image_norm='clip'."""
  hf = perturbed_hf_model(transformers.CLIPModel, _clip_config())
  hf.save_pretrained(tmp_path)
  kwargs, params = convert.load_hf_dual(str(tmp_path))
  assert kwargs['text']['pool'] == 'eos' and kwargs['image']['image_norm'] == 'clip'
  images, tokens, mask = _inputs()
  pixels = ((images + 1) / 2 - np.array(vit.CLIP_MEAN)) / np.array(vit.CLIP_STD)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
             pixel_values=_nchw(pixels.astype(np.float32)))
  _compare(kwargs, params, images, tokens, mask, ref)
  # The reverse conversion gives back HF's state dict exactly.
  state = {k: v.numpy() for k, v in hf.state_dict().items() if not k.endswith('position_ids')}
  back = convert.to_hf_dual(params)
  assert set(back) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_siglip_matches_hf(tmp_path):
  """SigLIP texts are padded to full length (HF pools the last slot), so no mask."""
  hf = perturbed_hf_model(transformers.SiglipModel, _siglip_config(), seed=2)
  with torch.no_grad():  # The paper's values; HF initialises both to zero.
    hf.logit_scale.fill_(np.log(10.0) + 0.1)
    hf.logit_bias.fill_(-10.0 + 0.1)
  hf.save_pretrained(tmp_path)
  kwargs, params = convert.load_hf_dual(str(tmp_path))
  images, tokens, _ = _inputs()
  mask = np.ones(tokens.shape, bool)
  with torch.no_grad():
    ref = hf(input_ids=torch.from_numpy(tokens), pixel_values=_nchw(images))
  _compare(kwargs, params, images, tokens, mask, ref)
  np.testing.assert_allclose(params['logit_bias'], hf.logit_bias.item(), rtol=1e-6)
  state = {k: v.numpy() for k, v in hf.state_dict().items() if not k.endswith('position_ids')}
  back = convert.to_hf_dual(params)
  assert set(back) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


# HF CLIPModel -> OpenAI / open_clip, written out independently of the converter's table.
_HF_TO_OPEN_CLIP = (
    ('text_model.embeddings.token_embedding.weight', 'token_embedding.weight'),
    ('text_model.embeddings.position_embedding.weight', 'positional_embedding'),
    ('text_model.final_layer_norm.', 'ln_final.'),
    ('text_model.encoder.layers.', 'transformer.resblocks.'),
    ('vision_model.embeddings.patch_embedding.weight', 'visual.conv1.weight'),
    ('vision_model.embeddings.class_embedding', 'visual.class_embedding'),
    ('vision_model.embeddings.position_embedding.weight', 'visual.positional_embedding'),
    ('vision_model.pre_layrnorm.', 'visual.ln_pre.'),
    ('vision_model.post_layernorm.', 'visual.ln_post.'),
    ('vision_model.encoder.layers.', 'visual.transformer.resblocks.'),
)
_BLOCK = (('layer_norm1', 'ln_1'), ('layer_norm2', 'ln_2'), ('mlp.fc1', 'mlp.c_fc'),
          ('mlp.fc2', 'mlp.c_proj'), ('self_attn.out_proj', 'attn.out_proj'))


def _open_clip_state_dict(hf_state):
  out, qkv = {'logit_scale': hf_state['logit_scale'],
              'visual.proj': hf_state['visual_projection.weight'].T,
              'text_projection': hf_state['text_projection.weight'].T,
              'attn_mask': np.zeros((MAX_LEN, MAX_LEN), np.float32)}, {}
  for key, value in hf_state.items():
    for hf_prefix, oc_prefix in _HF_TO_OPEN_CLIP:
      if not key.startswith(hf_prefix):
        continue
      name = oc_prefix + key.removeprefix(hf_prefix)
      for old, new in _BLOCK:
        name = name.replace(f'.{old}.', f'.{new}.')
      if '.self_attn.' in name:  # q/k/v: fused into in_proj_{weight,bias}, q first.
        block, proj = name.split('.self_attn.')
        qkv.setdefault(f'{block}.attn.in_proj_{proj.split(".")[1]}', {})[proj[0]] = value
      else:
        out[name] = value
  for name, parts in qkv.items():
    out[name] = np.concatenate([parts[n] for n in 'qkv'], axis=0)
  return out


def test_open_clip_names_convert_to_the_same_params():
  torch.manual_seed(0)
  hf_state = {k: v.numpy() for k, v in
              transformers.CLIPModel(_clip_config()).state_dict().items()}
  oc_state = _open_clip_state_dict(hf_state)
  assert 'visual.transformer.resblocks.1.attn.in_proj_weight' in oc_state
  assert oc_state['text_projection'].shape == (WIDTH, EMBED)
  kwargs = convert.open_clip_config(oc_state, vision_heads=HEADS, text_heads=HEADS)
  expected = convert.clip_config(_clip_config())
  for tower in ('image', 'text'):
    for key in ('width', 'depth', 'num_heads', 'mlp_dim'):
      assert kwargs[tower][key] == expected[tower][key], (tower, key)
  assert (kwargs['image']['image_size'], kwargs['image']['patch_size']) == (RES, PATCH)
  assert (kwargs['text']['vocab_size'], kwargs['text']['max_len']) == (VOCAB, MAX_LEN)
  assert kwargs['embed_dim'] == EMBED and kwargs['text']['pool'] == 'argmax'
  got = convert.from_open_clip(oc_state, kwargs)
  want = convert.from_hf_dual(hf_state, expected)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def test_converter_errors_name_the_key():
  torch.manual_seed(0)
  config = _clip_config()
  state = {k: v.numpy() for k, v in transformers.CLIPModel(config).state_dict().items()}
  kwargs = convert.clip_config(config)
  with pytest.raises(ValueError, match="'text_model.encoder.layers.5.mlp.fc1.weight' is not used"):
    convert.from_hf_dual(state | {'text_model.encoder.layers.5.mlp.fc1.weight': np.zeros((2, 2))},
                         kwargs)
  missing = {k: v for k, v in state.items() if k != 'visual_projection.weight'}
  with pytest.raises(ValueError, match=r"lacks keys \['visual_projection.weight'\]"):
    convert.from_hf_dual(missing, kwargs)
  with pytest.raises(ValueError, match="'vision_model.post_layernorm.weight' has shape"):
    convert.from_hf_dual(state | {'vision_model.post_layernorm.weight': np.zeros(3)}, kwargs)
  with pytest.raises(ValueError, match="'foo.weight' is not a CLIPModel / SiglipModel"):
    convert.from_hf_dual({'foo.weight': np.zeros(3)})
  with pytest.raises(ValueError, match="open_clip key 'visual.attn_pool.query'"):
    convert.from_open_clip({'visual.attn_pool.query': np.zeros(3)})


def _hf_count(cls, config):
  with torch.device('meta'):
    return sum(p.numel() for p in cls(config).parameters())


def test_full_size_param_counts_match_hf():
  """The presets are HF's openai/clip-vit-base-patch32 and google/siglip-base-patch16-224."""
  clip_b32 = transformers.CLIPConfig(
      text_config=dict(), vision_config=dict(patch_size=32), projection_dim=512)
  assert _hf_count(transformers.CLIPModel, clip_b32) == 151_277_313
  assert _hf_count(transformers.SiglipModel, transformers.SiglipConfig()) == 203_155_970
  # The config builders give the presets' shapes.
  for key in ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size', 'image_size'):
    assert convert.clip_config(clip_b32)['image'][key] == (
        dual_encoder.preset('clip-vit-b32')['image'][key])
    assert convert.siglip_config(transformers.SiglipConfig())['image'][key] == (
        dual_encoder.preset('siglip-b16-224')['image'][key])
