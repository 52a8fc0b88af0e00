"""A stack of identical layers applied as one `lax.scan`, its params kept per layer.

The DiT blocks, the ViT / text encoder layers and the VLM's vision and language layers (the
latter in groups: a gated cross-attention block and the decoder layers up to the next) are
stored as `blocks_i` / `layers_i` / `xattn_k` (the checkpoint layouts of their references) and
created unrolled at init. In a train step they run as one scan over those params stacked on a
new leading axis. Two reasons, both measured on XLA:CPU (zoo/bench/PROFILE.md):

- Unrolled, XLA leaves the residual stream's sums unmaterialised and fuses the whole chain of
  every earlier layer into each consumer of the backward pass (a DiT-S/2 train step spent 59%
  of its time recomputing it). A loop carry is always one buffer.
- XLA compiles one layer instead of depth of them.

Both gains are the backward pass's. A forward pass alone runs unrolled: stacking copies every
layer's params per call, which at batch 1 made a scanned ViT-B/16 forward 1.5x and the bench
VLM's 1.9x slower than unrolled. So the scan is on only while a gradient is traced:
`value_and_grad` here (the engine's and the benchmarks' train steps) traces `fn` under
`scanned()`. `unrolled()` turns it off even there (FLOP counting: XLA's cost analysis counts a
loop body once; method interception, which sees scope paths, as `zoo.nn.lora.apply_unmerged`).
The values are the same up to float reassociation.
"""

import contextlib
import contextvars
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_SCANNED = contextvars.ContextVar('zoo_scanned', default=False)
_UNROLLED = contextvars.ContextVar('zoo_unrolled', default=False)
_STORED = contextvars.ContextVar('zoo_stored_attention', default=False)


@contextlib.contextmanager
def _setting(var):
  token = var.set(True)
  try:
    yield
  finally:
    var.reset(token)


def scanned():
  """Within it, models trace their layer stacks as a scan, unless under `unrolled()`."""
  return _setting(_SCANNED)


def unrolled():
  """Within it, models trace their layer stacks unrolled, even under `scanned()` (jit caches
  traces by function: lower a fresh one)."""
  return _setting(_UNROLLED)


def use_scan(parent: nn.Module) -> bool:
  """Whether `parent` should apply its stack as a scan: under `scanned()`, not under
  `unrolled()`, not at init."""
  return _SCANNED.get() and not _UNROLLED.get() and not parent.is_initializing()


def stored_attention():
  """Within it, attention stores its probabilities for the backward pass (`python -m
  zoo.bench.recompute` compares)."""
  return _setting(_STORED)


def recompute_attention() -> bool:
  """Whether attention recomputes its probabilities in the backward pass instead of storing
  them (zoo.nn.layers.attention_heads): in a train step's gradient (`scanned()`), not under
  `unrolled()` (FLOP counts stay the model's) or `stored_attention()`."""
  return _SCANNED.get() and not _UNROLLED.get() and not _STORED.get()


def value_and_grad(fn, **kwargs):
  """`jax.value_and_grad(fn, **kwargs)` whose trace applies layer stacks as scans."""
  grad_fn = jax.value_and_grad(fn, **kwargs)

  def traced_scanned(*args, **kw):
    with scanned():
      return grad_fn(*args, **kw)
  return traced_scanned


def scan(parent: nn.Module, layer: nn.Module, names: Sequence[str | Mapping[str, str]], x,
         *args, residuals=None, axes=None, remat=False):
  """x through `layer` (unbound) once per entry of `names`, with the params of that child of
  `parent`, as one `lax.scan`; then + residuals[i] (a list, or None) and the logical
  constraint `axes`. `remat` recomputes each layer in the backward pass.

  An entry may map `layer`'s children to children of `parent` ({'xattn': 'xattn_1', 'layer_0':
  'layers_2', ...}): a group of differently named layers scanned as one step. A layer that
  returns (x, aux) has aux dropped (statistics a scanned run does not need).
  """
  params = nn.unbox(parent.variables['params'])

  def gather(entry):
    if isinstance(entry, str):
      return params[entry]
    return {child: params[name] for child, name in entry.items()}

  stacked = jax.tree.map(lambda *p: jnp.stack(p), *map(gather, names))

  def body(x, xs):
    layer_params, residual = xs
    x = layer.apply({'params': layer_params}, x, *args)
    x = x[0] if isinstance(x, tuple) else x
    if residual is not None:
      x = x + residual.astype(x.dtype)
    return (nn.with_logical_constraint(x, axes) if axes else x), None

  body = jax.checkpoint(body) if remat else body
  x, _ = jax.lax.scan(body, x, (stacked, jnp.stack(residuals) if residuals else None))
  return x
