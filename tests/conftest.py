"""Test session setup: 8 fake CPU devices, strict rank promotion, one shared offline data dir."""

import os

import tempfile

# Must happen before JAX is imported anywhere: sharding tests need 8 devices. Tests are
# dominated by XLA compile time on 2 cores, so trade run-time speed for compile speed (LLVM at
# -O0; XLA:CPU's older elementwise emitters compile a U-Net train step in ~60% of the time of
# its fusion emitters and run it ~10% slower), and share compiled programs between tests and
# the `zoo` subprocesses through a persistent cache.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0'
                           ' --xla_cpu_use_fusion_emitters=false').strip()
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='zoo_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# What the reliability tests inject, summed over pytest-xdist's workers into the summary line.
os.environ.setdefault('ZOO_RELIABILITY_LOG', os.path.join(
    tempfile.mkdtemp(prefix='zoo_reliability_'), 'counts.jsonl'))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record_reliability(**counts):
  """Adds to the reliability suite's totals (kills_survived, configs_rejected, ...)."""
  import json
  with open(os.environ['ZOO_RELIABILITY_LOG'], 'a') as f:
    f.write(json.dumps(counts) + '\n')


# The slowest files first (summed seconds of a local full run, 2026-11-27): pytest-xdist hands whole
# files to the two workers in collection order (`--no-loadscope-reorder` in setup.cfg; its
# default puts the files with the most tests first, leaving long files of few tests for the
# end), so long files start early and the short ones fill in at the end.
SLOWEST_FILES = (
    'test_text_to_image.py',  # 390
    'test_train.py',  # 255
    'test_vlm_task.py',  # 239
    'test_distill.py',  # 214
    'test_latents.py',  # 205
    'test_sd_pipeline.py',  # 198
    'test_cli.py',  # 159
    'test_generate.py',  # 151
    'test_control_task.py',  # 149
    'test_vlm.py',  # 134
    'test_reliability_processes.py',  # 131
    'test_colab.py',  # 116
    'test_bench_quality.py',  # 107
    'test_vae_task.py',  # 93
    'test_lora.py',  # 87
    'test_inpaint_task.py',  # 83
    'test_bench_perf.py',  # 81
    'test_contrastive_task.py',  # 80
    'test_bench_vlm.py',  # 69
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: in-file order kept.


def pytest_terminal_summary(terminalreporter):
  import collections
  import json
  path = os.environ.get('ZOO_RELIABILITY_LOG', '')
  if not os.path.exists(path):
    return
  totals = collections.Counter()
  with open(path) as f:
    for line in f:
      totals.update(json.loads(line))
  terminalreporter.write_line(
      'reliability suite: ' + ', '.join(f'{v} {k.replace("_", " ")}' for k, v in
                                        sorted(totals.items())))


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


def leaves(tree):
  """The leaves of a (device) pytree as numpy arrays."""
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def assert_same(a, b):
  """Two pytrees of the same structure with bit-identical leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves(a), leaves(b)):
    np.testing.assert_array_equal(x, y)


def perturb(module, seed):
  """`module` (torch) in eval mode, every parameter (norms, biases too) moved by 0.1 N(0, 1)."""
  import torch  # The parity extra; only parity tests call this.
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return module.eval()


def perturbed_hf_model(cls, config, seed=0):
  """A random transformers model `cls(config)` (seeded), then `perturb`ed."""
  import torch
  torch.manual_seed(seed)
  return perturb(cls(config), seed + 1)


def _shared_run(tmp_path_factory, worker_id, name, spec, overrides):
  """(workdir, config, final state) of `zoo train` on experiment `spec`, trained once per test
  session: pytest-xdist's workers share it under a file lock (read-only afterwards)."""
  import fcntl
  from zoo import config as zoo_config
  from zoo import runs
  from zoo import train
  root = tmp_path_factory.getbasetemp()
  if worker_id != 'master':
    root = root.parent  # The session's directory, above each worker's own.
  workdir = root / name
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if (workdir / 'trained').exists():
      config, _, state = runs.load(str(workdir))
      return workdir, config, state
    config = zoo_config.load(os.path.join(REPO, 'experiments', spec),
                             ['--config.mesh.data=1', '--config.train.progress_bar=false',
                              *overrides])
    state = train.train_and_evaluate(config, str(workdir))
    (workdir / 'trained').touch()
    return workdir, config, state


@pytest.fixture(scope='session')
def shapes_diffusion_run(tmp_path_factory, worker_id):
  """experiments/shapes_diffusion.py:smoke=True (20 steps, 1 device), shared by the engine,
  ControlNet, distillation, LoRA, inpainting, generation and notebook tests."""
  return _shared_run(tmp_path_factory, worker_id, 'shapes_diffusion',
                     'shapes_diffusion.py:smoke=True', ['--config.evals.samples.per_label=1'])


@pytest.fixture(scope='session')
def vae_smoke_run(tmp_path_factory, worker_id):
  """experiments/vae_shapes.py:smoke=True,steps=2 without evaluators (1 device), the frozen VAE
  of the latent-diffusion and latents tests."""
  return _shared_run(tmp_path_factory, worker_id, 'vae_smoke', 'vae_shapes.py:smoke=True,steps=2',
                     ['--config.evals={}'])
