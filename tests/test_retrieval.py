"""Retrieval Recall@K: the protocol on fixed embeddings, the evaluator's plumbing on a fake dual
encoder, and two processes computing exactly the one-process metrics.

Run as a script (`python tests/test_retrieval.py PROCESS_ID PORT OUT`) it is one process of the
two-process check: it runs both embedding evaluators on the fake model and writes the metrics.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # For the two-process script; pytest has it already.

from data import text_tokenizers  # noqa: E402
from zoo import config as zoo_config  # noqa: E402
from zoo import embedding  # noqa: E402
from zoo.evals import retrieval  # noqa: E402
from zoo.evals import zero_shot  # noqa: E402

E = 16


def _normalise(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class FakeDualEncoder:
  """The contrastive task's predict interface over integer-exact random projections.

  Images become their uint8 levels and texts bags of words, each times a small-integer matrix:
  the sums are exact in float32 in any order, so an item's embedding does not depend on the
  batch it came in (identical captions tie exactly) and metrics can be compared exactly.
  """

  def __init__(self, resolution=32, channels=3, max_len=32):
    self.tokenizer = text_tokenizers.get('shapes')
    self.max_len = max_len
    rng = np.random.default_rng(0)
    self.weights = {
        'img': rng.integers(-2, 3, (resolution * resolution * channels, E)).astype(np.float32),
        'txt': rng.integers(-2, 3, (self.tokenizer.vocab_size, E)).astype(np.float32)}
    self.predict = {'encode_image': jax.jit(self.encode_image),
                    'encode_text': jax.jit(self.encode_text)}

  def params(self, mesh):
    """The weights replicated over `mesh` (one process or several)."""
    return {k: jax.make_array_from_callback(w.shape, NamedSharding(mesh, P()), lambda i, w=w: w[i])
            for k, w in self.weights.items()}

  @staticmethod
  def encode_image(params, images_BxHxWxC):
    levels_BxF = jnp.round((images_BxHxWxC + 1.0) * 127.5).reshape(images_BxHxWxC.shape[0], -1)
    return _normalise(levels_BxF @ params['img'])

  @staticmethod
  def encode_text(params, tokens_BxL, mask_BxL):
    vocab = params['txt'].shape[0]
    bag_BxV = (jax.nn.one_hot(tokens_BxL, vocab) * mask_BxL[..., None]).sum(axis=1)
    return _normalise(bag_BxV @ params['txt'])


def data_config():
  cfg = zoo_config.ConfigDict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key='',
      builder_config='tinysingle32', train_split='train', eval_split='validation', features=()))
  cfg.text = zoo_config.ConfigDict(dict(caption_key='captions', tokenizer='shapes',
                                        tokenizer_path='', max_len=32))
  return cfg


def eval_configs():
  config = zoo_config.ConfigDict({'data': data_config(), 'task': {'name': 'contrastive'}})
  config.evals = zoo_config.ConfigDict({
      'retrieval': dict(type='retrieval', split='validation', builder_config='',
                        num_examples=40, max_captions=3, batch_size=12, use_ema=False),
      'zero_shot': dict(type='zero_shot', split='held_out', builder_config='', num_examples=0,
                        batch_size=12,
                        use_ema=False, label_key='shape_colour', classes=(),
                        templates=('a {colour} {shape}.', 'one shape: a {}.'))})
  return config


def run_evaluators(mesh, done=lambda name: None):
  """{evaluator: metrics} of both evaluators with the fake model's params on `mesh`."""
  config, task = eval_configs(), FakeDualEncoder()
  state = {'params': task.params(mesh)}
  out = {}
  for name, kind in (('retrieval', retrieval.Retrieval), ('zero_shot', zero_shot.ZeroShot)):
    kind.check(config.evals[name], config, f'config.evals.{name}')
    out[name] = kind(config.evals[name], task=task, config=config, workdir='').run(state, 0)
    done(name)
  return out


# ---------------------------------------------------------------------------------------------
# The protocol on fixed embeddings.

def reference_ranks(img_NxE, txt_MxE, owner_M):
  """Ranks by sorting, one query at a time (no ties in random embeddings)."""
  i2t = []
  for n in range(len(img_NxE)):
    order = np.argsort(-(txt_MxE @ img_NxE[n]))
    i2t.append(next(r for r, m in enumerate(order) if owner_M[m] == n))
  t2i = [list(np.argsort(-(img_NxE @ t))).index(owner_M[m]) for m, t in enumerate(txt_MxE)]
  return np.array(i2t), np.array(t2i)


def test_ranks_match_sorting_and_recall_counts_any_caption():
  rng = np.random.default_rng(0)
  img, txt = rng.standard_normal((30, 8)), rng.standard_normal((70, 8))
  owner = np.concatenate([np.arange(30), rng.integers(0, 30, 40)])
  i2t, t2i = retrieval.ranks(img, txt, owner)
  ref_i2t, ref_t2i = reference_ranks(img, txt, owner)
  np.testing.assert_array_equal(i2t, ref_i2t)
  np.testing.assert_array_equal(t2i, ref_t2i)
  recall = retrieval.recall_at_k(img, txt, owner)
  for k in retrieval.KS:
    assert recall[f'i2t_recall@{k}'] == np.mean(ref_i2t < k)
    assert recall[f't2i_recall@{k}'] == np.mean(ref_t2i < k)


def test_recall_by_hand_with_ties_and_an_image_without_captions():
  img = np.eye(3, dtype=np.float32)
  # Caption 0 of image 0 is perfect; image 1's only caption is image 2's twin; image 2 has none.
  txt = np.array([[1, 0, 0], [0, 0.2, 1], [0, 0.2, 1]], np.float32)
  owner = np.array([0, 1, 1])
  i2t, t2i = retrieval.ranks(img, txt, owner)
  np.testing.assert_array_equal(i2t, [0, 0, 3])  # Image 2: no captions, rank M.
  np.testing.assert_array_equal(t2i, [0, 1, 1])  # Image 2 outscores image 1 for its captions.
  recall = retrieval.recall_at_k(img, txt, owner, ks=(1, 2))
  assert recall == {'i2t_recall@1': 1.0, 't2i_recall@1': 1 / 3, 'i2t_recall@2': 1.0,
                    't2i_recall@2': 1.0}
  # Identical captions of two images tie: each image finds "its" caption first.
  i2t, _ = retrieval.ranks(np.eye(2), np.array([[1.0, 1.0], [1.0, 1.0]]), np.array([0, 1]))
  np.testing.assert_array_equal(i2t, [0, 0])


def test_flatten_captions_keeps_image_caption_order():
  txt = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)
  valid = np.array([[True, False, True], [True, True, False]])
  flat, owner = retrieval.flatten_captions(txt, valid)
  np.testing.assert_array_equal(flat[:, 0], [0, 2, 3, 4])
  np.testing.assert_array_equal(owner, [0, 0, 1, 1])


# ---------------------------------------------------------------------------------------------
# The evaluator on a fake model.

def test_retrieval_evaluator_embeds_the_first_n_examples_and_all_their_captions():
  mesh = jax.make_mesh((8, 1, 1), ('data', 'fsdp', 'tensor'))
  metrics = run_evaluators(mesh)['retrieval']
  assert metrics['images'] == 40 and metrics['captions'] == 120  # 3 of each image's 4.
  task, reader = FakeDualEncoder(), embedding.SplitReader(data_config(), 'validation')
  examples = reader.examples(range(40))
  params = {k: jnp.asarray(w) for k, w in task.weights.items()}
  img = np.asarray(task.encode_image(params, np.stack([reader.image(ex) for ex in examples])))
  texts = [c for ex in examples for c in embedding.captions_of(ex, 'captions')[:3]]
  txt = np.asarray(task.encode_text(params, *task.tokenizer.encode(texts, 32)))
  expected = retrieval.recall_at_k(img, txt, np.repeat(np.arange(40), 3))
  assert {k: metrics[k] for k in expected} == expected


def test_config_errors_name_the_key():
  config = eval_configs()
  config.task.name = 'classification'
  with pytest.raises(ValueError, match='retrieval needs config.task.name'):
    retrieval.Retrieval.check(config.evals.retrieval, config, 'config.evals.retrieval')
  config = eval_configs()
  config.evals.retrieval.max_captions = 0
  with pytest.raises(ValueError, match='max_captions'):
    retrieval.Retrieval.check(config.evals.retrieval, config, 'config.evals.retrieval')
  config = eval_configs()
  config.evals.retrieval.num_examples = 65
  ev = retrieval.Retrieval(config.evals.retrieval, task=FakeDualEncoder(), config=config,
                           workdir='')
  mesh = jax.make_mesh((8, 1, 1), ('data', 'fsdp', 'tensor'))
  with pytest.raises(ValueError, match='num_examples=65 exceeds the 64 examples'):
    ev.run({'params': FakeDualEncoder().params(mesh)}, 0)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_compute_the_one_process_metrics(tmp_path):
  one = run_evaluators(jax.make_mesh((8, 1, 1), ('data', 'fsdp', 'tensor')))
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  env = dict(os.environ, XLA_FLAGS=' '.join([*flags, '--xla_force_host_platform_device_count=2']))
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path / f'{i}')],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  results = [json.loads((tmp_path / f'{i}').read_text()) for i in range(2)]
  for r in results:
    assert r['metrics'] == one
  # Each process reads its 6 rows of every 12-row global batch (2 processes x 2 devices); the
  # last batch wraps around to the first items.
  for name, n in (('retrieval', 40), ('zero_shot', 64)):
    rows = [r['read'][name] for r in results]
    assert len(rows[0]) == len(rows[1]) == -(-n // 12) * 6
    full = n // 12 * 6
    assert set(rows[0][:full]).isdisjoint(rows[1][:full])
    assert set(rows[0] + rows[1]) == set(range(n))


def _one_of_two_processes(process_id, port, out):
  os.environ.update(ZOO_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', ZOO_NUM_PROCESSES='2',
                    ZOO_PROCESS_ID=process_id)
  from zoo import sharding
  sharding.maybe_initialize_distributed()
  read, current, examples = {}, [], embedding.SplitReader.examples

  def recording(self, indices):
    current.extend(int(i) for i in indices)
    return examples(self, indices)

  def done(name):
    read[name] = list(current)
    current.clear()

  embedding.SplitReader.examples = recording
  metrics = run_evaluators(jax.make_mesh((4, 1, 1), ('data', 'fsdp', 'tensor')), done)
  with open(out, 'w') as f:
    json.dump({'metrics': metrics, 'read': read}, f)


if __name__ == '__main__':
  _one_of_two_processes(*sys.argv[1:])


def test_eval_data_reads_another_builder_config_without_touching_the_run():
  data_cfg = data_config()
  other = retrieval.eval_data(data_cfg, 'tiny32')
  assert other.builder_config == 'tiny32'
  assert data_cfg.builder_config != 'tiny32'
  assert other.text.to_dict() == data_cfg.text.to_dict()
  assert retrieval.eval_data(data_cfg, '') is data_cfg
