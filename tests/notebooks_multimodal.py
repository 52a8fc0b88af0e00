"""The dual-encoder and VLM notebooks execute in a kernel (see test_colab.py).

Not collected by the default test run (its name does not start with `test_`): each notebook
trains a smoke run in a fresh kernel (~2-4 minutes here) and the suite must stay within CI's 30
minutes. Run it explicitly: `python -m pytest -q tests/notebooks_multimodal.py`.
"""

import pytest

import test_colab


@pytest.mark.parametrize('name', ['dual_encoder.ipynb', 'vlm.ipynb'])
def test_notebook_executes(name, tmp_path, monkeypatch):
  test_colab.execute(name, tmp_path, monkeypatch)
