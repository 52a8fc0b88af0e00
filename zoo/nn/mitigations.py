"""Attention-cost mitigations for a ViT encoder: token pruning and merging, sparse and low-rank
attention. Everything is jit-friendly: every output shape is a static function of the config.

Legend: B batch, N tokens, P kept tokens (prune), R tokens merged away (merge), U / V tokens of
ToMe's sets A (even positions) / B (odd positions), Q = U - R, S = N - R, C metric width, D
width, E = D + 1, A heads, K head width (D / A), G blocks of T tokens (block attention), L
landmarks or projected length (rank).

`SelfAttention`, `EncoderLayer` and `ReducingEncoder` keep the parameter names and inits of
zoo/models/text.py (HF CLIP names), so a text/ViT encoder checkpoint loads into them; only
'linformer' adds parameters (`self_attn/lowrank_e`, `self_attn/lowrank_f`).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.models import text
from zoo.nn import stack

ATTENTION_KINDS = ('full', 'window', 'block', 'linformer', 'nystrom')
REDUCTIONS = ('none', 'prune', 'merge')
_MIN = jnp.finfo(jnp.float32).min
_HIGHEST = jax.lax.Precision.HIGHEST


def prune(x_BxNxD, score_BxN, keep: int, protect: int = 0):
  """(x_BxPxD, index_BxP): the `keep` highest-scoring tokens, in their original order.

  The first `protect` tokens (e.g. a class token) are always kept. Ties go to the lower index.
  """
  n = x_BxNxD.shape[1]
  if not 1 <= keep <= n:
    raise ValueError(f'keep={keep} must be in [1, N={n}]')
  if not 0 <= protect <= keep:
    raise ValueError(f'protect={protect} must be in [0, keep={keep}]')
  score_BxN = jnp.where(jnp.arange(n)[None] < protect, jnp.inf, score_BxN.astype(jnp.float32))
  _, index_BxP = jax.lax.top_k(score_BxN, keep)
  index_BxP = jnp.sort(index_BxP, axis=1)
  return jnp.take_along_axis(x_BxNxD, index_BxP[..., None], axis=1), index_BxP


def merge(x_BxNxD, size_BxN, metric_BxNxC, r: int, *, protect: int = 0):
  """ToMe bipartite soft matching + size-weighted average: (x_Bx(N-r)xD, size_Bx(N-r)).

  Bolya et al. 2023 (facebookresearch/ToMe `bipartite_soft_matching`, `merge_wavg`): tokens at
  even positions (A) are matched to their most cosine-similar odd-position token (B); the r A
  tokens with the most similar matches are averaged into them, weighted by size (sizes add).
  r is clipped to (N - protect) // 2 (ToMe's bound; N // 2 without protection); r = 0 returns
  the inputs. The first `protect` tokens are never merged away nor merged into.
  Output order: the unmerged A tokens in their original order (ToMe sorts them only with a
  class token; sorting keeps a leading class token first), then every B token in its order.
  """
  n = x_BxNxD.shape[1]
  if r < 0 or protect < 0:
    raise ValueError(f'r={r} and protect={protect} must be >= 0')
  r = min(r, max(n - protect, 0) // 2)
  if r == 0:
    return x_BxNxD, size_BxN
  metric_BxNxC = metric_BxNxC.astype(jnp.float32)
  # A floor on the norm: an all-zero metric row gives similarity 0 rather than NaN.
  metric_BxNxC = metric_BxNxC * jax.lax.rsqrt(
      jnp.maximum(jnp.sum(jnp.square(metric_BxNxC), axis=-1, keepdims=True), 1e-24))
  sim_BxUxV = jnp.einsum('buc,bvc->buv', metric_BxNxC[:, ::2], metric_BxNxC[:, 1::2],
                         precision=_HIGHEST)
  fixed_UxV = (jnp.arange(0, n, 2)[:, None] < protect) | (jnp.arange(1, n, 2)[None] < protect)
  sim_BxUxV = jnp.where(fixed_UxV[None], -jnp.inf, sim_BxUxV)
  best_BxU, match_BxU = jnp.max(sim_BxUxV, axis=-1), jnp.argmax(sim_BxUxV, axis=-1)
  order_BxU = jnp.argsort(-best_BxU, axis=1, stable=True)
  src_BxR, rest_BxQ = order_BxU[:, :r], jnp.sort(order_BxU[:, r:], axis=1)
  dst_BxR = jnp.take_along_axis(match_BxU, src_BxR, axis=1)
  # Sizes ride along as channel D, so one gather/scatter merges sums and sizes together.
  size_BxN = size_BxN.astype(jnp.float32)
  xs_BxNxE = jnp.concatenate([x_BxNxD.astype(jnp.float32) * size_BxN[..., None],
                              size_BxN[..., None]], axis=-1)
  a_BxUxE, b_BxVxE = xs_BxNxE[:, ::2], xs_BxNxE[:, 1::2]
  src_BxRxE = jnp.take_along_axis(a_BxUxE, src_BxR[..., None], axis=1)
  b_BxVxE = jax.vmap(lambda b, i, s: b.at[i].add(s))(b_BxVxE, dst_BxR, src_BxRxE)
  out_BxSxE = jnp.concatenate(
      [jnp.take_along_axis(a_BxUxE, rest_BxQ[..., None], axis=1), b_BxVxE], axis=1)
  return ((out_BxSxE[..., :-1] / out_BxSxE[..., -1:]).astype(x_BxNxD.dtype),
          out_BxSxE[..., -1])


def allowed_mask(kind: str, n: int, *, window: int = 0, block: int = 0) -> np.ndarray:
  """Boolean NxN sparse-attention mask (numpy, so it is a compile-time constant).

  'window': when n is a perfect square the tokens are a row-major square grid and query i may
  see key j within Chebyshev distance `window` on it (a (2 window + 1)^2 patch neighbourhood);
  otherwise (e.g. a class token plus a grid, or tokens after merging) |i - j| <= window in the
  flat order. 'block': blocks of `block` consecutive tokens see only themselves.
  """
  if n < 1:
    raise ValueError(f'n={n} must be >= 1')
  i_N = np.arange(n)
  if kind == 'window':
    if window < 0:
      raise ValueError(f'window={window} must be >= 0')
    side = math.isqrt(n)
    if side * side == n:
      row_N, col_N = np.divmod(i_N, side)
      dist_NxN = np.maximum(np.abs(row_N[:, None] - row_N[None]),
                            np.abs(col_N[:, None] - col_N[None]))
    else:
      dist_NxN = np.abs(i_N[:, None] - i_N[None])
    return dist_NxN <= window
  if kind == 'block':
    if block < 1:
      raise ValueError(f'block={block} must be >= 1')
    return (i_N[:, None] // block) == (i_N[None] // block)
  raise ValueError(f"kind={kind!r}; allowed: ['window', 'block']")


def _softmax_attention(q_BxNxAxK, k_BxMxAxK, v_BxMxAxK, allowed_BxNxM, dtype):
  """(out_BxNxAxK, received_BxM): zoo.models.text.SelfAttention's exact ops (probabilities
  recomputed in a train step's backward pass, as zoo.nn.layers.attention_heads does)."""
  core = _attention_recomputed if stack.recompute_attention() else _attention
  return core(q_BxNxAxK, k_BxMxAxK, v_BxMxAxK, allowed_BxNxM, dtype)


def _attention(q_BxNxAxK, k_BxMxAxK, v_BxMxAxK, allowed_BxNxM, dtype):
  scale = q_BxNxAxK.shape[-1] ** -0.5
  logits_BxAxNxM = jnp.einsum('bqak,bmak->baqm', q_BxNxAxK, k_BxMxAxK,
                              preferred_element_type=jnp.float32) * scale
  if allowed_BxNxM is not None:
    logits_BxAxNxM = jnp.where(allowed_BxNxM[:, None], logits_BxAxNxM, _MIN)
  probs_BxAxNxM = jax.nn.softmax(logits_BxAxNxM, axis=-1)
  out_BxNxAxK = jnp.einsum('baqm,bmak->bqak', probs_BxAxNxM.astype(dtype), v_BxMxAxK)
  return out_BxNxAxK, jnp.mean(probs_BxAxNxM, axis=(1, 2))


_attention_recomputed = jax.checkpoint(_attention, static_argnums=(4,))


def _block_attention(q_BxNxAxK, k_BxNxAxK, v_BxNxAxK, block, dtype):
  """Attention within blocks of `block` tokens, computed per block (N T instead of N^2 work).

  N is padded to a whole number of blocks with keys that are masked out; padded outputs are
  dropped. Equals softmax attention under allowed_mask('block', N, block=block).
  """
  batch, n, heads, head_dim = q_BxNxAxK.shape
  blocks = -(-n // block)

  def split(t_BxNxAxK):
    t_BxNxAxK = jnp.pad(t_BxNxAxK, ((0, 0), (0, blocks * block - n), (0, 0), (0, 0)))
    return t_BxNxAxK.reshape(batch, blocks, block, heads, head_dim)

  q_BxGxTxAxK, k_BxGxTxAxK, v_BxGxTxAxK = split(q_BxNxAxK), split(k_BxNxAxK), split(v_BxNxAxK)
  real_GxT = (jnp.arange(blocks * block) < n).reshape(blocks, block)
  logits_BxGxAxTxT = jnp.einsum('bgqak,bgmak->bgaqm', q_BxGxTxAxK, k_BxGxTxAxK,
                                preferred_element_type=jnp.float32) * head_dim ** -0.5
  logits_BxGxAxTxT = jnp.where(real_GxT[None, :, None, None, :], logits_BxGxAxTxT, _MIN)
  probs_BxGxAxTxT = jax.nn.softmax(logits_BxGxAxTxT, axis=-1)
  out_BxGxTxAxK = jnp.einsum('bgaqm,bgmak->bgqak', probs_BxGxAxTxT.astype(dtype), v_BxGxTxAxK)
  # Mean over the N real queries of the full (block-diagonal) matrix, as the 'full' statistic.
  received_BxGxT = jnp.einsum('bgaqm,gq->bgm', probs_BxGxAxTxT,
                              real_GxT.astype(jnp.float32)) / (heads * n)
  return (out_BxGxTxAxK.reshape(batch, blocks * block, heads, head_dim)[:, :n],
          received_BxGxT.reshape(batch, blocks * block)[:, :n])


def _nystrom_attention(q_BxNxAxK, k_BxNxAxK, v_BxNxAxK, rank):
  """Nystromformer (Xiong et al. 2021) in float32 with an exact pseudo-inverse.

  Landmarks are the means of `rank` contiguous segments of the queries and keys; the output is
  softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V, which is softmax attention when
  rank = N (A pinv(A) A = A).
  """
  batch, n, heads, head_dim = q_BxNxAxK.shape
  q_BxNxAxK, k_BxNxAxK, v_BxNxAxK = (t.astype(jnp.float32)
                                     for t in (q_BxNxAxK, k_BxNxAxK, v_BxNxAxK))
  q_BxLxAxK, k_BxLxAxK = (t.reshape(batch, rank, n // rank, heads, head_dim).mean(axis=2)
                          for t in (q_BxNxAxK, k_BxNxAxK))

  def kernel(a_BxIxAxK, b_BxJxAxK):
    logits_BxAxIxJ = jnp.einsum('biak,bjak->baij', a_BxIxAxK, b_BxJxAxK, precision=_HIGHEST)
    return jax.nn.softmax(logits_BxAxIxJ * head_dim ** -0.5, axis=-1)

  inv_BxAxLxL = jnp.linalg.pinv(kernel(q_BxLxAxK, k_BxLxAxK))
  kv_BxAxLxK = jnp.einsum('balm,bmak->balk', kernel(q_BxLxAxK, k_BxNxAxK), v_BxNxAxK,
                          precision=_HIGHEST)
  kv_BxAxLxK = jnp.einsum('balj,bajk->balk', inv_BxAxLxL, kv_BxAxLxK, precision=_HIGHEST)
  return jnp.einsum('banl,balk->bnak', kernel(q_BxNxAxK, k_BxLxAxK), kv_BxAxLxK,
                    precision=_HIGHEST)


class SelfAttention(nn.Module):
  """zoo.models.text.SelfAttention (same params and init) with a choice of attention `kind`.

  Returns (out_BxNxD, stats): stats['keys_BxNxK'] are the keys averaged over heads (ToMe's
  merge metric); stats['received_BxN'] is the mean attention probability each token receives,
  over heads and queries (the pruning importance). 'linformer' and 'nystrom' never form the
  NxN matrix, so there 'received_BxN' is the L2 norm of each token's values averaged over heads.
  Kinds: 'full'; 'window' (the full matrix masked by allowed_mask('window'): no FLOP saving);
  'block' (computed block by block: N T work); 'linformer' (Wang et al. 2020: keys and values
  projected along the sequence to `rank` rows by learned E, F of shape (N, rank), shared by the
  heads; N is fixed by the input seen at init); 'nystrom' (`rank` landmarks; N % rank == 0).
  `allowed_BxNxN` (True = may attend) is supported by 'full' and 'window' only.
  """
  num_heads: int
  depth: int
  dtype: Any
  kind: str = 'full'
  window: int = 1
  block: int = 16
  rank: int = 16

  def _linformer(self, q_BxNxAxK, k_BxNxAxK, v_BxNxAxK):
    n = q_BxNxAxK.shape[1]
    # lucidrains/linformer's init: std 1/sqrt(rank).
    init = nn.with_logical_partitioning(nn.initializers.normal(self.rank ** -0.5), (None, None))
    e_NxL, f_NxL = (self.param(name, init, (n, self.rank), jnp.float32).astype(self.dtype)
                    for name in ('lowrank_e', 'lowrank_f'))
    k_BxLxAxK = jnp.einsum('nl,bnak->blak', e_NxL, k_BxNxAxK)
    v_BxLxAxK = jnp.einsum('nl,bnak->blak', f_NxL, v_BxNxAxK)
    out_BxNxAxK, _ = _softmax_attention(q_BxNxAxK, k_BxLxAxK, v_BxLxAxK, None, self.dtype)
    return out_BxNxAxK

  def _check(self, n, allowed_BxNxN):
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f'kind={self.kind!r}; allowed: {list(ATTENTION_KINDS)}')
    if allowed_BxNxN is not None and self.kind not in ('full', 'window'):
      raise ValueError(f"allowed_BxNxN is supported by kind 'full' and 'window' only, "
                       f'not kind={self.kind!r}')
    if self.kind == 'nystrom' and (self.rank < 1 or n % self.rank):
      raise ValueError(f"kind='nystrom' needs rank={self.rank} >= 1 dividing N={n}")
    if self.kind == 'linformer' and self.rank < 1:
      raise ValueError(f'rank={self.rank} must be >= 1')

  @nn.compact
  def __call__(self, x_BxNxD, allowed_BxNxN=None):
    batch, n, width = x_BxNxD.shape
    self._check(n, allowed_BxNxN)
    heads, head_dim = self.num_heads, width // self.num_heads
    attn_std, proj_std = width ** -0.5, width ** -0.5 * (2 * self.depth) ** -0.5
    q, k, v = (text._dense(width, ('embed', 'heads'), attn_std, self.dtype, f'{name}_proj')(
        x_BxNxD).reshape(batch, n, heads, head_dim) for name in 'qkv')
    if self.kind in ('full', 'window'):
      if self.kind == 'window':
        window_1xNxN = allowed_mask('window', n, window=self.window)[None]
        allowed_BxNxN = window_1xNxN if allowed_BxNxN is None else allowed_BxNxN & window_1xNxN
      out_BxNxAxK, received_BxN = _softmax_attention(q, k, v, allowed_BxNxN, self.dtype)
    elif self.kind == 'block':
      out_BxNxAxK, received_BxN = _block_attention(q, k, v, self.block, self.dtype)
    else:
      if self.kind == 'linformer':
        out_BxNxAxK = self._linformer(q, k, v)
      else:
        out_BxNxAxK = _nystrom_attention(q, k, v, self.rank).astype(self.dtype)
      received_BxN = jnp.mean(jnp.linalg.norm(v.astype(jnp.float32), axis=-1), axis=-1)
    stats = {'keys_BxNxK': jnp.mean(k.astype(jnp.float32), axis=2), 'received_BxN': received_BxN}
    out_BxNxD = text._dense(width, ('heads', 'embed'), proj_std, self.dtype, 'out_proj')(
        out_BxNxAxK.reshape(batch, n, width))
    return out_BxNxD, stats


class EncoderLayer(nn.Module):
  """zoo.models.text.EncoderLayer (same params) over `SelfAttention`; returns (x, stats)."""
  num_heads: int
  mlp_dim: int
  act: str
  depth: int
  norm_eps: float
  dtype: Any
  kind: str = 'full'
  window: int = 1
  block: int = 16
  rank: int = 16

  @nn.compact
  def __call__(self, x_BxNxD, allowed_BxNxN=None):
    h = text.layer_norm(self.norm_eps, 'layer_norm1')(x_BxNxD).astype(self.dtype)
    attn_BxNxD, stats = SelfAttention(self.num_heads, self.depth, self.dtype, self.kind,
                                      self.window, self.block, self.rank, name='self_attn')(
                                          h, allowed_BxNxN)
    x_BxNxD = x_BxNxD + attn_BxNxD.astype(jnp.float32)
    h = text.layer_norm(self.norm_eps, 'layer_norm2')(x_BxNxD).astype(self.dtype)
    return x_BxNxD + text.Mlp(self.mlp_dim, self.act, self.depth, self.dtype, name='mlp')(
        h).astype(jnp.float32), stats


def _keep_count(n, prune_keep, protect):
  # round() first: 0.3 * 10 is 3.0000000000000004 in floating point, which must keep 3.
  return min(n, max(math.ceil(round(prune_keep * n, 9)), protect, 1))


def layer_tokens(n: int, depth: int, reduce: str, reduce_from: int, prune_keep: float,
                 merge_r: int, protect: int = 0) -> tuple[int, ...]:
  """How many tokens enter each of the `depth` layers of a `ReducingEncoder` fed N = n tokens.

  Reduction happens between layers, never after the last one. 'prune': once, right before layer
  `reduce_from`, to max(ceil(prune_keep n), protect) tokens. 'merge': right before every layer
  i >= reduce_from, min(merge_r, (tokens - protect) // 2) tokens are merged away.
  """
  counts = [n]
  for i in range(1, depth):
    tokens = counts[-1]
    if reduce == 'prune' and i == reduce_from:
      tokens = _keep_count(tokens, prune_keep, protect)
    elif reduce == 'merge' and i >= reduce_from:
      tokens -= min(merge_r, max(tokens - protect, 0) // 2)
    counts.append(tokens)
  return tuple(counts)


def output_tokens(n: int, depth: int, reduce: str, reduce_from: int, prune_keep: float,
                  merge_r: int, protect: int = 0) -> int:
  """The number of tokens a `ReducingEncoder` returns for n input tokens (see layer_tokens)."""
  return layer_tokens(n, depth, reduce, reduce_from, prune_keep, merge_r, protect)[-1]


def _check_choices(kind, reduce, where):
  if kind not in ATTENTION_KINDS:
    raise ValueError(f'{where}.attention={kind!r}; allowed: {list(ATTENTION_KINDS)}')
  if reduce not in REDUCTIONS:
    raise ValueError(f'{where}.reduce={reduce!r}; allowed: {list(REDUCTIONS)}')


def _check_ranges(window, block, rank, prune_keep, merge_r, protect, num_tokens, where):
  for key, value, low in (('window', window, 0), ('block', block, 1), ('rank', rank, 1),
                          ('merge_r', merge_r, 0), ('protect', protect, 0)):
    if value < low:
      raise ValueError(f'{where}.{key}={value} must be >= {low}')
  if not 0 < prune_keep <= 1:
    raise ValueError(f'{where}.prune_keep={prune_keep} must be in (0, 1]')
  if protect > num_tokens:
    raise ValueError(f'{where}.protect={protect} must be <= the token count {num_tokens}')


def config_check(kind: str, reduce: str, window: int, block: int, rank: int, prune_keep: float,
                 merge_r: int, num_tokens: int, where: str = 'model.vision', *,
                 depth: int | None = None, reduce_from: int = 1, protect: int = 0) -> None:
  """Raises ValueError naming the offending `{where}.<key>` (ReducingEncoder's field names).

  `kind` is the attention kind (key `attention`). With `depth`, `reduce_from` is checked
  (1 <= reduce_from < depth when reducing) and the 'nystrom' / 'linformer' constraints on the
  rank are checked against every layer's token count, not only the input's `num_tokens`.
  """
  _check_choices(kind, reduce, where)
  _check_ranges(window, block, rank, prune_keep, merge_r, protect, num_tokens, where)
  counts = (num_tokens,)
  if depth is not None:
    if reduce != 'none' and not 1 <= reduce_from < depth:
      raise ValueError(f'{where}.reduce_from={reduce_from} must be in [1, depth={depth}) for '
                       f'{where}.reduce={reduce!r}: reduction happens between layers')
    counts = layer_tokens(num_tokens, depth, reduce, reduce_from, prune_keep, merge_r, protect)
  for layer, count in enumerate(counts):
    if kind == 'nystrom' and count % rank:
      raise ValueError(f"{where}.rank={rank} must divide the token count {count} (layer "
                       f"{layer}) for {where}.attention='nystrom'")
    if kind == 'linformer' and rank > count:
      raise ValueError(f"{where}.rank={rank} must be <= the token count {count} (layer "
                       f"{layer}) for {where}.attention='linformer'")


class ReducingEncoder(nn.Module):
  """zoo.models.text.Encoder's layers (params layers_i/...) with token pruning or merging.

  Maps x_BxNxD to (x_BxN'xD, size_BxN'): size counts the input tokens each output token stands
  for (ones unless merging). N' = output_tokens(N, depth, reduce, reduce_from, prune_keep,
  merge_r, protect), static. Schedule (see layer_tokens): reduction happens between layers,
  using the statistics of the layer just run: 'prune' once before layer `reduce_from`, keeping
  the max(ceil(prune_keep N), protect) tokens that received the most attention; 'merge' before
  every layer i >= reduce_from, r = merge_r tokens by ToMe matching of the keys (no
  proportional attention). The first `protect` tokens (a class token) are never removed.
  The attention fields are SelfAttention's (`attention` is its `kind`); with reduction a
  'window' mask follows the reduced token order, which after merging is no longer a grid.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  act: str
  norm_eps: float
  dtype: Any
  remat: bool = False
  attention: str = 'full'
  window: int = 1
  block: int = 16
  rank: int = 16
  reduce: str = 'none'
  reduce_from: int = 1
  prune_keep: float = 0.5
  merge_r: int = 0
  protect: int = 0

  def _reduce(self, x_BxNxD, size_BxN, stats):
    if self.reduce == 'prune':
      keep = _keep_count(x_BxNxD.shape[1], self.prune_keep, self.protect)
      x_BxPxD, index_BxP = prune(x_BxNxD, stats['received_BxN'], keep, self.protect)
      return x_BxPxD, jnp.take_along_axis(size_BxN, index_BxP, axis=1)
    return merge(x_BxNxD, size_BxN, stats['keys_BxNxK'], self.merge_r, protect=self.protect)

  def _reducing(self, i):
    """Whether tokens are reduced right before layer i."""
    return (self.reduce == 'prune' and i == self.reduce_from) or (
        self.reduce == 'merge' and i >= self.reduce_from)

  @nn.compact
  def __call__(self, x_BxNxD):
    config_check(self.attention, self.reduce, self.window, self.block, self.rank,
                 self.prune_keep, self.merge_r, x_BxNxD.shape[1], depth=self.depth,
                 reduce_from=self.reduce_from, protect=self.protect)
    fields = (self.num_heads, self.mlp_dim, self.act, self.depth, self.norm_eps, self.dtype,
              self.attention, self.window, self.block, self.rank)
    layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
    size_BxN = jnp.ones(x_BxNxD.shape[:2], jnp.float32)
    stats, i = None, 0
    while i < self.depth:
      if self._reducing(i):
        x_BxNxD, size_BxN = self._reduce(x_BxNxD, size_BxN, stats)
        x_BxNxD = nn.with_logical_constraint(x_BxNxD, text.ACT_AXES)
      end = next((j for j in range(i + 1, self.depth) if self._reducing(j)), self.depth)
      # The layers up to the next reduction run as one scan (zoo/nn/stack.py), all but the
      # last one before a reduction: the reduction reads its statistics.
      last = end - 1 if end < self.depth else end
      if stack.use_scan(self) and last - i > 1:
        x_BxNxD = stack.scan(self, EncoderLayer(*fields), [f'layers_{j}' for j in range(i, last)],
                             x_BxNxD, axes=text.ACT_AXES, remat=self.remat)
        i = last
      for i in range(i, end):
        x_BxNxD, stats = layer_cls(*fields, name=f'layers_{i}')(x_BxNxD)
        x_BxNxD = nn.with_logical_constraint(x_BxNxD, text.ACT_AXES)
      i = end
    return x_BxNxD, size_BxN
