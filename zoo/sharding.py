"""Mesh from the config, logical-axis rules, global batches and the "really sharded" check.

Model code names logical axes (`embed`, `mlp`, `heads`, `conv_in`, `conv_out`, ...); the
experiment maps them to mesh axes (`data`, `fsdp`, `tensor`) in `config.sharding_rules`. A
dimension that a mesh axis does not divide stays replicated, and `describe` reports it.
"""

import math
import os

import jax
import numpy as np
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
# The usual mapping of the logical vocabulary: FSDP over embeddings and conv outputs, tensor
# parallelism over MLP / heads / vocab. Experiments start from it (`config.sharding_rules`).
DEFAULT_RULES = {
    'act_batch': BATCH_AXES, 'act_len': None, 'act_emb': None, 'embed': 'fsdp',
    'mlp': 'tensor', 'heads': 'tensor', 'kv': None, 'vocab': 'tensor', 'conv_in': None,
    'conv_out': 'fsdp',
}


def maybe_initialize_distributed(dist_config=None):
  """Calls `jax.distributed.initialize` when the config or the environment asks for it.

  Environment: ZOO_COORDINATOR_ADDRESS, ZOO_NUM_PROCESSES, ZOO_PROCESS_ID (all three). Must run
  before JAX touches a backend; CPU processes talk through gloo collectives. A process that stops
  sending heartbeats for ZOO_HEARTBEAT_TIMEOUT seconds (default 30; JAX's own is 100) takes the
  others down with an error instead of leaving them waiting in a collective.
  """
  address = os.environ.get('ZOO_COORDINATOR_ADDRESS', '')
  num, pid = int(os.environ.get('ZOO_NUM_PROCESSES', 1)), int(os.environ.get('ZOO_PROCESS_ID', 0))
  if dist_config is not None and dist_config.coordinator_address:
    address = dist_config.coordinator_address
    num, pid = dist_config.num_processes, dist_config.process_id
  if not address or jax.distributed.is_initialized():
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=address, num_processes=num, process_id=pid,
      heartbeat_timeout_seconds=int(os.environ.get('ZOO_HEARTBEAT_TIMEOUT', 30)))
  return True


def mesh_shape(mesh_config, num_devices):
  """Axis sizes for `config.mesh`, resolving the single -1 to the remaining devices."""
  sizes = [mesh_config[a] for a in AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh {dict(mesh_config)} does not divide {num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) > num_devices:
    raise ValueError(f'config.mesh {dict(mesh_config)} needs {math.prod(sizes)} devices, '
                     f'{num_devices} available')
  return tuple(sizes)


def make_mesh(mesh_config):
  """A mesh with classic (Auto) GSPMD axes over all devices, or the first N on one process."""
  devices = jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  if math.prod(shape) < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f'config.mesh {dict(mesh_config)} must cover all {len(devices)} devices '
                       'of a multi-process run (use -1 for one axis)')
    devices = devices[:math.prod(shape)]
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=devices)


def rules_from_config(rules_config):
  """`config.sharding_rules` (logical -> mesh axis or tuple or None) as a dict."""
  return {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in rules_config.items()}


def logical_to_spec(names, shape, mesh, rules):
  """A PartitionSpec for one array; dims a mesh axis does not divide (or reused axes) replicate."""
  used, spec = set(), []
  for name, dim in zip(names, shape):
    axes = rules.get(name) if name is not None else None
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a not in used)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or size == 1 or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def tree_shardings(abstract_boxed, mesh, rules):
  """NamedShardings for every leaf of a (boxed) abstract tree; unboxed leaves replicate."""
  def leaf(x):
    if isinstance(x, meta.Partitioned):
      return NamedSharding(mesh, logical_to_spec(tuple(x.names), x.value.shape, mesh, rules))
    return NamedSharding(mesh, P())
  return jax.tree.map(leaf, abstract_boxed, is_leaf=lambda x: isinstance(x, meta.Partitioned))


def batch_sharding(mesh):
  """Batch dimension over the data-parallel axes, everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch, sharding):
  """Per-process numpy batch -> global jax.Arrays laid out with `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def check_sharded(tree, shardings):
  """Raises if any array is not laid out as its expected sharding (silent replication)."""
  bad = []
  for path, (x, s) in _zip_with_path(tree, shardings):
    if not x.sharding.is_equivalent_to(s, x.ndim):
      bad.append(f'{path}: {x.sharding.spec} != expected {s.spec}')
  if bad:
    raise AssertionError('arrays not sharded as the rules say:\n' + '\n'.join(bad[:20]))


def describe(tree):
  """Fraction of parameter bytes that are split over devices, for the log."""
  total = sharded = 0
  for x in jax.tree.leaves(tree):
    n = x.size * x.dtype.itemsize
    total += n
    if any(p is not None for p in x.sharding.spec):
      sharded += n
  return {'param_bytes': total, 'sharded_fraction': sharded / max(total, 1)}


def _zip_with_path(tree, other):
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  others = treedef.flatten_up_to(other)
  return [(jax.tree_util.keystr(p), (x, o)) for (p, x), o in zip(flat, others)]


def host_gather(tree):
  """Fully replicated numpy copies of (possibly sharded, multi-process) arrays."""
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return multihost_utils.process_allgather(tree, tiled=True)
