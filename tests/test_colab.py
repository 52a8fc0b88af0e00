"""The notebooks in colab/ execute top to bottom in a Jupyter kernel (nbclient), as on Colab.

Each starts with its install cell (a no-op where zoo is installed), trains the small run it
explores (the experiment's smoke config) unless an environment variable names one, and calls
library functions only. They are stored without outputs.
"""

import glob
import os

import nbformat
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'colab', '*.ipynb')))
# Printed lines each notebook must produce (what it shows a user).
EXPECT = {
    'quickstart.ipynb': ['(20, 16, 16, 1)'],
    'diffusion.ipynb': ['images (8, 32, 32, 3)', 'guidance 4:', 'heun           2    3',
                        'inpainted (4, 32, 32, 3)'],
    'dual_encoder.ipynb': ['  1  +', 'test/'],
    'vlm.ipynb': ['how many shapes are there? -> ', 'is there a red shape? -> '],
}


def test_every_notebook_is_checked():
  assert sorted(EXPECT) == sorted(os.path.basename(p) for p in NOTEBOOKS)


def execute(name, tmp_path, monkeypatch, **env):
  """Runs colab/`name` in a fresh kernel (with `env` set) and checks what it printed."""
  path = os.path.join(REPO, 'colab', name)
  book = nbformat.read(path, as_version=4)
  code = [c for c in book.cells if c.cell_type == 'code']
  assert 'pip' in code[0].source and 'install' in code[0].source
  assert not any(c.outputs or c.execution_count for c in code), 'stored with outputs'
  monkeypatch.setenv('TMPDIR', str(tmp_path))  # The kernel's tempfile.gettempdir().
  monkeypatch.setenv('ZOO_NOTEBOOK_SMOKE', '1')
  # One device, as on Colab (not the 8 fake CPU devices of the tests: a run loaded over them
  # computes every sample 8 times over on 2 cores).
  flags = [f for f in os.environ['XLA_FLAGS'].split() if 'device_count' not in f]
  monkeypatch.setenv('XLA_FLAGS', ' '.join([*flags, '--xla_force_host_platform_device_count=1']))
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  NotebookClient(book, timeout=900, kernel_name='python3',
                 resources={'metadata': {'path': REPO}}).execute()
  text = '\n'.join(out.get('text', '') for c in code for out in c.outputs
                   if out.output_type == 'stream')
  for line in EXPECT[name]:
    assert line in text, f'{line!r} not printed by {name}:\n{text[-3000:]}'
  assert not [out for c in code for out in c.outputs if out.output_type == 'error']


# dual_encoder.ipynb and vlm.ipynb run beside the runs they explore: tests/test_search.py and
# tests/test_vlm_task.py (their module fixtures), as diffusion.ipynb explores the session's run.
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  execute('quickstart.ipynb', tmp_path, monkeypatch)


def test_diffusion_notebook_explores_the_test_runs_checkpoint(shapes_diffusion_run, tmp_path,
                                                              monkeypatch):
  execute('diffusion.ipynb', tmp_path, monkeypatch,
          ZOO_DIFFUSION_WORKDIR=str(shapes_diffusion_run[0]))
