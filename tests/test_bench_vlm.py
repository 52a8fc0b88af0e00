"""The VLM study benchmark runs end to end on a small grid and reads trained runs' results."""

import json

from zoo.bench import vlm


def test_study_rows_sweep_table_and_plot(tmp_path):
  runs = tmp_path / 'runs' / 'vlm_mid_merge'
  runs.mkdir(parents=True)
  (runs / 'metrics.jsonl').write_text(json.dumps({'step': 5, 'vqa/accuracy': 0.5}) + '\n')
  report = vlm.run(str(tmp_path / 'runs'), batch=4, repeats=1, sides=(32, 64),
                   fusions=('mid',), mitigations=('none', 'merge', 'block'), log=lambda _: None)
  rows = {r['mitigation']: r for r in report['rows']}
  assert rows['merge']['visual_tokens'] == 32 and rows['none']['visual_tokens'] == 64
  assert rows['merge']['trained'] == {'accuracy': 0.5} and rows['none']['trained'] == {}
  assert all(r['gflops_per_example'] > 0 and r['examples_per_sec'] > 0 for r in rows.values())
  none, block = report['sweep']['none'], report['sweep']['block']
  assert none[1]['gflops_per_example'] > none[0]['gflops_per_example']  # More tokens, more work.
  assert block[1]['peak_mib'] < none[1]['peak_mib']  # Block-sparse: no 256x256 attention map.
  text = vlm.table(report)
  assert '| mid | merge | 32 |' in text and '0.500' in text
  vlm.plot(report, tmp_path / 'sweep.png')
  assert (tmp_path / 'sweep.png').stat().st_size > 1000
