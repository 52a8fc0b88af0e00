"""The VLM study benchmark runs end to end on a small grid and reads trained runs' results."""

import json

import pytest

from zoo.bench import vlm


def test_study_rows_sweep_table_and_plot(tmp_path):
  runs = tmp_path / 'runs' / 'vlm_mid_merge'
  runs.mkdir(parents=True)
  (runs / 'metrics.jsonl').write_text(json.dumps({'step': 5, 'vqa/accuracy': 0.5}) + '\n')
  evaluated = tmp_path / 'runs' / 'vlm_mid_block'  # Re-evaluated by `zoo eval`: that counts.
  evaluated.mkdir()
  (evaluated / 'metrics.jsonl').write_text(json.dumps({'step': 5, 'vqa/accuracy': 0.25}) + '\n')
  (evaluated / 'eval_metrics.jsonl').write_text(json.dumps({'step': 5, 'vqa/accuracy': 0.75}))
  report = vlm.run(str(tmp_path / 'runs'), batch=4, repeats=1, sides=(32, 64),
                   fusions=('mid',), mitigations=('none', 'merge', 'block'), log=lambda _: None)
  rows = {r['mitigation']: r for r in report['rows']}
  assert rows['merge']['visual_tokens'] == 32 and rows['none']['visual_tokens'] == 64
  assert rows['merge']['trained'] == {'accuracy': 0.5} and rows['none']['trained'] == {}
  assert rows['block']['trained'] == {'accuracy': 0.75}
  assert all(r['gflops_per_example'] > 0 and r['examples_per_sec'] > 0 for r in rows.values())
  none, block = report['sweep']['none'], report['sweep']['block']
  assert none[1]['gflops_per_example'] > none[0]['gflops_per_example']  # More tokens, more work.
  assert block[1]['peak_mib'] < none[1]['peak_mib']  # Block-sparse: no 256x256 attention map.
  text = vlm.table(report)
  assert '| mid | merge | 32 |' in text and '0.500' in text
  vlm.plot(report, tmp_path / 'sweep.png')
  assert (tmp_path / 'sweep.png').stat().st_size > 1000


def test_study_over_the_vision_tower_of_a_clip_run(tmp_path):
  from zoo import config as zoo_config
  source = tmp_path / 'clip'
  source.mkdir()
  clip = zoo_config.load('experiments/clip_shapes.py:smoke=True', ['--config.model.image.depth=2'])
  (source / 'config.json').write_text(zoo_config.to_json(clip))
  report = vlm.run(None, batch=2, repeats=1, sides=(), fusions=('mid',),
                   mitigations=('none', 'prune'), log=lambda _: None, vision_from=str(source))
  rows = {r['mitigation']: r for r in report['rows']}
  # The smoke CLIP tower: 8x8 patches of 32x32 images, 16 tokens and its class token.
  assert rows['none']['visual_tokens'] == 17 and rows['prune']['visual_tokens'] < 17
  assert report['sweep'] == {'none': [], 'prune': []} and '| mid | prune |' in vlm.table(report)
  assert 'tokens: GFLOPs' not in vlm.table(report)  # No sweep table.
  with pytest.raises(ValueError, match=r"unknown fusion or mitigation \['pruned'\]"):
    vlm.run(None, fusions=('mid',), mitigations=('pruned',))
