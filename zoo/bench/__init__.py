"""Benchmarks: scripts that print a table and write JSON (`python -m zoo.bench.<name>`)."""

import json


def write_report(report, path):
  """Writes a benchmark's report as JSON to `path` and says so."""
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {path}')
