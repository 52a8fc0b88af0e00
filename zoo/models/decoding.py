"""Greedy and beam-search decoding of the VLM with its key/value cache, all inside one jit.

Legend: B batch, W beams, P prompt tokens, G generated tokens, T vocabulary.

Prompts arrive as the data pipeline and `data.qa.encode_prompts` make them, right-padded
([BOS] question [PAD]...), and are shifted to the left-padded layout, so every row's last
prompt token sits in the same slot: one prefill call writes the cache for the whole batch, then
each step feeds one token per row. Positions count real tokens only (a row's first real token
is position 0, or the slot after the visual prefix in early fusion), so a left-padded row
decodes exactly as it would alone.
"""

import functools

import jax
import jax.numpy as jnp


def left_align(ids_BxP, prompt_len_B):
  """(ids, mask): each row's first prompt_len tokens moved to the end of the row."""
  width = ids_BxP.shape[1]
  src_BxP = jnp.arange(width)[None] - (width - prompt_len_B[:, None])
  mask_BxP = src_BxP >= 0
  ids = jnp.take_along_axis(ids_BxP, jnp.maximum(src_BxP, 0), axis=1)
  return jnp.where(mask_BxP, ids, 0), mask_BxP


def _prefill_inputs(model, visual, ids_BxP, prompt_len_B):
  """(ids, positions, key mask, prefix) of the prefill call; early fusion adds the prefix."""
  ids, mask_BxP = left_align(ids_BxP, prompt_len_B)
  batch, width = ids.shape
  positions_BxP = jnp.maximum(jnp.cumsum(mask_BxP, axis=1) - 1, 0)
  prefix_B = jnp.zeros((batch,), jnp.int32)
  if model.fusion == 'early':
    n = visual.shape[1]
    positions_BxP = jnp.concatenate(
        [jnp.broadcast_to(jnp.arange(n)[None], (batch, n)), n + positions_BxP], axis=1)
    mask_BxP = jnp.concatenate([jnp.ones((batch, n), bool), mask_BxP], axis=1)
    prefix_B = prefix_B + n + width  # Image and prompt: full attention.
  return ids, positions_BxP, mask_BxP, prefix_B


def _check(model, ids_BxP, max_new):
  if max_new < 1:
    raise ValueError(f'max_new={max_new} must be >= 1')
  if ids_BxP.shape[1] + max_new > model.max_len:
    raise ValueError(f'prompt of {ids_BxP.shape[1]} tokens + {max_new} new tokens exceeds '
                     f'model.max_len={model.max_len} (the context)')


def _prefill(model, params, images, ids_BxP, prompt_len_B):
  """(visual, last logits BxT, cache, next position B, prefix B) after the prompt."""
  visual = (None if model.fusion == 'none' else
            model.apply({'params': params}, images, method=model.encode_image))
  ids, positions, mask, prefix_B = _prefill_inputs(model, visual, ids_BxP, prompt_len_B)
  logits, variables = model.apply({'params': params}, ids, visual, positions, mask, prefix_B,
                                  True, method=model.language, mutable=['cache'])
  return visual, logits[:, -1], variables['cache'], positions[:, -1] + 1, prefix_B


def _step(model, params, visual, cache, token_B, position_B, prefix_B):
  """Logits BxT of one token per row, and the updated cache."""
  ctx = None if model.fusion == 'early' else visual
  logits, variables = model.apply(
      {'params': params, 'cache': cache}, token_B[:, None], ctx, position_B[:, None],
      jnp.ones(token_B.shape + (1,), bool), prefix_B, True, method=model.language,
      mutable=['cache'])
  return logits[:, -1], variables['cache']


@functools.partial(jax.jit, static_argnames=('model', 'max_new', 'eos_id', 'pad_id'))
def greedy(model, params, images, ids_BxP, prompt_len_B, *, max_new, eos_id, pad_id=0):
  """BxG int32: the argmax continuation of each prompt, `pad_id` after its first EOS."""
  _check(model, ids_BxP, max_new)
  visual, logits, cache, position_B, prefix_B = _prefill(model, params, images, ids_BxP,
                                                         prompt_len_B)

  def body(carry, _):
    cache, logits, position_B, done_B = carry
    token_B = jnp.where(done_B, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    done_B = done_B | (token_B == eos_id)
    logits, cache = _step(model, params, visual, cache, token_B, position_B, prefix_B)
    return (cache, logits, position_B + 1, done_B), token_B

  done = jnp.zeros(position_B.shape, bool)
  _, tokens_GxB = jax.lax.scan(body, (cache, logits, position_B, done), None, length=max_new)
  return tokens_GxB.T


def _beams(tree, width):
  """Each row repeated `width` times (B -> B*W); the cache's scalar index stays."""
  return jax.tree.map(lambda x: jnp.repeat(x, width, axis=0) if x.ndim else x, tree)


def _gather(tree, origin_BxW):
  """Rows of B*W arrays reordered: beam w of example b takes beam origin[b, w]'s row."""
  batch, width = origin_BxW.shape
  rows = (jnp.arange(batch)[:, None] * width + origin_BxW).reshape(-1)
  return jax.tree.map(lambda x: x[rows] if x.ndim else x, tree)


@functools.partial(jax.jit, static_argnames=('model', 'max_new', 'eos_id', 'pad_id', 'beams'))
def beam_search(model, params, images, ids_BxP, prompt_len_B, *, max_new, eos_id, pad_id=0,
                beams=4):
  """(BxG tokens of the best beam, B its summed log-probability); finished beams keep EOS."""
  _check(model, ids_BxP, max_new)
  visual, logits, cache, position_B, prefix_B = _prefill(model, params, images, ids_BxP,
                                                         prompt_len_B)
  batch, vocab = logits.shape
  visual, logits, cache, position_B, prefix_B = _beams(
      (visual, logits, cache, position_B, prefix_B), beams)
  # Only beam 0 is live at first, so the first step does not pick one token W times.
  scores_BxW = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)[None].repeat(batch, 0)
  after_eos_T = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)

  def body(carry, _):
    cache, logits, scores_BxW, done_BW, seqs_BWxG, t = carry
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = jnp.where(done_BW[:, None], after_eos_T[None], logp)
    total = (scores_BxW.reshape(-1, 1) + logp).reshape(batch, beams * vocab)
    scores_BxW, flat_BxW = jax.lax.top_k(total, beams)
    origin_BxW, token_BxW = flat_BxW // vocab, (flat_BxW % vocab).astype(jnp.int32)
    cache, done_BW, seqs_BWxG = _gather((cache, done_BW, seqs_BWxG), origin_BxW)
    token_BW = token_BxW.reshape(-1)
    seqs_BWxG = seqs_BWxG.at[:, t].set(token_BW)
    done_BW = done_BW | (token_BW == eos_id)
    logits, cache = _step(model, params, visual, cache, token_BW, position_B + t, prefix_B)
    return (cache, logits, scores_BxW, done_BW, seqs_BWxG, t + 1), None

  seqs = jnp.full((batch * beams, max_new), pad_id, jnp.int32)
  done = jnp.zeros((batch * beams,), bool)
  carry = (cache, logits, scores_BxW, done, seqs, 0)
  (_, _, scores_BxW, _, seqs, _), _ = jax.lax.scan(body, carry, None, length=max_new)
  best_B = jnp.argmax(scores_BxW, axis=1)
  return seqs.reshape(batch, beams, max_new)[jnp.arange(batch), best_B], scores_BxW.max(1)
