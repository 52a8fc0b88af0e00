"""`python -m zoo.bench.loss_memory`: the table and JSON of contrastive-loss memory (compile only)."""

import json

from zoo.bench import loss_memory


def test_loss_memory_table_and_json(tmp_path, capsys):
  out = tmp_path / 'loss_memory.json'
  rows = loss_memory.main(['--devices', '2', '8', '--local', '64', '--width', '16',
                           '--out', str(out)])
  printed = capsys.readouterr().out
  assert '| devices | global batch | local batch | softmax (KiB)' in printed
  assert json.loads(out.read_text())['rows'] == rows
  temp = {(r['loss'], r['devices']): r['temp_bytes'] for r in rows}
  assert {r['global_batch'] for r in rows} == {128, 512}
  # Gathering losses grow with the global batch; the ring's temporaries do not.
  assert temp['softmax', 8] > 2 * temp['softmax', 2]
  assert temp['sigmoid', 8] > 2 * temp['sigmoid', 2]
  assert temp['sigmoid_chunked', 8] < temp['sigmoid', 8] / 2
