"""`zoo models`: the table's parameter counts are the ones the model tests pin, its FLOPs are
XLA's, and experiments are listed under the model they build."""

import pytest

from zoo import main as zoo_main
from zoo import models
from zoo.models import table
import test_dit
import test_unet

PINNED = ([('unet', name, n) for name, n in test_unet.PINNED_PARAMS.items()]
          + [('dit', name, n) for name, n in test_dit.PINNED_PARAMS.items()]
          + [('vae', 'sd', 83_653_863), ('dual_encoder', 'clip-vit-b32', 151_277_313),
             ('dual_encoder', 'siglip-b16-224', 203_155_970),
             ('text', 'clip-vit-b32-text', 63_428_096)])


@pytest.mark.parametrize('name,preset,count', PINNED, ids=lambda x: str(x))
def test_param_counts_are_the_pinned_ones(name, preset, count):
  assert table.measure(name, models.kwargs(models.config(name, preset)))['params'] == count


def test_flops_are_xla_cost_analysis():
  tiny = models.kwargs(models.config('dit', 'tiny'))
  got = table.measure('dit', tiny, flops=True)['gflops']
  # 2 blocks of width 32 over 16 tokens: the qkv/proj/MLP matmuls alone are 2*16*32*(3+1+8)*32
  # multiply-adds per block; attention, adaLN and the embedders add a little more.
  matmuls = 2 * 2 * 16 * 32 * 12 * 32 / 1e9
  assert matmuls < got < 3 * matmuls
  wider = table.measure('dit', tiny | {'hidden_size': 64, 'num_heads': 4}, flops=True)['gflops']
  assert 3 < wider / got < 4.5  # the matmuls grow as width squared


def test_cli_lists_presets_and_experiments(capsys, tmp_path):
  experiments = table._experiment_models()
  assert experiments['quickstart.py'][0] == 'unet'
  assert experiments['quickstart.py'][1] == models.kwargs(models.config('unet', 'digits'))
  # Latent denoisers are measured on the latents (64 px scenes, an f=4 VAE), pixel ones not.
  assert [experiments[f'{e}.py'][2] for e in ('ldm_t2i_shapes', 'dit_t2i_shapes',
                                              'control_t2i_shapes', 'dit_shapes')] == [16] * 3 + [32]
  assert zoo_main.main(['models', '--model', 'vae', '--json', str(tmp_path / 'models.json')]) == 0
  out = capsys.readouterr().out
  assert '| vae | sd | 83,653,863 | — |' in out
  assert '| vae | — | 681,911 | `vae_shapes.py` |' in out
  assert '| unet |' not in out
  assert zoo_main.main(['models', '--model', 'resnet']) == 2
