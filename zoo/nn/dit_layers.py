"""timm / PixArt transformer layers of the DiT: fused-qkv self-attention, cross-attention, MLP.

Legend: B batch, N tokens, L context length, D hidden size, A heads, K head width.
Parameter names follow facebookresearch/DiT (timm) and PixArt-alpha, so checkpoints convert
mechanically (zoo/convert/dit.py).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.nn import layers

LN_EPS = 1e-6


def with_axes(init, axes):
  """An initializer whose parameter carries the logical axis names `axes`."""
  return nn.with_logical_partitioning(init, tuple(axes))


XAVIER = nn.initializers.xavier_uniform()
ZEROS = nn.initializers.zeros_init()
NORMAL_002 = nn.initializers.normal(0.02)


def dense(features, axes, kernel_init, dtype, name):
  """nn.Dense with logical axes; biases always start at zero (DiT `_basic_init`)."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=with_axes(kernel_init, axes), bias_init=with_axes(ZEROS, (axes[1],)),
                  name=name)


def layer_norm(x, eps=LN_EPS):
  """LayerNorm without affine parameters, in float32 with a two-pass variance."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class SelfAttention(nn.Module):
  """timm `Attention`: fused qkv (bias) -> softmax(q k^T / sqrt(K)) v -> proj."""
  num_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x_BxNxD):
    batch, tokens, hidden = x_BxNxD.shape
    head_dim = hidden // self.num_heads
    qkv_BxNx3D = dense(3 * hidden, ('embed', 'heads'), XAVIER, self.dtype, 'qkv')(x_BxNxD)
    q_BxNxAxK, k_BxNxAxK, v_BxNxAxK = (
        qkv_BxNx3D.reshape(batch, tokens, 3, self.num_heads, head_dim).transpose(2, 0, 1, 3, 4))
    out_BxNxAxK = layers.attention_heads(q_BxNxAxK, k_BxNxAxK, v_BxNxAxK, None, self.dtype)
    return dense(hidden, ('heads', 'embed'), XAVIER, self.dtype, 'proj')(
        out_BxNxAxK.reshape(batch, tokens, hidden))


class Mlp(nn.Module):
  """timm `Mlp`: fc1 -> GELU(tanh) -> fc2."""
  hidden_features: int
  dtype: Any

  @nn.compact
  def __call__(self, x_BxNxD):
    h = dense(self.hidden_features, ('embed', 'mlp'), XAVIER, self.dtype, 'fc1')(x_BxNxD)
    h = nn.gelu(h, approximate=True)
    return dense(x_BxNxD.shape[-1], ('mlp', 'embed'), XAVIER, self.dtype, 'fc2')(h)


class CrossAttention(nn.Module):
  """PixArt-alpha `MultiHeadCrossAttention`: q_linear(x), kv_linear(ctx) -> attention -> proj.

  `proj` is zero-initialised, so the sub-layer adds exactly nothing at init. Masked context
  tokens (mask False) get zero weight; for an example with no visible token the sub-layer
  returns zero (not a uniform average of padding plus the proj bias).
  """
  num_heads: int
  dtype: Any

  @nn.compact
  def __call__(self, x_BxNxD, ctx_BxLxD, mask_BxL):
    batch, tokens, hidden = x_BxNxD.shape
    head_dim = hidden // self.num_heads
    q_BxNxAxK = dense(hidden, ('embed', 'heads'), XAVIER, self.dtype, 'q_linear')(
        x_BxNxD).reshape(batch, tokens, self.num_heads, head_dim)
    kv_BxLx2D = dense(2 * hidden, ('embed', 'heads'), XAVIER, self.dtype, 'kv_linear')(
        ctx_BxLxD.astype(self.dtype))
    k_BxLxAxK, v_BxLxAxK = kv_BxLx2D.reshape(
        batch, -1, 2, self.num_heads, head_dim).transpose(2, 0, 1, 3, 4)
    out_BxNxAxK = layers.attention_heads(q_BxNxAxK, k_BxLxAxK, v_BxLxAxK, mask_BxL, self.dtype)
    out_BxNxD = dense(hidden, ('heads', 'embed'), ZEROS, self.dtype, 'proj')(
        out_BxNxAxK.reshape(batch, tokens, hidden))
    # A fully masked row would softmax to a uniform average of padding: drop it instead.
    return jnp.where(jnp.any(mask_BxL, axis=1)[:, None, None], out_BxNxD, 0)
