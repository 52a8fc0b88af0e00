"""`data.mixture`: several builder configs of one dataset interleaved by weight."""

import json
import os

import ml_collections
import numpy as np
import pytest

from data import pipeline
from zoo import config as zoo_config

from conftest import REPO

MIX = 'tiny32:3,tinysingle32:1'


def _cfg(mixture=MIX, builder_config='', name='shapes', resolution=32):
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=None, resolution=resolution, image_key='image',
      label_key='shape_colour', builder_config=builder_config, train_split='train',
      eval_split='validation', features=(), mixture=mixture))


def _stream(seed=0, batch=32, **kw):
  return pipeline.get_dataset(_cfg(), split='train', seed=seed, global_batch_size=batch, **kw)


@pytest.fixture(scope='module')
def single_images():
  """Bytes of every tinysingle32 train image: tells which config a mixed example came from."""
  it = pipeline.get_dataset(_cfg(mixture='', builder_config='tinysingle32'), split='train',
                            seed=0, global_batch_size=512, repeat=False)
  return {img.tobytes() for img in next(it)['image']}


def test_mixture_draws_each_config_in_proportion_and_reshuffles(single_images):
  it = _stream()
  batches = [next(it) for _ in range(24)]  # 768 examples: 1.5 epochs of tiny32's 512.
  from_single = np.array([[img.tobytes() in single_images for img in b['image']]
                          for b in batches])
  np.testing.assert_allclose(from_single.mean(), 0.25, atol=0.03)
  assert 0 < from_single.sum(1).min() and from_single.sum(1).max() < 32
  assert {k: v.shape for k, v in batches[0].items()} == {'image': (32, 32, 32, 3),
                                                         'label': (32,)}
  # tinysingle32's 512 images fill 0.25 * 768 = 192 slots: no repeat within the first epoch.
  seen = [img.tobytes() for b, mask in zip(batches, from_single)
          for img, s in zip(b['image'], mask) if s]
  assert len(set(seen)) == len(seen)
  other = next(_stream(seed=1))
  assert not np.array_equal(other['image'], batches[0]['image'])


def test_mixture_resumes_exactly_and_splits_across_processes():
  uninterrupted = [next(it) for it in [_stream()] for _ in range(6)]
  resumed = _stream(prefetch=2)
  resumed.set_state(json.loads(json.dumps({'next_batch': 4})))
  for want in uninterrupted[4:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  procs = [_stream(process_index=p, process_count=2) for p in range(2)]
  for p in procs:
    p.set_state({'next_batch': 4})
  parts = [next(p) for p in procs]
  np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]),
                                uninterrupted[4]['image'])


def test_mixture_one_pass_is_finite():
  it = pipeline.get_dataset(_cfg(), split='validation', seed=0, global_batch_size=16,
                            repeat=False)
  batches = list(it)
  assert it.num_batches == len(batches) > 0


@pytest.mark.parametrize('overrides,match', [
    (dict(mixture='tiny32:3,nosuch:1'), r"'nosuch' is not a config of 'shapes'; allowed"),
    (dict(mixture='tiny32:x'), r"weight 'x' of 'tiny32' is not a number"),
    (dict(mixture='tiny32:0,tinysingle32:1'), 'positive weight'),
    (dict(mixture='tiny32,tiny32'), 'names a builder config twice'),
    (dict(builder_config='res32'), r"data.builder_config='res32' are both set"),
])
def test_bad_mixtures_are_named_before_reading(overrides, match):
  with pytest.raises(ValueError, match=match):
    pipeline.check_config(_cfg(**overrides))


def test_configs_with_other_features_are_refused():
  data = _cfg(mixture='res16:1,res32:1', name='digits', resolution=16)
  data.label_key = 'label'
  pipeline.check_config(data)
  with pytest.raises(ValueError, match="have different features"):
    pipeline.get_dataset(data, split='train', seed=0, global_batch_size=8)


def test_mixture_is_an_optional_typed_key_of_config_data():
  config = zoo_config.load(os.path.join(REPO, 'experiments', 'clip_shapes.py:smoke=True'))
  data = config.data.to_dict() | dict(builder_config='')
  config.data = ml_collections.ConfigDict(data | dict(mixture='tiny32:1,tinysingle32:1'))
  zoo_config.validate(config)
  config.data = ml_collections.ConfigDict(data | dict(mixture=3))
  with pytest.raises(ValueError, match=r'config.data.mixture must be str'):
    zoo_config.validate(config)
