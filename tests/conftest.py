"""Test session setup: 8 fake CPU devices, strict rank promotion, one shared offline data dir."""

import os

import tempfile

# Must happen before JAX is imported anywhere: sharding tests need 8 devices. Tests are
# dominated by XLA compile time on 2 cores, so trade run-time speed for compile speed, and share
# compiled programs between tests and the `zoo` subprocesses through a persistent cache.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='zoo_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session', autouse=True)
def zoo_data_dir(tmp_path_factory):
  """Built-in datasets are generated once per session into a temporary data dir."""
  path = str(tmp_path_factory.mktemp('tensorflow_datasets'))
  old = os.environ.get('ZOO_DATA_DIR')
  os.environ['ZOO_DATA_DIR'] = path
  yield path
  if old is None:
    os.environ.pop('ZOO_DATA_DIR', None)
  else:
    os.environ['ZOO_DATA_DIR'] = old


def random_params(module, *args, seed=0, **kwargs):
  """Params with the init's structure, filled from numpy (XLA-compiling the init is slow on CPU)."""
  import math
  import flax.linen as nn
  import jax.numpy as jnp
  import numpy as np
  shapes = nn.unbox(jax.eval_shape(
      lambda: module.init(jax.random.key(0), *args, **kwargs)))['params']
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      w = rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))
    elif name == 'scale':
      w = 1.0 + 0.1 * rng.standard_normal(s.shape)
    else:
      w = 0.1 * rng.standard_normal(s.shape)
    return jnp.asarray(w, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def fast_jit(fn, *args):
  """jit and compile for these args with XLA's backend optimisation off (halves CPU compile)."""
  return jax.jit(fn).lower(*args).compile({'xla_backend_optimization_level': 0})


def perturbed(params, seed=1):
  """Params plus N(0, 0.1) noise, so zero-initialised layers (adaLN-Zero, outputs) matter."""
  import numpy as np
  leaves, tree = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [x + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])
