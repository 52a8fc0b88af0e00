"""zoo.bench.memory on a tiny cross-attention U-Net: compile-only statistics and the report."""

import json

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import pytest  # noqa: E402

from zoo.bench import memory  # noqa: E402
from zoo.models import unet  # noqa: E402

# tiny-t2i cut to one level (cross-attention down, mid and up): three quick CPU compiles.
TINY = unet.preset('tiny-t2i') | dict(block_out_channels=(16,),
                                      down_block_types=('CrossAttnDownBlock2D',),
                                      up_block_types=('CrossAttnUpBlock2D',))
FIELDS = {'argument_bytes', 'output_bytes', 'temp_bytes', 'alias_bytes', 'peak_bytes', 'flops',
          'compile_seconds'}


def test_tiny_report_fields_and_remat_costs(tmp_path):
  cases = [memory.Case('tiny', 'unet', TINY, 2, (8, 8, 4), (5, 32)),
           memory.Case('tiny-remat', 'unet', TINY | dict(remat=True), 2, (8, 8, 4), (5, 32),
                       steps=('train',))]
  report = memory.run(cases, {'xla_backend_optimization_level': 0}, log=lambda _: None)
  json.loads(json.dumps(report))  # JSON-ready as returned
  assert report['backend'] == jax.default_backend() and report['peak_definition']
  plain, remat = report['cases']['tiny'], report['cases']['tiny-remat']
  params = plain['params']
  assert params == remat['params'] > 0
  assert set(remat) >= {'train'} and 'sample' not in remat
  for stats in (plain['train'], plain['sample'], remat['train']):
    assert set(stats) == FIELDS
    assert stats['peak_bytes'] == (stats['argument_bytes'] + stats['output_bytes']
                                   + stats['temp_bytes'] - stats['alias_bytes']) > 0
    assert stats['flops'] > 0
  # The arguments hold every float32 param (plus the batch); the train step also outputs grads.
  assert plain['train']['argument_bytes'] >= 4 * params
  assert plain['train']['output_bytes'] >= 4 * params > plain['sample']['output_bytes']
  assert plain['train']['flops'] > plain['sample']['flops']
  assert remat['train']['flops'] > plain['train']['flops']  # the forward really is recomputed
  # XLA's CPU scheduler hoists the recomputed forward to the end of the forward pass, where it
  # cannot save memory (it costs a few %); GPU/TPU schedule it inside the backward pass.
  limit = 1.1 if report['backend'] == 'cpu' else 1.0
  assert remat['train']['temp_bytes'] <= limit * plain['train']['temp_bytes']
  assert 'tiny' in memory.table(report)


def test_ratios_divide_pixel_by_latent():
  stats = lambda peak, temp, flops: {'peak_bytes': peak, 'temp_bytes': temp, 'flops': flops}
  results = {'p': {'train': stats(60, 40, 9), 'sample': stats(8, 6, 3)},
             'l': {'train': stats(20, 10, 3)}}
  assert memory.ratios(results, 'p', 'l') == {
      'train_peak_bytes': 3.0, 'train_temp_bytes': 4.0, 'train_flops': 3.0}


def test_cli_rejects_unknown_case_before_compiling(tmp_path):
  with pytest.raises(ValueError, match="unknown cases; allowed: \\['unet-pixel-256'"):
    memory.main(['--only', 'nope', '--out', str(tmp_path / 'm.json')])
