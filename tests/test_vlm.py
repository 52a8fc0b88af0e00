"""The vision-language model: causality, zero gates, the prefix mask, KV-cache decoding, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.models import decoding
from zoo.models import vlm
from zoo.nn import vlm_layers

TINY = vlm.preset('tiny') | dict(width=32, depth=4, num_heads=4, vision_width=32,
                                 vision_depth=2, vision_heads=4, max_len=16)
B, L = 2, 8


def _model(fusion, **kw):
  return vlm.VLM(fusion=fusion, **(TINY | kw))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.uniform(-1, 1, (B, 32, 32, 3)), jnp.float32)
  tokens = jnp.asarray(rng.integers(4, 100, (B, L)), jnp.int32)
  return images, tokens


def _init(model, images, tokens):
  return model.init(jax.random.PRNGKey(0), images, tokens)['params']


def _randomize_gates(params, value=0.7):
  """Mid fusion with open gates (initialised at 0, which hides the image)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, value) if 'gate' in jax.tree_util.keystr(path) else x,
      params)


@pytest.mark.parametrize('fusion', ['mid', 'early', 'late'])
def test_decoder_is_causal(fusion):
  """d logits[t] / d input[s] is exactly zero for every text position s > t."""
  model = _model(fusion)
  images, tokens = _inputs()
  params = _randomize_gates(_init(model, images, tokens))
  variables = model.init(jax.random.PRNGKey(0), images, tokens)
  perturb = variables['perturbations']
  offset = perturb['embeddings'].shape[1] - L  # The visual prefix of early fusion.

  def logit(p, t):
    out = model.apply({'params': params, 'perturbations': p}, images, tokens)
    return out[:, t].sum()

  # One compiled program: the gradient of every position's logits, t = 0 .. L-1.
  grads = jax.jit(jax.vmap(jax.grad(logit), in_axes=(None, 0)))(perturb, jnp.arange(L))
  for t in range(L):
    grad = grads['embeddings'][t]
    later = np.abs(np.asarray(grad[:, offset + t + 1:])).max(initial=0.0)
    earlier = np.abs(np.asarray(grad[:, offset:offset + t + 1])).max()
    assert later == 0.0, (t, later)
    assert earlier > 0.0


def test_mid_fusion_with_closed_gates_equals_the_text_only_model():
  images, tokens = _inputs()
  mid = _model('mid')
  params = _init(mid, images, tokens)
  text_only = _model('none')
  lm_params = {k: v for k, v in params.items() if k in _init(text_only, images, tokens)}
  assert set(params) - set(lm_params) == {'vision', 'vision_proj', 'xattn_0', 'xattn_1'}
  np.testing.assert_array_equal(mid.apply({'params': params}, images, tokens),
                                text_only.apply({'params': lm_params}, images, tokens))
  other_images = images[::-1]  # Closed gates: the image cannot matter.
  np.testing.assert_array_equal(mid.apply({'params': params}, images, tokens),
                                mid.apply({'params': params}, other_images, tokens))
  opened = _randomize_gates(params)
  assert not np.allclose(mid.apply({'params': opened}, images, tokens),
                         mid.apply({'params': opened}, other_images, tokens))


def test_prefix_mask():
  allowed = np.asarray(decoding.jnp.asarray(vlm_layers.allowed_slots(
      jnp.arange(5), jnp.array([[True] * 5, [False, True, True, True, True]]),
      jnp.array([3, 0]))))
  # Row 0: slots 0-2 are the bidirectional prefix, then causal.
  expected0 = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0],
                        [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(allowed[0], expected0)
  # Row 1: causal only, the padded slot 0 never attended.
  np.testing.assert_array_equal(allowed[1], np.tril(np.ones((5, 5), bool)) & [0, 1, 1, 1, 1])


def test_early_fusion_prompt_is_bidirectional_and_answer_causal():
  model = _model('early')
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  prompt_len = jnp.array([4, 4])
  base = model.apply({'params': params}, images, tokens, None, prompt_len)
  in_prompt = model.apply({'params': params}, images, tokens.at[:, 3].set(7), None, prompt_len)
  in_answer = model.apply({'params': params}, images, tokens.at[:, 6].set(7), None, prompt_len)
  # A prompt token changes the positions before it; an answer token never does.
  assert not np.allclose(base[:, :3], in_prompt[:, :3])
  np.testing.assert_array_equal(base[:, :6], in_answer[:, :6])


def _full_logits(model, params, images, ids, mask, prefix_len):
  """Logits of a left-padded batch in one call, positions counting real tokens."""
  visual = None if model.fusion == 'none' else model.apply(
      {'params': params}, images, method=model.encode_image)
  pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  prefix = jnp.zeros((B,), jnp.int32)
  if model.fusion == 'early':
    n = visual.shape[1]
    pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(n), (B, n)), n + pos], axis=1)
    mask = jnp.concatenate([jnp.ones((B, n), bool), mask], axis=1)
    prefix = prefix + n + prefix_len
  return model.apply({'params': params}, ids, visual, pos, mask, prefix, method=model.language)


@pytest.mark.parametrize('fusion', ['mid', 'early', 'late', 'none'])
def test_kv_cache_decoding_equals_full_recomputation(fusion):
  model = _model(fusion, resampler_latents=4 if fusion == 'mid' else 0)
  images, tokens = _inputs(1)
  params = _randomize_gates(_init(model, images, tokens))
  prompt = 5
  prompt_len = jnp.array([3, 5])
  ids, mask = decoding.left_align(tokens[:, :prompt], prompt_len)
  ids = jnp.concatenate([ids, tokens[:, prompt:]], axis=1)
  mask = jnp.concatenate([mask, jnp.ones((B, L - prompt), bool)], axis=1)
  full = _full_logits(model, params, images, ids, mask, prompt)
  # Prefill the prompt, then one token at a time through the cache.
  visual, logits, cache, position, prefix = decoding._prefill(
      model, params, images, tokens[:, :prompt], prompt_len)
  cached = [logits]
  for t in range(prompt, L - 1):
    logits, cache = decoding._step(model, params, visual, cache, ids[:, t], position, prefix)
    position = position + 1
    cached.append(logits)
  np.testing.assert_allclose(np.stack(cached, 1), full[:, prompt - 1:L - 1], atol=2e-5)


@pytest.mark.parametrize('fusion', ['mid', 'early'])
def test_greedy_equals_argmax_recomputation_and_one_beam(fusion):
  model = _model(fusion)
  images, tokens = _inputs(2)
  params = _randomize_gates(_init(model, images, tokens), 0.3)
  prompt_len = jnp.array([2, 4])
  got = decoding.greedy(model, params, images, tokens[:, :4], prompt_len, max_new=4, eos_id=2)
  ids, mask = decoding.left_align(tokens[:, :4], prompt_len)
  for _ in range(4):  # No cache: the whole sequence again for every token.
    nxt = _full_logits(model, params, images, ids, mask, 4)[:, -1].argmax(-1)
    ids = jnp.concatenate([ids, nxt[:, None].astype(jnp.int32)], axis=1)
    mask = jnp.concatenate([mask, jnp.ones((B, 1), bool)], axis=1)
  expected = np.array(ids[:, 4:])
  for row in expected:  # PAD after the first EOS, as the decoder writes it.
    hits = np.flatnonzero(row == 2)
    if len(hits):
      row[hits[0] + 1:] = 0
  np.testing.assert_array_equal(got, expected)
  one_beam, _ = decoding.beam_search(model, params, images, tokens[:, :4], prompt_len,
                                     max_new=4, eos_id=2, beams=1)
  np.testing.assert_array_equal(one_beam, got)


def test_beam_search_scores_its_sequence():
  """The returned score is the summed log-probability of the returned tokens."""
  model = _model('mid')
  images, tokens = _inputs(3)
  params = _randomize_gates(_init(model, images, tokens))
  prompt_len = jnp.array([3, 3])
  seqs, scores = decoding.beam_search(model, params, images, tokens[:, :3], prompt_len,
                                      max_new=3, eos_id=2, beams=3)
  ids = jnp.concatenate([tokens[:, :3], seqs], axis=1)
  logp = jax.nn.log_softmax(_full_logits(model, params, images, ids, jnp.ones_like(ids, bool), 3))
  picked = jnp.take_along_axis(logp[:, 2:-1], seqs[..., None], -1)[..., 0]
  live = jnp.cumsum(seqs == 2, axis=1) - (seqs == 2) == 0  # Up to and including EOS.
  np.testing.assert_allclose(scores, (picked * live).sum(1), atol=1e-4)
  greedy = decoding.greedy(model, params, images, tokens[:, :3], prompt_len, max_new=3,
                           eos_id=2)
  g_ids = jnp.concatenate([tokens[:, :3], greedy], axis=1)
  g_logp = jax.nn.log_softmax(_full_logits(model, params, images, g_ids,
                                           jnp.ones_like(g_ids, bool), 3))
  g_live = jnp.cumsum(greedy == 2, axis=1) - (greedy == 2) == 0
  g_score = (jnp.take_along_axis(g_logp[:, 2:-1], greedy[..., None], -1)[..., 0] * g_live).sum(1)
  assert np.all(np.asarray(scores) >= np.asarray(g_score) - 1e-4)  # Beams never lose to greedy.


@pytest.mark.parametrize('fusion, reduce', [
    ('mid', dict(reduce='merge', merge_r=4, vision_depth=3)),
    ('early', dict(reduce='merge', merge_r=4, vision_depth=3)),
    ('early', dict(reduce='prune', prune_keep=0.25, vision_depth=3)),
    ('late', dict(attention='block', block=16)),
    ('mid', dict(attention='nystrom', rank=16)),
    ('early', dict(attention='linformer', rank=8)),
    # A CLIP-style tower's class token (never removed) is one more token.
    ('early', dict(reduce='prune', prune_keep=0.25, vision_depth=3, vision_class_token=True)),
    ('mid', dict(reduce='merge', merge_r=4, vision_depth=3, vision_class_token=True))])
def test_mitigations_keep_static_shapes_under_jit(fusion, reduce):
  model = _model(fusion, **reduce)
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  visual = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode_image))(
      params, images)
  expected = 1 if fusion == 'late' else model.visual_tokens  # Late: the pooled image.
  assert visual.shape == (B, expected, TINY['width'])
  assert model.visual_tokens < 64 or reduce.get('attention')
  out = decoding.greedy(model, params, images, tokens[:, :4], jnp.array([4, 2]), max_new=3,
                        eos_id=2)
  assert out.shape == (B, 3)


def test_bad_inputs_give_clear_errors():
  model = _model('mid')
  images, tokens = _inputs()
  params = _init(model, images, tokens)
  with pytest.raises(ValueError, match='image_size'):
    model.apply({'params': params}, jnp.zeros((B, 16, 16, 3)), tokens)
  with pytest.raises(ValueError, match='max_len=16'):
    model.apply({'params': params}, images, jnp.ones((B, 17), jnp.int32))
  with pytest.raises(ValueError, match='max_len=16'):
    decoding.greedy(model, params, images, tokens, jnp.array([8, 8]), max_new=9, eos_id=2)
  with pytest.raises(ValueError, match=r"model.fusion='sideways'; allowed: \['mid'"):
    vlm.check_config({'fusion': 'sideways'}, 32)
  with pytest.raises(ValueError, match=r"model.attention='sparse'; allowed"):
    vlm.check_config({'attention': 'sparse'}, 32)
  with pytest.raises(ValueError, match=r"model.reduce='drop'; allowed"):
    vlm.check_config({'reduce': 'drop'}, 32)
  with pytest.raises(ValueError, match='unknown vlm config keys'):
    vlm.check_config({'fusoin': 'mid'}, 32)
  with pytest.raises(ValueError, match='data.resolution=64'):
    vlm.check_config({}, 64)
