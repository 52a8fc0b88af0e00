"""Evaluating a traced function op by op, without the work no output needs.

XLA:CPU compiles a param-init program slowly: each param's random draw is its own chain of
integer kernels, so the init of the smoke latent text-to-image model (~140 random arrays)
compiles in ~27 s, three times its train step. Run op by op, each draw is a small program
that JAX caches per (initializer, shape) and the persistent compilation cache shares between
runs: ~8 s cold, less warm. `Setup.init` uses this on CPU meshes; accelerators keep the one
jitted init, which creates every array directly on its devices.
"""

import jax
from jax.extend import core


def prune(jaxpr):
  """`jaxpr` without the equations none of its outputs depend on (a Flax init's forward
  pass, whose activations only served to infer shapes). Effectful equations stay."""
  needed = {v for v in jaxpr.outvars if isinstance(v, core.Var)}
  kept = []
  for eqn in reversed(jaxpr.eqns):
    if eqn.effects or any(v in needed for v in eqn.outvars):
      kept.append(eqn)
      needed.update(v for v in eqn.invars if isinstance(v, core.Var))
  return jaxpr.replace(eqns=kept[::-1])


def run(closed, args, keep=None):
  """The outputs of `closed` (a ClosedJaxpr) at `args`, only those `keep` marks (the others
  None, their equations pruned). Outside a trace each op runs as its own cached program.
  A `jax.ShapeDtypeStruct` argument stands for zeros, made only if what is kept reads it."""
  keep = [True] * len(closed.jaxpr.outvars) if keep is None else keep
  wanted = [v for v, k in zip(closed.jaxpr.outvars, keep) if k]
  jaxpr = prune(closed.jaxpr.replace(outvars=wanted, debug_info=None))
  read = {v for e in jaxpr.eqns for v in e.invars if isinstance(v, core.Var)}
  read |= {v for v in jaxpr.outvars if isinstance(v, core.Var)}
  args = [jax.numpy.zeros(a.shape, a.dtype) if isinstance(a, jax.ShapeDtypeStruct) and v in read
          else a for v, a in zip(jaxpr.invars, args)]
  outs = iter(jax.core.eval_jaxpr(jaxpr, closed.consts, *args))
  return [next(outs) if k else None for k in keep]
