"""Tests for the digits TFDS builder, `data.build` and the input pipeline in `data.pipeline`."""

import json
import os
import shutil
import subprocess
import sys

from array_record.python import array_record_module
from etils import epath
import ml_collections
import numpy as np
import PIL.Image
import pytest
from sklearn.datasets import load_digits
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from data import build as build_lib
from data import pipeline
from data.digits import digits_dataset_builder as digits_lib

TINY_COLORS = np.random.default_rng(7).integers(0, 256, (20, 3), dtype=np.uint8)


class TinyRgb(tfds.core.GeneratorBasedBuilder):
  """20 constant-colour 8x8 RGB images (3 classes): a stand-in for a user's TFDS dataset."""

  VERSION = tfds.core.Version('1.0.0')

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)  # See digits_dataset_builder.Builder.code_path.

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)),
        'label': tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, color in enumerate(TINY_COLORS):
      img = np.broadcast_to(color, (8, 8, 3)).copy()
      # A PIL image, not an array: TFDS encodes arrays to PNG with TensorFlow.
      yield i, {'image': PIL.Image.fromarray(img), 'label': i % 3}


def _cfg(name='digits', data_dir=None, resolution=16, label_key='label', builder_config='',
         image_key='image'):
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=data_dir, resolution=resolution, image_key=image_key,
      label_key=label_key, builder_config=builder_config, train_split='train', eval_split='test',
      features=()))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tfds'))
  build_lib.build('digits', d)
  return d


def _canonical_records(path: str) -> list[bytes]:
  # TFDS serialises protobuf maps in a per-process order, so the file bytes may differ
  # between builds; re-serialising deterministically compares the stored content exactly.
  reader = array_record_module.ArrayRecordReader(path)
  records = reader.read_all()
  reader.close()
  return [tf_example_pb2.Example.FromString(r).SerializeToString(deterministic=True) for r in records]


def _split_examples(data_dir, config, split):
  source = tfds.data_source(f'digits/{config}', data_dir=data_dir, split=split)
  return [source[i] for i in range(len(source))]


@pytest.mark.parametrize('res', [16, 32])
def test_digits_splits_hold_the_upsampled_sklearn_digits(data_dir, res):
  digits = load_digits()
  indices = digits_lib.split_indices()
  assert np.intersect1d(indices['train'], indices['test']).size == 0
  for split, size in [('train', 1500), ('test', 297)]:
    examples = _split_examples(data_dir, f'res{res}', split)
    assert len(examples) == size == len(indices[split])
    got = sorted((int(e['label']), e['image'].tobytes()) for e in examples)
    want = sorted((int(digits.target[i]), digits_lib.to_uint8_image(digits.images[i], res).tobytes())
                  for i in indices[split])
    assert got == want
    assert examples[0]['image'].shape == (res, res, 1) and examples[0]['image'].dtype == np.uint8
    assert {int(e['label']) for e in examples} == set(range(10))
  assert digits_lib.to_uint8_image(np.full((8, 8), 16), res).min() == 255


def test_digits_rebuild_is_identical(data_dir, tmp_path):
  build_lib.build('digits', str(tmp_path), ['res16'])
  a, b = epath.Path(data_dir) / 'digits/res16/1.0.0', tmp_path / 'digits/res16/1.0.0'
  for name in ['dataset_info.json', 'features.json']:
    assert (a / name).read_text() == (b / name).read_text()
  for split in ['train', 'test']:
    shard = f'digits-{split}.array_record-00000-of-00001'
    assert _canonical_records(str(a / shard)) == _canonical_records(str(b / shard))


def test_build_cli_reports_prepared_dirs_and_rejects_bad_config(data_dir, capsys):
  build_lib.main(['digits', '--data_dir', data_dir, '--config', 'res16'])
  assert capsys.readouterr().out.strip() == os.path.join(data_dir, 'digits', 'res16', '1.0.0')
  with pytest.raises(SystemExit):
    build_lib.main(['digits', '--data_dir', data_dir, '--config', 'res99'])


def test_data_dir_defaults_to_env_then_cache(monkeypatch):
  monkeypatch.setenv(pipeline.DATA_DIR_ENV, '/some/dir')
  assert pipeline.resolve_data_dir(None) == '/some/dir'
  assert pipeline.resolve_data_dir('/explicit') == '/explicit'
  monkeypatch.delenv(pipeline.DATA_DIR_ENV)
  assert pipeline.resolve_data_dir(None) == os.path.expanduser('~/.cache/zoo/tensorflow_datasets')


def test_resize_square_crops_the_center_and_keeps_orientation_and_channels():
  img_6x10x2 = np.zeros((6, 10, 2), np.uint8)
  img_6x10x2[:, :2, 0] = img_6x10x2[:, 8:, 0] = 255  # Outside the central 6x6 crop.
  img_6x10x2[:, 2:5, 0], img_6x10x2[:, 5:8, 0], img_6x10x2[..., 1] = 200, 50, 100
  out = pipeline.resize_square(img_6x10x2, 12)
  assert out.shape == (12, 12, 2) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 1], 100.0, atol=1e-3)
  np.testing.assert_allclose(out[:, :2, 0], 200.0, atol=1e-3)
  np.testing.assert_allclose(out[:, -2:, 0], 50.0, atol=1e-3)
  np.testing.assert_array_equal(out, np.broadcast_to(out[:1], out.shape))
  np.testing.assert_array_equal(pipeline.resize_square(img_6x10x2, 6), img_6x10x2[:, 2:8])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize('res,builder_config', [(16, ''), (24, ''), (16, 'res32')])
def test_batches_shapes_dtypes_range(data_dir, res, builder_config):
  it = pipeline.get_dataset(_cfg(data_dir=data_dir, resolution=res, builder_config=builder_config),
                            split='train', seed=0, global_batch_size=64)
  batch = next(it)
  assert it.spec() == {'image': ((64, res, res, 1), np.float32), 'label': ((64,), np.int32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == it.spec()
  assert batch['image'].min() == -1.0 and batch['image'].max() == 1.0
  assert batch['label'].min() >= 0 and batch['label'].max() <= 9


def test_native_resolution_batches_are_the_stored_pixels_rescaled(data_dir):
  it = pipeline.get_dataset(_cfg(data_dir=data_dir), split='test', seed=3, global_batch_size=99,
                            repeat=False)
  got = np.concatenate([b['image'] for b in it])
  want = np.stack([e['image'] for e in _split_examples(data_dir, 'res16', 'test')])
  np.testing.assert_allclose(np.sort(got.reshape(297, -1), axis=0),
                             np.sort(want.reshape(297, -1) / 127.5 - 1.0, axis=0), atol=1e-6)


def test_no_label_key_gives_images_only(data_dir):
  it = pipeline.get_dataset(_cfg(data_dir=data_dir, label_key=''), split='train', seed=0,
                            global_batch_size=4)
  assert set(next(it)) == {'image'} and set(it.spec()) == {'image'}


def test_same_seed_same_order_other_seed_other_order(data_dir):
  def first(seed):
    return _take(pipeline.get_dataset(_cfg(data_dir=data_dir), split='train', seed=seed,
                                      global_batch_size=32), 3)
  _assert_batches_equal(first(1), first(1))
  assert not np.array_equal(first(1)[0]['image'], first(2)[0]['image'])


def test_each_epoch_is_a_new_permutation_of_the_split(data_dir):
  it = pipeline.get_dataset(_cfg(data_dir=data_dir), split='train', seed=0, global_batch_size=100)
  epochs = [np.concatenate([b['image'] for b in _take(it, 15)]).reshape(1500, -1) for _ in range(2)]
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(np.unique(epochs[0], axis=0), np.unique(epochs[1], axis=0))
  want = np.stack([e['image'] for e in _split_examples(data_dir, 'res16', 'train')])
  np.testing.assert_allclose(np.sort(epochs[0], axis=0),
                             np.sort(want.reshape(1500, -1) / 127.5 - 1.0, axis=0), atol=1e-6)


def test_one_pass_drops_the_partial_batch_and_stops(data_dir):
  it = pipeline.get_dataset(_cfg(data_dir=data_dir), split='train', seed=0, global_batch_size=128,
                            repeat=False)
  batches = list(it)
  assert it.num_batches == len(batches) == 1500 // 128
  assert np.unique(np.concatenate([b['image'] for b in batches]).reshape(-1, 256), axis=0).shape[0] > 1300


@pytest.mark.parametrize('prefetch', [0, 2])
def test_resume_from_state_equals_uninterrupted(data_dir, prefetch):
  def fresh():
    return pipeline.get_dataset(_cfg(data_dir=data_dir), split='train', seed=5, global_batch_size=64,
                                prefetch=prefetch)
  uninterrupted = _take(fresh(), 30)
  it = fresh()
  _take(it, 20)
  state = json.loads(json.dumps(it.get_state()))
  resumed = fresh()
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 10), uninterrupted[20:])


def test_two_processes_concatenate_to_the_global_batch(data_dir):
  def stream(p, count):
    it = pipeline.get_dataset(_cfg(data_dir=data_dir), split='train', seed=0, global_batch_size=8,
                              process_index=p, process_count=count)
    it.set_state({'next_batch': 186})  # Batch 187 straddles the first epoch boundary (1500 / 8).
    return it
  single, procs = stream(0, 1), [stream(0, 2), stream(1, 2)]
  assert procs[1].spec()['image'][0] == (4, 16, 16, 1)
  for _ in range(3):
    parts = [next(p) for p in procs]
    want = next(single)
    for k in want:
      np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), want[k])


def test_two_process_one_pass_yields_equal_batch_counts(data_dir):
  counts = [len(list(pipeline.get_dataset(
      _cfg(data_dir=data_dir), split='test', seed=0, global_batch_size=40, process_index=p,
      process_count=2, repeat=False))) for p in range(2)]
  assert counts == [297 // 40] * 2


def test_tfds_name_loads_a_prepared_dataset_resized(tmp_path):
  TinyRgb(data_dir=str(tmp_path)).download_and_prepare(file_format='array_record')
  it = pipeline.get_dataset(_cfg(name='tfds:tiny_rgb', data_dir=str(tmp_path), resolution=16),
                            split='train', seed=0, global_batch_size=20, repeat=False)
  batch = next(it)
  assert batch['image'].shape == (20, 16, 16, 3) and batch['label'].dtype == np.int32
  # Constant colours survive bicubic resizing exactly, so each image is its colour rescaled.
  colors = batch['image'][:, 0, 0, :]
  np.testing.assert_allclose(batch['image'], np.broadcast_to(colors[:, None, None, :], (20, 16, 16, 3)),
                             atol=1e-5)
  got = sorted(map(tuple, np.round((colors + 1.0) * 127.5).astype(int).tolist()))
  assert got == sorted(map(tuple, TINY_COLORS.astype(int).tolist()))


def test_package_exports_the_pipeline():
  import data  # pylint: disable=g-import-not-at-top
  assert data.get_dataset is pipeline.get_dataset and data.check_config is pipeline.check_config


def test_tfds_name_loads_from_files_in_a_process_without_the_builder_code(tmp_path):
  TinyRgb(data_dir=str(tmp_path)).download_and_prepare(file_format='array_record')
  code = (
      'import json, ml_collections\n'
      'from data import pipeline\n'
      f'cfg = ml_collections.ConfigDict({json.dumps(_cfg(name="tfds:tiny_rgb", data_dir=str(tmp_path)).to_dict())})\n'
      'batch = next(pipeline.get_dataset(cfg, split="train", seed=4, global_batch_size=6))\n'
      'print(json.dumps([batch["label"].tolist(), batch["image"][:, 0, 0].tolist()]))\n'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True).stdout
  labels, colors = json.loads(out.strip().splitlines()[-1])
  batch = next(pipeline.get_dataset(_cfg(name='tfds:tiny_rgb', data_dir=str(tmp_path)),
                                    split='train', seed=4, global_batch_size=6))
  assert labels == batch['label'].tolist()
  np.testing.assert_allclose(colors, batch['image'][:, 0, 0], atol=1e-6)


def test_unknown_name_raises_listing_builtins():
  with pytest.raises(ValueError, match=r"'digits'.*tfds:<name>"):
    pipeline.get_dataset(_cfg(name='mnistt'), split='train', seed=0, global_batch_size=8)


@pytest.mark.parametrize('override,match', [
    (dict(name='tfds:'), 'data.name'), (dict(builder_config='res99'), r"res99.*\['res16', 'res32'\]"),
    (dict(resolution=0), 'data.resolution'), (dict(image_key=''), 'data.image_key')])
def test_check_config_rejects_bad_values_without_touching_files(tmp_path, override, match):
  with pytest.raises(ValueError, match=match):
    pipeline.check_config(_cfg(**dict(dict(data_dir=str(tmp_path)), **override)))
  assert not list(tmp_path.iterdir())
  pipeline.check_config(_cfg(name='tfds:anything/cfg', data_dir=str(tmp_path)))


@pytest.mark.parametrize('name', ['tfds:tiny_rgb', 'tfds:no_such_dataset_anywhere'])
def test_unprepared_tfds_dataset_raises_without_downloading(tmp_path, name):
  with pytest.raises(FileNotFoundError, match=name[len('tfds:'):]) as e:
    pipeline.get_dataset(_cfg(name=name, data_dir=str(tmp_path)), split='train', seed=0,
                         global_batch_size=8)
  assert str(tmp_path) in str(e.value)
  assert not list(tmp_path.iterdir())


def test_bad_batch_size_and_bad_state_raise(data_dir):
  with pytest.raises(ValueError, match='process_count=3'):
    pipeline.get_dataset(_cfg(data_dir=data_dir), split='train', seed=0, global_batch_size=10,
                         process_count=3)
  with pytest.raises(ValueError, match='global_batch_size=400'):
    pipeline.get_dataset(_cfg(data_dir=data_dir), split='test', seed=0, global_batch_size=400,
                         repeat=False)
  it = pipeline.get_dataset(_cfg(data_dir=data_dir), split='train', seed=0, global_batch_size=8)
  with pytest.raises(ValueError, match='next_batch'):
    it.set_state({'step': 3})
  with pytest.raises(ValueError, match='res99'):
    pipeline.get_dataset(_cfg(data_dir=data_dir, builder_config='res99'), split='train', seed=0,
                         global_batch_size=8)


def test_corrupt_records_raise_naming_the_dataset(data_dir, tmp_path):
  shutil.copytree(os.path.join(data_dir, 'digits', 'res16'), tmp_path / 'digits' / 'res16')
  shard = tmp_path / 'digits/res16/1.0.0/digits-test.array_record-00000-of-00001'
  raw = bytearray(shard.read_bytes())
  for i in range(1024, len(raw) // 2, 7):
    raw[i] ^= 0x5A
  shard.write_bytes(bytes(raw))
  it = pipeline.get_dataset(_cfg(data_dir=str(tmp_path)), split='test', seed=0, global_batch_size=99,
                            repeat=False, prefetch=0)
  with pytest.raises(RuntimeError, match=r"digits/res16.*'test'") as e:
    list(it)
  assert str(tmp_path) in str(e.value)
