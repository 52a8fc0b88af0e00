"""Semantic search: sharded top-k, the index on disk and its errors, `zoo index` / `zoo search`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from zoo import embedding
from zoo import search


def unit_rows(n, e, seed=0):
  x = np.random.default_rng(seed).standard_normal((n, e)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_top_k(index_NxE, queries_QxE, k):
  scores_QxN = queries_QxE.astype(np.float64) @ index_NxE.T.astype(np.float64)
  ids = np.argsort(-scores_QxN, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(scores_QxN, ids, axis=1), ids


@pytest.mark.parametrize('n,k', [(37, 5), (5, 3), (100, 20), (4, 9)])
def test_sharded_top_k_equals_unsharded(n, k):
  index, queries = unit_rows(n, 16), unit_rows(3, 16, seed=1)
  eight, one = search.items_mesh(), search.items_mesh(jax.devices()[:1])
  assert eight.size == 8
  placed = search.place(index, eight)
  assert placed.shape[0] % 8 == 0 and len(placed.addressable_shards) == 8
  assert placed.addressable_shards[1].data.shape[0] == placed.shape[0] // 8  # Really split.
  s8, i8 = search.top_k(placed, n, queries, k, eight)
  s1, i1 = search.top_k(search.place(index, one), n, queries, k, one)
  ref_s, ref_i = reference_top_k(index, queries, min(k, n))
  assert i8.shape == (3, min(k, n))
  np.testing.assert_array_equal(i8, i1)
  np.testing.assert_array_equal(i8, ref_i)
  np.testing.assert_allclose(s8, ref_s, atol=1e-6)
  np.testing.assert_allclose(s8, s1, atol=1e-6)  # Matmul blocking may differ in the last bit.


def test_ties_go_to_the_lower_id_across_shards():
  index = np.zeros((16, 4), np.float32)
  index[[3, 9, 14], 0] = 1.0  # Equal best scores on shards 1, 4 and 7 of 8.
  mesh = search.items_mesh()
  _, ids = search.top_k(search.place(index, mesh), 16, np.eye(4, dtype=np.float32)[:1], 3, mesh)
  np.testing.assert_array_equal(ids, [[3, 9, 14]])


def test_k_must_be_positive():
  mesh = search.items_mesh()
  for k in (0, -1):
    with pytest.raises(ValueError, match='>= 1'):
      search.top_k(search.place(unit_rows(4, 4), mesh), 4, unit_rows(1, 4), k, mesh)


def test_embed_gives_every_item_once_in_order_whatever_the_batch():
  mesh = jax.make_mesh((8, 1, 1), ('data', 'fsdp', 'tensor'))
  assert embedding.global_batch_size(mesh, 5) == 8 and embedding.global_batch_size(mesh, 16) == 16
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  assert embedding.local_rows(batch_sh, 16) == (0, 16)  # One process holds every row.
  items = np.arange(21, dtype=np.float32)
  seen = []

  def load(indices):
    seen.append(np.asarray(indices))
    return {'x': items[indices][:, None]}

  fn = jax.jit(lambda p, b: {'y': b['x'] * p, 'sum': jnp.broadcast_to(b['x'].sum(), (8,))})
  out = embedding.embed(fn, jnp.float32(2.0), load, 21, 5, mesh)
  np.testing.assert_array_equal(out['y'][:, 0], 2 * items)
  assert [len(s) for s in seen] == [8, 8, 8]
  np.testing.assert_array_equal(seen[-1], [16, 17, 18, 19, 20, 0, 1, 2])  # Wraps around.
  with pytest.raises(ValueError, match='nothing to embed'):
    embedding.embed(fn, jnp.float32(2.0), load, 0, 5, mesh)


def manifest(n):
  return {'workdir': '/nowhere', 'step': 3, 'use_ema': True, 'fingerprint': 'f' * 64,
          'resolution': 32, 'source': {'kind': 'images', 'dir': '/nowhere'},
          'items': [{'id': f'{i}.png', 'path': f'/nowhere/{i}.png'} for i in range(n)]}


def test_index_round_trip_is_atomic_and_checked(tmp_path):
  emb = unit_rows(6, 8)
  out = search.write_index(tmp_path / 'idx', emb, manifest(6))
  index = search.load_index(out)
  np.testing.assert_array_equal(index.embeddings_NxE, emb)
  assert index.manifest['count'] == 6 and index.manifest['dim'] == 8
  assert sorted(os.listdir(tmp_path)) == ['idx']  # No temporary directory left behind.
  with pytest.raises(FileExistsError, match='--overwrite'):
    search.write_index(tmp_path / 'idx', emb, manifest(6))
  search.write_index(tmp_path / 'idx', emb[:2], manifest(2), overwrite=True)
  assert search.load_index(out).manifest['count'] == 2 and sorted(os.listdir(tmp_path)) == ['idx']


def test_missing_or_corrupt_indexes_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='not found'):
    search.load_index(str(tmp_path / 'nope'))
  path = search.write_index(tmp_path / 'idx', unit_rows(4, 8), manifest(4))
  emb_path = os.path.join(path, search.EMBEDDINGS_FILE)
  with open(emb_path, 'r+b') as f:  # Flip one byte of the data.
    f.seek(-1, os.SEEK_END)
    last = f.read(1)
    f.seek(-1, os.SEEK_END)
    f.write(bytes([last[0] ^ 1]))
  with pytest.raises(ValueError, match='corrupt'):
    search.load_index(path)
  man_path = os.path.join(path, search.MANIFEST_FILE)
  with open(man_path, 'w') as f:
    f.write('{"format": ')
  with pytest.raises(ValueError, match='corrupt'):
    search.load_index(path)
  with open(man_path, 'w') as f:
    json.dump({'format': 'something-else'}, f)
  with pytest.raises(ValueError, match='not a zoo-index/1 manifest'):
    search.load_index(path)
  os.remove(emb_path)
  with pytest.raises(FileNotFoundError, match='embeddings.safetensors is missing'):
    search.load_index(path)


def test_dataset_specs_and_image_files(tmp_path):
  assert embedding.parse_dataset('shapes:test') == ('shapes', '', 'test')
  assert embedding.parse_dataset('shapes/tiny32:held_out') == ('shapes', 'tiny32', 'held_out')
  assert embedding.parse_dataset('tfds:coco/2017:validation') == ('tfds:coco/2017', '', 'validation')
  for bad in ('shapes', 'shapes:', ':test', 'tfds::test'):
    with pytest.raises(ValueError, match='name\\[/config\\]:split'):
      embedding.parse_dataset(bad)
  with pytest.raises(FileNotFoundError, match='no PNG or JPEG'):
    embedding.list_images(str(tmp_path))
  (tmp_path / 'sub').mkdir()
  Image.fromarray(np.full((40, 60, 3), 255, np.uint8)).save(tmp_path / 'sub' / 'b.PNG')
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / 'a.jpg')
  (tmp_path / 'notes.txt').write_text('not an image')
  assert embedding.list_images(str(tmp_path)) == ['a.jpg', os.path.join('sub', 'b.PNG')]
  img = embedding.load_image(str(tmp_path / 'sub' / 'b.PNG'), 32, 3)
  assert img.shape == (32, 32, 3) and np.allclose(img, 1.0)
  assert embedding.load_image(str(tmp_path / 'a.jpg'), 16, 3).min() == -1.0
  with pytest.raises(ValueError, match='cannot read image'):
    embedding.load_image(str(tmp_path / 'notes.txt'), 32, 3)


# ---------------------------------------------------------------------------------------------
# End to end: a tiny CLIP run, its evaluators, `zoo index` and `zoo search`.

def clip_config(steps=8):
  """A tiny CLIP on one-object shapes scenes, with both embedding evaluators at the end."""
  from zoo import config as zoo_config
  from zoo import models
  from zoo import sharding
  config = zoo_config.ConfigDict()
  config.seed = 0
  config.data = zoo_config.ConfigDict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key='',
      builder_config='tinysingle32', train_split='train', eval_split='validation', features=()))
  config.data.text = zoo_config.ConfigDict(dict(caption_key='captions', tokenizer='shapes',
                                                tokenizer_path='', max_len=32))
  config.model = models.config('dual_encoder', preset='clip-tiny')
  config.task = zoo_config.ConfigDict(dict(name='contrastive', loss='softmax', chunked=False,
                                           image_from='', image_subtree='', lock_image=False))
  config.train = zoo_config.ConfigDict(dict(
      steps=steps, batch_size=16, grad_accum=1, log_every=steps, checkpoint_every=steps,
      eval_every=0, max_to_keep=1, async_checkpointing=False, progress_bar=False))
  config.optim = zoo_config.ConfigDict(dict(
      name='adamw', lr=3e-3, schedule='constant', warmup_steps=0, end_lr_factor=1.0, b1=0.9,
      b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0, ema_decay=0.9))
  config.evals = zoo_config.ConfigDict({
      'zero_shot': dict(type='zero_shot', split='held_out', builder_config='tinysingle32',
                        num_examples=0, batch_size=32,
                        use_ema=True, label_key='shape_colour', classes=(),
                        templates=('one shape: a {colour} {shape}.',
                                   'a picture of a {colour} {shape}.')),
      'retrieval': dict(type='retrieval', split='validation', builder_config='',
                        num_examples=48, max_captions=4, batch_size=32, use_ema=True)})
  # One device trains fastest on CPU; `zoo index` / `zoo search` then use all eight.
  config.mesh = zoo_config.ConfigDict(dict(data=1, fsdp=1, tensor=1))
  config.sharding_rules = zoo_config.ConfigDict(sharding.DEFAULT_RULES)
  config.init_from = ''
  return zoo_config.validate(config)


@pytest.fixture(scope='module')
def clip_run(tmp_path_factory):
  from zoo import train
  workdir = str(tmp_path_factory.mktemp('clip'))
  train.train_and_evaluate(clip_config(), workdir)
  return workdir


def zoo_cli(*args):
  """(exit code, stdout, stderr) of `zoo ARGS`, run in this process."""
  import contextlib
  import io
  from zoo import main
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main.main([str(a) for a in args])
  return code, out.getvalue(), err.getvalue()


def test_training_runs_both_evaluators(clip_run):
  from zoo import metrics
  last = {}
  for row in metrics.read_jsonl(os.path.join(clip_run, 'metrics.jsonl')):
    last |= row
  assert last['zero_shot/examples'] == 64 and last['retrieval/captions'] == 4 * 48
  assert 0.0 <= last['zero_shot/accuracy_unseen'] <= last['zero_shot/top5_accuracy'] <= 1.0
  assert last['retrieval/t2i_recall@1'] <= last['retrieval/t2i_recall@10']


def test_index_and_search_a_dataset_split(clip_run, tmp_path):
  index = tmp_path / 'index'
  code, out, err = zoo_cli('index', '--workdir', clip_run, '--dataset', 'shapes:test',
                           '--out', index, '--batch-size', 16)
  assert code == 0, err
  manifest = json.loads((index / 'manifest.json').read_text())
  assert manifest['count'] == 64 and manifest['step'] == 8 and manifest['source']['split'] == 'test'
  assert manifest['source']['data']['builder_config'] == 'tinysingle32'  # The run's shapes.
  assert manifest['items'][5]['id'] == 'test/5' and manifest['items'][5]['caption']
  code, out, err = zoo_cli('search', index, 'one shape: a red circle.', '-k', 3, '--json',
                           '--out', tmp_path / 'top.png')
  assert code == 0, err
  results = json.loads(out)
  assert [r['rank'] for r in results] == [1, 2, 3]
  assert results[0]['score'] >= results[1]['score'] >= results[2]['score']
  # The scores are the index rows' cosine similarities with the query's text embedding.
  from zoo import runs
  _, s, state = runs.load(clip_run)
  tokens, mask = s.task.tokenizer.encode(['one shape: a red circle.'], s.task.max_len)
  query = np.asarray(s.task.predict['encode_text'](state['ema_params'], tokens, mask))[0]
  emb = search.load_index(str(index)).embeddings_NxE
  best = np.argsort(-(emb @ query), kind='stable')[:3]
  assert [r['id'] for r in results] == [f'test/{i}' for i in best]
  np.testing.assert_allclose([r['score'] for r in results], (emb @ query)[best], atol=1e-5)
  sheet = np.asarray(Image.open(tmp_path / 'top.png'))
  assert sheet.shape == (4 * (32 + 2), 4 * (3 * 33 + 1), 3)  # Upscaled 4x to ~128 px.
  code, out, _ = zoo_cli('search', index, 'a red circle.', '-k', 2)
  assert code == 0 and out.splitlines()[0].split()[:1] == ['1'] and len(out.splitlines()) == 2


def test_index_image_files_and_search_by_image(clip_run, tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  reader = embedding.SplitReader(clip_config().data, 'test')
  for i, ex in enumerate(reader.examples(range(5))):
    Image.fromarray(ex['image']).resize((48, 48)).save(images / f'{i}.png')
  index = tmp_path / 'files'
  assert zoo_cli('index', '--workdir', clip_run, '--images', images, '--out', index)[0] == 0
  code, out, err = zoo_cli('search', index, '--image', images / '3.png', '-k', 1, '--json')
  assert code == 0, err
  assert json.loads(out)[0]['id'] == '3.png' and json.loads(out)[0]['score'] > 0.999


def test_search_errors_are_clear(clip_run, tmp_path):
  code, _, err = zoo_cli('search', tmp_path / 'missing', 'a red circle.')
  assert code == 2 and 'not found' in err and 'zoo index' in err
  index = tmp_path / 'index'
  assert zoo_cli('index', '--workdir', clip_run, '--dataset', 'shapes/tinysingle32:held_out',
                 '--out', index)[0] == 0
  code, _, err = zoo_cli('search', index, 'a red circle.', '-k', 0)
  assert code == 2 and '-k 0 must be an integer >= 1' in err
  code, _, err = zoo_cli('index', '--workdir', clip_run, '--dataset', 'shapes:nosuch',
                         '--out', tmp_path / 'x')
  assert code == 2 and "split 'nosuch'" in err
  # An index whose fingerprint is not the run's params: made by another model.
  manifest = json.loads((index / 'manifest.json').read_text())
  manifest['fingerprint'] = '0' * 64
  (index / 'manifest.json').write_text(json.dumps(manifest))
  code, _, err = zoo_cli('search', index, 'a red circle.')
  assert code == 2 and 'made by another model' in err


def test_dual_encoder_notebook_explores_the_test_run(clip_run, tmp_path, monkeypatch):
  """colab/dual_encoder.ipynb in a kernel, on this module's run (it trains none then)."""
  import test_colab
  test_colab.execute('dual_encoder.ipynb', tmp_path, monkeypatch, ZOO_CLIP_WORKDIR=clip_run)


def test_printed_results_start_their_captions_in_one_column():
  results = [dict(rank=r, score=s, id=i, caption=c) for r, s, i, c in (
      (1, 0.8563, 'test/4', 'A large purple cross.'), (2, -0.1, 'test/159', 'A blue star.'),
      (10, 0.25, 'test/9', 'A red circle.'))]
  lines = search.format_results(results).splitlines()
  assert [line.index('A ') for line in lines] == [lines[1].index('test/159') + 10] * 3
  assert lines[2].startswith(' 10  +0.2500  test/9 ')
  assert search.format_results([dict(rank=1, score=0.5, id='a.png')]) == '  1  +0.5000  a.png'


def test_composition_study_agrees_with_the_zero_shot_evaluator(clip_run, tmp_path):
  from data.shapes import grammar
  from zoo import config as zoo_config
  from zoo import metrics
  from zoo.bench import composition
  last = {}
  for row in metrics.read_jsonl(os.path.join(clip_run, 'metrics.jsonl')):
    last |= row
  out = tmp_path / 'composition.json'
  result = composition.main(['--workdir', clip_run, '--num', '0', '--out', str(out)])
  assert json.loads(out.read_text()) == result
  pairs = result['pairs']
  assert sorted(p['pair'] for p in pairs) == sorted(
      f'{c} {s}' for s, c in grammar.HELD_OUT_PAIRS)
  assert sum(p['images'] for p in pairs) == 64
  # The same params, prompts and classes as the evaluator that ran at the end of training.
  assert result['accuracy_unseen'] == pytest.approx(last['zero_shot/accuracy_unseen'], abs=1e-6)
  assert result['accuracy_unseen'] == pytest.approx(
      sum(p['accuracy'] * p['images'] for p in pairs) / 64)
  for p in pairs:
    assert p['accuracy'] + p['instead_share'] <= 1.0 and (p['instead'] == '') == (
        p['accuracy'] == 1.0) and p['instead'] != p['pair']
  assert all(0.0 <= v <= 1.0 for acc in result['probe'].values() for v in acc.values())
  config = zoo_config.load(os.path.join(clip_run, 'config.json'))
  del config.evals['zero_shot']
  with pytest.raises(ValueError, match=r"no zero_shot evaluator over 'shape_colour'.*retrieval"):
    composition._zero_shot_config(config)  # pylint: disable=protected-access
