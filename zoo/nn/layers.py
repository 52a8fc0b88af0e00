"""Shared building blocks: timestep embeddings, annotated Conv/Dense, GroupNorm, attention.

Legend: B batch, H/W height/width, C channels, N query positions (H*W), L context length,
D context width, M key positions, K head width, A attention heads, F feed-forward width.

Every parameter created here carries logical axis names from the zoo vocabulary
(`embed, mlp, heads, kv, vocab, conv_in, conv_out`), except norm scales/biases, which stay
replicated. Names follow diffusers' Flax models so PyTorch checkpoints convert mechanically.
"""

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.nn import stack

Dtype = Any

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
CONV_KERNEL_AXES = (None, None, 'conv_in', 'conv_out')


def to_dtype(name: str) -> Dtype:
  """Maps a config dtype string ('float32' or 'bfloat16') to a jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f'dtype={name!r} is not supported; allowed: {sorted(DTYPES)}')
  return DTYPES[name]


def param_count(params) -> int:
  """Number of scalars in a (boxed or plain) parameter pytree."""
  return sum(int(math.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def timestep_embedding(
    t_B,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
  """Sinusoidal embedding of (possibly continuous) timesteps, as diffusers `get_timestep_embedding`.

  Frequencies are exp(-ln(max_period) * i / (half - freq_shift)) for i < half = dim // 2;
  the output is [sin, cos] or, with `flip_sin_to_cos`, [cos, sin]; an odd `dim` gets a zero
  column at the end. Always float32: low-precision sin/cos of t ~ 1000 loses all phase.
  """
  half = dim // 2
  exponent_H = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args_BxH = jnp.asarray(t_B, jnp.float32)[:, None] * jnp.exp(exponent_H)[None, :]
  sin_BxH, cos_BxH = jnp.sin(args_BxH), jnp.cos(args_BxH)
  parts = [cos_BxH, sin_BxH] if flip_sin_to_cos else [sin_BxH, cos_BxH]
  if dim % 2:
    parts.append(jnp.zeros((args_BxH.shape[0], 1), jnp.float32))
  return jnp.concatenate(parts, axis=-1)


def conv(
    features: int,
    kernel_size: int = 3,
    *,
    strides: int = 1,
    padding: Any = 'SAME',
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    axes: Sequence[str | None] = CONV_KERNEL_AXES,
    name: str | None = None,
) -> nn.Conv:
  """A square 2-D `nn.Conv` whose HWIO kernel is named `axes` and whose bias is `(axes[3],)`.

  Pass None for an image-facing channel axis (3 RGB channels never divide a mesh axis).
  """
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=padding,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), tuple(axes)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[3],)),
      name=name,
  )


def dense(
    features: int,
    axes: Sequence[str | None],
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
  """An `nn.Dense` whose (in, out) kernel is named `axes` and whose bias is named `(axes[1],)`."""
  in_axis, out_axis = axes
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), (in_axis, out_axis)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (out_axis,)),
      name=name,
  )


class GroupNorm(nn.Module):
  """GroupNorm over the channel (last) axis, computed in float32 and returned in `dtype`.

  Statistics pool every axis between batch and channels (H, W or L) within a group, as
  torch.nn.GroupNorm does on NCHW. Params `scale`/`bias` are unannotated (replicated).
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(
          f'GroupNorm: channels={channels} is not divisible by num_groups={self.num_groups}')
    x_BxNxGxS = x.astype(jnp.float32).reshape(
        x.shape[0], -1, self.num_groups, channels // self.num_groups)
    mean = jnp.mean(x_BxNxGxS, axis=(1, 3), keepdims=True)
    # Two-pass variance: E[x^2]-E[x]^2 cancels catastrophically for large-mean activations.
    var = jnp.mean(jnp.square(x_BxNxGxS - mean), axis=(1, 3), keepdims=True)
    y = ((x_BxNxGxS - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    bshape = (1,) * (x.ndim - 1) + (channels,)
    scale = self.param('scale', nn.initializers.ones_init(), (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (channels,), self.param_dtype)
    y = y * scale.astype(jnp.float32).reshape(bshape) + bias.astype(jnp.float32).reshape(bshape)
    return y.astype(self.dtype)


def dot_product_attention(q_BxNxC, k_BxMxC, v_BxMxC, heads: int, mask_BxM=None,
                          dtype: Dtype = jnp.float32) -> jax.Array:
  """softmax(q k^T / sqrt(K)) v over `heads` heads of width K = C // heads; BxNxC in `dtype`.

  `mask_BxM` (True = attend) hides keys; a query whose keys are all hidden averages them all.
  """
  batch, channels = q_BxNxC.shape[0], q_BxNxC.shape[-1]
  head_dim = channels // heads
  q_BxNxAxK, k_BxMxAxK, v_BxMxAxK = (
      x.reshape(batch, -1, heads, head_dim) for x in (q_BxNxC, k_BxMxC, v_BxMxC))
  out_BxNxAxK = attention_heads(q_BxNxAxK, k_BxMxAxK, v_BxMxAxK, mask_BxM, dtype)
  return out_BxNxAxK.reshape(batch, -1, channels)


def attention_heads(q_BxNxAxK, k_BxMxAxK, v_BxMxAxK, mask_BxM=None, dtype=jnp.float32):
  """softmax(q k^T / sqrt(K)) v per head, BxNxAxK; `mask_BxM` (True = attend) is BxM (keys)
  or BxNxM (query-key pairs); logits and softmax in float32, probabilities in `dtype`.

  While a train step's gradient is traced (`stack.recompute_attention`) the BxAxNxM
  probabilities are recomputed in the backward pass from q, k, v (Megatron's selective
  recomputation, as memory-efficient attention kernels do), never stored: XLA's temp memory for
  DiT-S/2's bench train step goes 1.93 -> 1.65 GiB at the same step time. On CPU, XLA
  schedules an unrolled model's recomputation right after its forward pass, so the U-Nets only
  pay the extra matmul and softmax there.
  """
  core = _attention_recomputed if stack.recompute_attention() else _attention
  return core(q_BxNxAxK, k_BxMxAxK, v_BxMxAxK, mask_BxM, dtype)


def _attention(q_BxNxAxK, k_BxMxAxK, v_BxMxAxK, mask_BxM, dtype):
  # Logits and softmax in float32 (diffusers upcast_softmax=True): bf16 logits saturate.
  logits_BxAxNxM = jnp.einsum('bnak,bmak->banm', q_BxNxAxK, k_BxMxAxK,
                              preferred_element_type=jnp.float32) * (q_BxNxAxK.shape[-1] ** -0.5)
  if mask_BxM is not None:  # Keys (BxM) or query-key pairs (BxNxM) attended to.
    allowed = mask_BxM.astype(bool)
    allowed = allowed[:, None, None, :] if allowed.ndim == 2 else allowed[:, None]
    # `where` with the finite minimum, not an additive -inf: a query whose keys are all hidden
    # then averages them all instead of giving NaN.
    logits_BxAxNxM = jnp.where(allowed, logits_BxAxNxM, jnp.finfo(jnp.float32).min)
  probs_BxAxNxM = jax.nn.softmax(logits_BxAxNxM, axis=-1).astype(dtype)
  if _RECORDED and not isinstance(probs_BxAxNxM, jax.core.Tracer):
    _RECORDED[-1].append(probs_BxAxNxM)
  return jnp.einsum('banm,bmak->bnak', probs_BxAxNxM, v_BxMxAxK)


_RECORDED = []


@contextlib.contextmanager
def recorded_attention():
  """Yields a list that collects the BxAxNxM probabilities of every attention computed eagerly
  (not under jit) within the block, in call order: a diagnosis aid (zoo.bench.conditioning)."""
  probs = []
  _RECORDED.append(probs)
  try:
    yield probs
  finally:
    _RECORDED.pop()


_attention_recomputed = jax.checkpoint(_attention, static_argnums=(4,))


class Attention(nn.Module):
  """Residual multi-head attention over spatial positions (diffusers `Attention`, U-Net flavour).

  x (BxHxWxC or BxNxC) -> group_norm -> to_q/to_k/to_v -> softmax(q k^T / sqrt(K)) v
  -> to_out_0 -> + x. `head_dim` is channels per head (0 = one head of width C), so
  heads = C // head_dim, as UNet2DModel's `attention_head_dim`.

  Context (BxLxD), only when `context_dim` > 0:
  - joint (default): keys/values are [add_k_proj(ctx), to_k(x)], i.e. self- and cross-attention
    in one softmax (diffusers `AttnAddedKVProcessor`);
  - `only_cross_attention`: keys/values are to_k(ctx), to_v(ctx) (diffusers `Attention` called
    with `encoder_hidden_states`).
  `context_mask_BxL` (True = attend) hides padded context tokens. In joint mode every query still
  sees its own positions, so a fully masked context is harmless; in cross-only mode a fully
  masked row degrades to a uniform average.
  """
  head_dim: int = 0
  num_groups: int = 32
  epsilon: float = 1e-5
  context_dim: int = 0
  only_cross_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, features, axes, name):
    return dense(features, axes, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _keys_values(self, h_BxNxC, context_BxLxD, context_mask_BxL):
    """Projected keys/values BxMxC and the key mask BxM (None when everything is visible)."""
    channels = h_BxNxC.shape[-1]
    if context_BxLxD is None:
      return (self._dense(channels, ('embed', 'heads'), 'to_k')(h_BxNxC),
              self._dense(channels, ('embed', 'heads'), 'to_v')(h_BxNxC), None)
    ctx = context_BxLxD.astype(self.dtype)
    if self.only_cross_attention:
      return (self._dense(channels, ('embed', 'heads'), 'to_k')(ctx),
              self._dense(channels, ('embed', 'heads'), 'to_v')(ctx), context_mask_BxL)
    k_BxMxC = jnp.concatenate([
        self._dense(channels, ('embed', 'heads'), 'add_k_proj')(ctx),
        self._dense(channels, ('embed', 'heads'), 'to_k')(h_BxNxC)], axis=1)
    v_BxMxC = jnp.concatenate([
        self._dense(channels, ('embed', 'heads'), 'add_v_proj')(ctx),
        self._dense(channels, ('embed', 'heads'), 'to_v')(h_BxNxC)], axis=1)
    mask_BxM = None
    if context_mask_BxL is not None:
      mask_BxM = jnp.concatenate(
          [context_mask_BxL.astype(bool), jnp.ones(h_BxNxC.shape[:2], bool)], axis=1)
    return k_BxMxC, v_BxMxC, mask_BxM

  @nn.compact
  def __call__(self, x, context_BxLxD=None, context_mask_BxL=None):
    if (context_BxLxD is not None) != (self.context_dim > 0):
      raise ValueError(
          f'Attention: context_dim={self.context_dim} but context is '
          f'{"missing" if context_BxLxD is None else "given"}; pass a context iff context_dim > 0')
    if context_BxLxD is not None and context_BxLxD.shape[-1] != self.context_dim:
      raise ValueError(
          f'Attention: context width {context_BxLxD.shape[-1]} != context_dim={self.context_dim}')
    channels = x.shape[-1]
    head_dim = self.head_dim or channels
    if channels % head_dim:
      raise ValueError(f'Attention: channels={channels} not divisible by head_dim={head_dim}')
    heads = channels // head_dim
    batch = x.shape[0]

    h_BxNxC = GroupNorm(self.num_groups, self.epsilon, self.dtype, self.param_dtype,
                        name='group_norm')(x.reshape(batch, -1, channels))
    q_BxNxC = self._dense(channels, ('embed', 'heads'), 'to_q')(h_BxNxC)
    k_BxMxC, v_BxMxC, mask_BxM = self._keys_values(h_BxNxC, context_BxLxD, context_mask_BxL)

    out_BxNxC = dot_product_attention(q_BxNxC, k_BxMxC, v_BxMxC, heads, mask_BxM, self.dtype)
    out_BxNxC = self._dense(channels, ('heads', 'embed'), 'to_out_0')(out_BxNxC)
    return out_BxNxC.reshape(x.shape).astype(self.dtype) + x.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """diffusers `Attention` inside a `BasicTransformerBlock`: no norm, no residual.

  to_q/to_k/to_v without bias, to_out_0 with bias; keys/values come from `context_BxLxD` when
  given (cross-attention, `context_mask_BxL` True = attend), else from x (self-attention).
  """
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, features, axes, name, use_bias=False):
    return dense(features, axes, use_bias=use_bias, dtype=self.dtype,
                 param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x_BxNxC, context_BxLxD=None, context_mask_BxL=None):
    channels = x_BxNxC.shape[-1]
    if channels % self.heads:
      raise ValueError(f'MultiHeadAttention: channels={channels} not divisible by '
                       f'heads={self.heads}')
    source, kv_axes = x_BxNxC, ('embed', 'heads')
    if context_BxLxD is not None:
      source, kv_axes = context_BxLxD.astype(self.dtype), (None, 'heads')
    elif context_mask_BxL is not None:
      raise ValueError('MultiHeadAttention: context_mask_BxL given without a context')
    q_BxNxC = self._dense(channels, ('embed', 'heads'), 'to_q')(x_BxNxC)
    k_BxMxC = self._dense(channels, kv_axes, 'to_k')(source)
    v_BxMxC = self._dense(channels, kv_axes, 'to_v')(source)
    out_BxNxC = dot_product_attention(q_BxNxC, k_BxMxC, v_BxMxC, self.heads, context_mask_BxL,
                                      self.dtype)
    return self._dense(channels, ('heads', 'embed'), 'to_out_0', use_bias=True)(out_BxNxC)


class GEGLU(nn.Module):
  """`proj` to 2F features, split [hidden, gate], hidden * GELU(gate) (exact erf GELU)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxC):
    h_BxNx2F = dense(2 * self.features, ('embed', 'mlp'), dtype=self.dtype,
                     param_dtype=self.param_dtype, name='proj')(x_BxNxC)
    hidden_BxNxF, gate_BxNxF = jnp.split(h_BxNx2F, 2, axis=-1)
    return hidden_BxNxF * nn.gelu(gate_BxNxF, approximate=False)


class FeedForward(nn.Module):
  """diffusers `FeedForward` with GEGLU: net_0 (GEGLU to mult*C) -> net_2 (linear back to C)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxC):
    channels = x_BxNxC.shape[-1]
    h = GEGLU(self.mult * channels, self.dtype, self.param_dtype, name='net_0')(x_BxNxC)
    return dense(channels, ('mlp', 'embed'), dtype=self.dtype, param_dtype=self.param_dtype,
                 name='net_2')(h)


class BasicTransformerBlock(nn.Module):
  """x += attn1(norm1 x); x += attn2(norm2 x, context); x += ff(norm3 x) (diffusers, pre-LN).

  LayerNorms have eps 1e-5 and affine `scale`/`bias`, statistics in float32 (two-pass).
  """
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _norm(self, name):
    return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                        use_fast_variance=False, name=name)

  @nn.compact
  def __call__(self, x_BxNxC, context_BxLxD, context_mask_BxL=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x_BxNxC.astype(self.dtype)
    x = x + MultiHeadAttention(self.heads, name='attn1', **kw)(self._norm('norm1')(x))
    x = x + MultiHeadAttention(self.heads, name='attn2', **kw)(
        self._norm('norm2')(x), context_BxLxD, context_mask_BxL)
    return x + FeedForward(name='ff', **kw)(self._norm('norm3')(x))


class Transformer2D(nn.Module):
  """diffusers `Transformer2DModel` on continuous NHWC inputs, with a residual around it all.

  norm (GroupNorm, eps 1e-6) -> proj_in (1x1 conv, or linear with `use_linear_projection`) ->
  `num_layers` BasicTransformerBlocks over the HxW tokens -> proj_out -> + x. `heads` is the
  number of heads (width C // heads each). `remat` recomputes each block in the backward pass.
  """
  heads: int
  num_layers: int = 1
  num_groups: int = 32
  use_linear_projection: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _proj(self, features, axes, name):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if self.use_linear_projection:
      return dense(features, axes, **kw)
    return conv(features, 1, padding='VALID', axes=(None, None, *axes), **kw)

  @nn.compact
  def __call__(self, x_BxHxWxC, context_BxLxD, context_mask_BxL=None):
    batch, height, width, channels = x_BxHxWxC.shape
    h = GroupNorm(self.num_groups, 1e-6, self.dtype, self.param_dtype, name='norm')(x_BxHxWxC)
    # A 1x1 conv and a linear are the same map; only the kernel shape (checkpoint) differs.
    if self.use_linear_projection:
      h = h.reshape(batch, height * width, channels)
    h = self._proj(channels, ('conv_in', 'embed'), 'proj_in')(h)
    h_BxNxC = h.reshape(batch, height * width, channels)
    block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    for k in range(self.num_layers):
      h_BxNxC = block(self.heads, self.dtype, self.param_dtype, name=f'transformer_blocks_{k}')(
          h_BxNxC, context_BxLxD, context_mask_BxL)
    if not self.use_linear_projection:
      h_BxNxC = h_BxNxC.reshape(batch, height, width, channels)
    out = self._proj(channels, ('embed', 'conv_out'), 'proj_out')(h_BxNxC)
    return out.reshape(x_BxHxWxC.shape) + x_BxHxWxC.astype(self.dtype)
