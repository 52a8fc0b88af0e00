"""The notebooks in colab/ run top to bottom on the library (shell `!` lines are Colab-only)."""

import glob
import json
import os
import tempfile

import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'colab', '*.ipynb')))


def code_cells(path):
  with open(path) as f:
    cells = json.load(f)['cells']
  for cell in cells:
    if cell['cell_type'] == 'code':
      lines = [l for l in ''.join(cell['source']).splitlines() if not l.lstrip().startswith(('!', '%'))]
      yield '\n'.join(lines)


def test_there_is_a_notebook():
  assert NOTEBOOKS


@pytest.mark.parametrize('path', NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch, tmp_path):
  monkeypatch.chdir(REPO)
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  namespace = {}
  for source in code_cells(path):
    exec(compile(source, path, 'exec'), namespace)  # noqa: S102 - our own notebook
  assert namespace['images'].shape == (20, 16, 16, 1)
