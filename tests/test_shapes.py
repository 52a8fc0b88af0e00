"""The shapes dataset: determinism, maps vs pixels, held-out split, caption noise, scorer, pipeline.

Captions and questions are checked in test_shapes_language.py.
"""

import json
import os
import subprocess
import sys

import dataclasses
from etils import epath
import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest

from data import pipeline
from data.shapes import generate
from data.shapes import geometry
from data.shapes import grammar
from data.shapes import measure
from data.shapes import pose
from data.shapes import questions
from data.shapes import render
from data.shapes import score as score_lib
from data.shapes import shapes_dataset_builder as builder_lib
from data.shapes import show

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

jax.config.update('jax_numpy_rank_promotion', 'raise')

SIZES = dict(num_train=40, num_validation=8, num_test=24, num_held_out=16)
SPEC = generate.GenSpec(resolution=32, sizes=(40, 8, 24, 16))
MAPS = ('semantic_mask', 'instance_mask', 'depth', 'skeleton')


def _build(data_dir, name='t32', workers=1, **overrides):
  config = builder_lib.ShapesConfig(name=name, resolution=32, **dict(SIZES, **overrides))
  builder = builder_lib.Builder(config=config, data_dir=str(data_dir), num_workers=workers)
  builder.download_and_prepare(file_format='array_record')
  return builder


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  return _build(tmp_path_factory.mktemp('shapes'))


def _decoded(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def _files(builder) -> dict[str, bytes]:
  root = epath.Path(builder.data_dir)
  return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_rebuilds_are_byte_identical_across_processes_and_workers(built, tmp_path, monkeypatch):
  code = ('from data.shapes import shapes_dataset_builder as b\n'
          f'c = b.ShapesConfig(name="t32", resolution=32, **{SIZES!r})\n'
          f'b.Builder(config=c, data_dir={str(tmp_path / "sub")!r}, num_workers=1)'
          '.download_and_prepare(file_format="array_record")\n')
  # Another hash seed changes protobuf's map order: only canonical records survive that.
  env = dict(os.environ, PYTHONHASHSEED='123')
  subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, env=env)
  monkeypatch.setattr(builder_lib, 'MIN_PARALLEL', 1)
  parallel = _build(tmp_path / 'par', workers=2)  # Two spawned workers, any completion order.
  want = _files(built)
  assert any(k.endswith('array_record-00000-of-00001') for k in want)
  assert _files(parallel) == want
  other_process = builder_lib.Builder(config=built.builder_config, data_dir=str(tmp_path / 'sub'))
  assert _files(other_process) == want


def test_tfds_cli_build_writes_the_python_build_bytes(tmp_path):
  """`tfds build data/shapes` (the `tfds` extra) gives what the Python path gives, readable."""
  tfds_cli = os.path.join(os.path.dirname(sys.executable), 'tfds')
  args = [tfds_cli, 'build', os.path.join(REPO, 'data', 'shapes'), '--config', 'tinysingle32',
          '--data_dir', str(tmp_path / 'cli'), '--file_format', 'array_record']
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  subprocess.run(args, check=True, capture_output=True, env=env, cwd=str(tmp_path))
  by_cli = builder_lib.Builder(config='tinysingle32', data_dir=str(tmp_path / 'cli'))
  by_python = builder_lib.Builder(config='tinysingle32', data_dir=str(tmp_path / 'py'))
  by_python.download_and_prepare(file_format='array_record')
  files = _files(by_cli)
  assert sum(k.endswith('-of-00001') for k in files) == len(generate.SPLITS)
  assert {k: v for k, v in files.items() if 'array_record' in k} == {
      k: v for k, v in _files(by_python).items() if 'array_record' in k}
  data_cfg = ml_collections.ConfigDict(dict(
      name='shapes', data_dir=str(tmp_path / 'cli'), resolution=32, image_key='image',
      label_key='shape_colour', builder_config='tinysingle32', train_split='train',
      eval_split='validation', features=()))
  batch = next(iter(pipeline.get_dataset(data_cfg, split='validation', seed=0,
                                         global_batch_size=8)))
  assert batch['image'].shape == (8, 32, 32, 3) and batch['label'].max() < 64


def test_examples_do_not_depend_on_generation_order_or_split_sizes():
  forward = [generate.make_example(SPEC, 'test', i) for i in range(6)]
  bigger = dataclasses.replace(SPEC, sizes=(40, 8, 500, 16))
  backward = [generate.make_example(bigger, 'test', i) for i in reversed(range(6))][::-1]
  for a, b in zip(forward, backward):
    np.testing.assert_array_equal(a['image'], b['image'])
    assert a['captions'] == b['captions'] and a['questions'] == b['questions']
  assert not np.array_equal(forward[0]['image'], forward[1]['image'])
  other_seed = generate.make_example(dataclasses.replace(SPEC, seed=1), 'test', 0)
  assert not np.array_equal(other_seed['image'], forward[0]['image'])


def _as_text(value):
  return value.decode() if isinstance(value, bytes) else value


def test_tfds_records_decode_to_the_generator_examples(built):
  for split in generate.SPLITS:
    decoded = _decoded(built, split)
    assert len(decoded) == SPEC.size(split)
    for i in (0, len(decoded) - 1):
      want, got = generate.make_example(SPEC, split, i), decoded[i]
      for key in ('image', *MAPS, 'pose_keypoints', 'pose_visibility', 'sign_box'):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
      for key in ('captions', 'questions', 'answers'):
        assert [_as_text(s) for s in got[key]] == want[key]
      assert [questions.QUESTION_TYPES[t] for t in got['question_types']] == want['question_types']
      assert _as_text(got['word']) == want['word'] and int(got['label']) == want['label']
      colours = [grammar.COLOUR_NAMES[c] for c in got['objects']['colour']]
      assert colours == want['objects']['colour']
      np.testing.assert_array_equal(np.stack(got['objects']['box']), want['objects']['box'])


def _entities_from_labels(example, r):
  return render.entities(generate.scene_from_example(example), r)


def _check_maps_against_pixels(example, r):
  img, inst, sem, depth = (example[k] for k in ('image', 'instance_mask', 'semantic_mask', 'depth'))
  objs = example['objects']
  for k, (shape, colour, d) in enumerate(zip(objs['shape'], objs['colour'], objs['depth'])):
    mine = inst == k + 1
    assert mine.sum() > 0
    assert (img[mine] == grammar.COLOURS[colour]).all()  # Exact: nothing is anti-aliased.
    assert (sem[mine] == 1 + grammar.SHAPES.index(shape)).all() and (depth[mine] == d).all()
  bg = inst == 0
  assert (img[bg][:, 0] == img[bg][:, 1]).all() and (img[bg][:, 1] == img[bg][:, 2]).all()
  assert img[bg].min() >= grammar.GREY_RANGE[0] and img[bg].max() <= grammar.GREY_RANGE[1]
  assert (sem[bg] == 0).all() and (depth[bg] == grammar.BACKGROUND_DEPTH).all()
  person, sign = inst == grammar.PERSON_INSTANCE, inst == grammar.SIGN_INSTANCE
  assert (img[person] == grammar.PERSON_RGB).all()
  assert np.isin(img[sign].sum(-1), [0, 3 * 255]).all()
  assert person.any() == example['pose_visibility'].any() and sign.any() == bool(example['word'])
  # The visible entity at every pixel is the nearest one whose full shape covers it.
  ents = _entities_from_labels(example, r)
  stack = np.stack([np.where(e.mask, e.depth, grammar.BACKGROUND_DEPTH) for e in ents])
  np.testing.assert_array_equal(depth, stack.min(0))
  ids = np.array([e.instance for e in ents])
  covered = stack.min(0) < grammar.BACKGROUND_DEPTH
  np.testing.assert_array_equal(inst, np.where(covered, ids[stack.argmin(0)], 0))
  for e, box in zip(ents, objs['box']):
    rows, cols = np.nonzero(e.mask)
    np.testing.assert_array_equal(box * r, [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1])


def _check_pose(example, r):
  keys = ('pose_visibility', 'pose_keypoints', 'instance_mask', 'skeleton')
  vis, kp, inst, skel = (example[k] for k in keys)
  if not vis.any():
    assert not skel.any()
    return
  assert set(np.unique(vis)) <= {1, 2} and (vis == 2).any()
  half = geometry.limb_width(r) / 2
  ys, xs = np.mgrid[:r, :r] + 0.5
  for j, (x, y) in enumerate(kp * r):
    disc = (xs - x) ** 2 + (ys - y) ** 2 <= half ** 2
    shown = (inst[disc] == grammar.PERSON_INSTANCE).mean()
    assert (shown >= 0.5) == (vis[j] == 2)
    assert (skel[disc] > 0).all()  # Every joint lies on the skeleton map.
  for limb_id in np.unique(skel[skel > 0]):
    a, b = (kp[i] * r for i in pose.LIMBS[limb_id - 1])
    t = np.clip(((xs - a[0]) * (b - a)[0] + (ys - a[1]) * (b - a)[1]) / ((b - a) @ (b - a)), 0, 1)
    d = np.hypot(xs - a[0] - t * (b - a)[0], ys - a[1] - t * (b - a)[1])
    assert (d[skel == limb_id] <= half + 1e-4).all()


@pytest.mark.parametrize('split', ['train', 'held_out'])
def test_masks_depth_and_pose_agree_with_the_pixels(split):
  spec = dataclasses.replace(SPEC, resolution=48, sizes=(60, 0, 0, 60))
  for i in range(60):
    example = generate.make_example(spec, split, i)
    _check_maps_against_pixels(example, 48)
    _check_pose(example, 48)
    objs = example['objects']
    sizes = [grammar.SIZES.index(s) for s in objs['size']]
    best = min(range(len(sizes)), key=lambda k: (-sizes[k], objs['depth'][k]))
    assert example['label'] == grammar.SHAPES.index(objs['shape'][best])
    name = f"{objs['colour'][best]} {objs['shape'][best]}"
    assert grammar.SHAPE_COLOURS[example['shape_colour']] == name
    assert sorted(objs['depth_order']) == list(range(len(sizes)))


def test_single_object_config_draws_one_object_on_plain_grey():
  config = builder_lib.Builder.builder_configs['single32']
  spec = dataclasses.replace(config.spec(), sizes=(40, 0, 0, 20))
  for split in ('train', 'held_out'):
    for i in range(spec.size(split)):
      example = generate.make_example(spec, split, i)
      assert len(example['objects']['shape']) == 1 and example['background'] == 'plain'
      assert not example['pose_visibility'].any() and example['word'] == ''
      background = example['image'][example['instance_mask'] == 0]
      assert (background == background[0]).all()  # One flat grey.
  with pytest.raises(ValueError, match='max_objects=0'):
    dataclasses.replace(config, name='bad', max_objects=0).spec()
  with pytest.raises(ValueError, match="backgrounds=.*'dots'"):
    builder_lib.ShapesConfig(name='bad', backgrounds=('dots',))


def test_held_out_split_holds_out_its_compositions():
  spec = dataclasses.replace(SPEC, sizes=(300, 60, 60, 60))
  held = {f'{c} {s}' for s, c in grammar.HELD_OUT_PAIRS}
  seen_pairs = set()
  for split in generate.SPLITS:
    for i in range(spec.size(split)):
      ex = generate.make_example(spec, split, i)
      pairs = {f'{c} {s}' for s, c in zip(ex['objects']['shape'], ex['objects']['colour'])}
      text = ' '.join(ex['captions'] + ex['questions']).lower()
      if split == 'held_out':
        assert pairs & held, (i, pairs)
      else:
        assert not pairs & held and not any(h in text for h in held), (split, i, pairs)
        seen_pairs |= pairs
  # Each held-out shape and colour still appears in train, just never together.
  assert {p.split()[1] for p in seen_pairs} >= {s for s, _ in grammar.HELD_OUT_PAIRS}
  assert {p.split()[0] for p in seen_pairs} >= {c for _, c in grammar.HELD_OUT_PAIRS}


def test_caption_noise_swaps_the_stated_fraction_deterministically():
  spec = dataclasses.replace(SPEC, caption_noise=0.25)
  lang_keys = ('captions', 'questions', 'answers', 'question_types')
  clean = [generate.language(spec, 'train', i, generate.make_scene(spec, 'train', i))
           for i in range(40)]
  examples = [generate.make_example(spec, 'train', i) for i in range(40)]
  swapped = [i for i, ex in enumerate(examples) if ex['language_swapped']]
  assert len(swapped) == 10
  donors = generate.noise_donors(spec)
  assert sorted(donors) == swapped and sorted(donors.values()) == swapped
  for i, ex in enumerate(examples):
    language = {k: ex[k] for k in lang_keys}
    assert language == clean[donors.get(i, i)]
    assert (language != clean[i]) == (i in donors)
  test_captions = [generate.make_example(s, 'test', 0)['captions'] for s in (spec, SPEC)]
  assert test_captions[0] == test_captions[1]  # Only train is noisy.
  assert generate.noise_donors(dataclasses.replace(SPEC, caption_noise=0.0)) == {}


@pytest.mark.parametrize('overrides,match', [
    (dict(resolution=0), r'resolution=0 .*>= 16'),
    (dict(shapes=('circle', 'blob')), r"blob.*allowed: \['circle', 'square'"),
    (dict(colours=()), 'colours'),
    (dict(caption_noise=1.5), 'caption_noise=1.5'),
    (dict(num_train=-1), 'sizes'),
    (dict(shapes=('circle',)), 'held_out needs'),
    (dict(p_person=2.0), 'p_person'),
])
def test_bad_builder_arguments_raise_clear_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    builder_lib.ShapesConfig(name='bad', **overrides)


def _noise_like(examples, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, np.asarray(e['image']).shape, dtype=np.uint8) for e in examples]


def test_scorer_accepts_renders_and_rejects_noise_and_mismatches(built):
  examples = _decoded(built, 'test') + [generate.make_example(SPEC, 'held_out', i)
                                        for i in range(16)]
  renders = score_lib.aggregate([score_lib.score(e['image'], e) for e in examples])
  assert renders['overall'] >= 0.99 and renders['mean_iou'] >= 0.99
  assert renders['counts']['depth_order'][1] > 0 and renders['counts']['keypoints'][1] > 0
  noise = [score_lib.score(n, e) for n, e in zip(_noise_like(examples), examples)]
  assert score_lib.aggregate(noise)['overall'] < 0.1
  others = examples[1:] + examples[:1]
  mismatched = [score_lib.score(o['image'], e) for o, e in zip(others, examples)]
  assert score_lib.aggregate(mismatched)['overall'] < 0.2


def test_scorer_judges_at_another_resolution_and_catches_swaps():
  candidates = ((i, generate.make_example(SPEC, 'train', i)) for i in range(40))
  index, example = next((i, e) for i, e in candidates
                        if score_lib.score(e['image'], e)['counts']['depth_order'][1])
  scene = generate.make_scene(SPEC, 'train', index)
  assert score_lib.score(render.render(scene, 96).image, example)['overall'] == 1.0
  objs = list(scene.objects)
  i, j = _overlapping_pair(example)
  objs[i], objs[j] = (dataclasses.replace(objs[i], depth=objs[j].depth),
                      dataclasses.replace(objs[j], depth=objs[i].depth))
  swapped = render.render(dataclasses.replace(scene, objects=tuple(objs)), 32).image
  result = score_lib.score(swapped, example)
  assert result['depth_order'] < 1.0 and result['colour'] == 1.0
  recoloured = example['image'].copy()
  wrong = 'red' if objs[0].colour != 'red' else 'blue'
  recoloured[example['instance_mask'] == 1] = grammar.COLOURS[wrong]
  assert score_lib.score(recoloured, example)['counts']['colour'] == (len(objs) - 1, len(objs))
  with pytest.raises(ValueError, match='uint8 RxRx3'):
    score_lib.score(example['image'].astype(np.float32), example)


def _overlapping_pair(example):
  ents = _entities_from_labels(example, 32)
  n = len(example['objects']['shape'])
  return next((i, j) for i in range(n) for j in range(i + 1, n)
              if (ents[i].mask & ents[j].mask).sum() >= score_lib.MIN_PIXELS)


def _cfg(**overrides):
  return ml_collections.ConfigDict(dict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key='label',
      builder_config='tiny32', train_split='train', eval_split='test',
      features=('semantic_mask', 'depth', 'skeleton', 'pose_keypoints', 'pose_visibility')),
      **overrides))


def test_pipeline_reads_shapes_with_extra_features():
  it = pipeline.get_dataset(_cfg(), split='validation', seed=0, global_batch_size=64, repeat=False)
  batch = next(it)
  spec = {'image': ((64, 32, 32, 3), np.float32), 'label': ((64,), np.int32),
          'semantic_mask': ((64, 32, 32), np.int32), 'depth': ((64, 32, 32), np.float32),
          'skeleton': ((64, 32, 32), np.int32), 'pose_keypoints': ((64, 13, 2), np.float32),
          'pose_visibility': ((64, 13), np.int32)}
  assert it.spec() == spec and {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
  stored = {_key(e['image']): e for e in generate_tiny('validation')}
  for k in range(64):
    want = stored[_key(np.round((batch['image'][k] + 1) * 127.5).astype(np.uint8))]
    np.testing.assert_array_equal(batch['semantic_mask'][k], want['semantic_mask'])
    np.testing.assert_allclose(batch['depth'][k], want['depth'] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(batch['pose_keypoints'][k], want['pose_keypoints'])
    assert batch['label'][k] == want['label']
  small = next(pipeline.get_dataset(_cfg(resolution=16), split='validation', seed=0,
                                    global_batch_size=64))
  # Label maps are sampled at the output pixels' centres: every other source pixel.
  np.testing.assert_array_equal(small['semantic_mask'], batch['semantic_mask'][:, 1::2, 1::2])
  assert small['depth'].shape == (64, 16, 16)
  assert 0.0 <= small['depth'].min() <= small['depth'].max() <= 1.0


def generate_tiny(split):
  spec = builder_lib.Builder.builder_configs['tiny32'].spec()
  return [generate.make_example(spec, split, i) for i in range(spec.size(split))]


def _key(image):
  return np.asarray(image, np.uint8).tobytes()


@pytest.mark.parametrize('features,match', [
    (('nope',), r"'nope'.*features: \['answers'"), (('captions',), 'tokenizer'),
    (('objects',), 'variable length'), (['depth', 'depth'], 'twice'), ('depth', 'tuple')])
def test_pipeline_rejects_bad_features_before_building(tmp_path, features, match):
  with pytest.raises(ValueError, match=match):
    pipeline.check_config(_cfg(features=features, data_dir=str(tmp_path)))
  assert not list(tmp_path.iterdir())


def test_show_and_measure_scripts(tmp_path, capsys):
  show.main(['--out', str(tmp_path / 'grid.png'), '--num', '2', '--resolution', '32',
             '--cell', '64'])
  assert PIL.Image.open(tmp_path / 'grid.png').size[1] == 18 + 2 * 64
  measure.main(['--resolution', '32', '--num_train', '20', '--num_score', '10', '--workers', '1',
                '--json', str(tmp_path / 'm.json')])
  result = json.loads((tmp_path / 'm.json').read_text())
  assert result['build']['examples'] == 20 and result['scores']['renders']['overall'] == 1.0
  assert result['scores']['noise']['overall'] < 0.2
  assert 'renders' in capsys.readouterr().out
