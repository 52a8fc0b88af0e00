"""The dual-encoder and VLM notebooks execute in a kernel (see test_colab.py)."""

import pytest

import test_colab


@pytest.mark.parametrize('name', ['dual_encoder.ipynb', 'vlm.ipynb'])
def test_notebook_executes(name, tmp_path, monkeypatch):
  test_colab.execute(name, tmp_path, monkeypatch)
