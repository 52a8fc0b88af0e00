"""The speed benchmark (`zoo bench`): its peers are the same models doing the same work, its
step trains, its numbers come out whole. No test asserts a time."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from zoo.bench import cases as cases_lib
from zoo.bench import flax_peer
from zoo.bench import peers
from zoo.bench import perf
from zoo.bench import perf_report
from zoo.bench import scaling
from zoo.bench import zoo_side
from zoo.convert import diffusers as convert_diffusers
from zoo.convert import transformers as convert_hf

torch.set_num_threads(2)


def _zoo_param_count(case):
  mod = zoo_side.module(case)
  batch = cases_lib.inputs(case.with_batch(1))
  abstract = jax.eval_shape(lambda: zoo_side.init_params(case, mod, batch))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  if case.model == 'dit':  # diffusers gives every block its own copy of the t / y embedders.
    shared = count({k: abstract[k] for k in ('t_embedder', 'y_embedder')})
    return count(abstract) + (case.kwargs['depth'] - 1) * shared
  return count(abstract)


@pytest.mark.parametrize('family', peers.TORCH_FAMILIES)
def test_torch_peer_is_the_same_model_at_bench_size(family):
  """Parameter counts of zoo's bench model and the peer built from its config.json agree."""
  case = cases_lib.bench_cases()[family]
  with torch.device('meta'):
    model = peers._torch_model(case, torch)
  ours = _zoo_param_count(case)
  theirs = sum(p.numel() for p in model.parameters())
  assert ours == theirs, (family, ours, theirs)


def _same_loss(case, to_zoo, batch=None):
  torch.manual_seed(0)
  model = peers._torch_model(case, torch).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape))
  params = jax.tree.map(jax.numpy.asarray, to_zoo(
      {k: v.numpy() for k, v in model.state_dict().items()}))
  batch = cases_lib.inputs(case) if batch is None else batch
  ours = float(zoo_side.loss_fn(case, zoo_side.module(case))(params, batch))
  betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  ab = torch.cumprod(1 - betas, 0).float()
  tb = {k: torch.from_numpy(v).long() if v.dtype.kind == 'i' else torch.from_numpy(v)
        for k, v in batch.items()}
  with torch.no_grad():
    theirs = float(peers._loss(case, torch, model, tb, ab))
  np.testing.assert_allclose(ours, theirs, rtol=2e-4)


def test_unet_loss_equals_the_torch_peer_on_the_same_weights():
  case = cases_lib.smoke_case('unet', perf.EXPERIMENTS).with_batch(2)
  _same_loss(case, convert_diffusers.state_dict_to_params)


def test_clip_loss_equals_the_torch_peer_on_the_same_weights():
  case = cases_lib.smoke_case('clip', perf.EXPERIMENTS).with_batch(4)
  # One EOS, last and the largest id, so that every pooling rule picks the same token.
  eos = case.kwargs['text']['vocab_size'] - 1
  case = dataclasses.replace(case, kwargs=case.kwargs | {
      'text': case.kwargs['text'] | {'eos_token_id': eos}})
  batch = cases_lib.inputs(case)
  batch['tokens'] = np.minimum(batch['tokens'], eos - 1)
  batch['tokens'][:, -1] = eos
  _same_loss(case, lambda sd: convert_hf.from_hf_dual(sd, case.kwargs), batch)


def test_train_step_trains_and_reports_whole_numbers():
  case = cases_lib.smoke_case('dit', perf.EXPERIMENTS).with_batch(4)
  mod = zoo_side.module(case)
  batch = jax.tree.map(jax.numpy.asarray, cases_lib.inputs(case))
  loss = zoo_side.loss_fn(case, mod)
  tx = zoo_side.optax.adamw(1e-3)
  params = zoo_side.init_params(case, mod, batch)
  state = (params, tx.init(params))
  step = jax.jit(zoo_side.train_step_fn(loss, tx))
  values = []
  for _ in range(6):
    *state, value = step(*state, batch)
    values.append(float(value))
  assert values[-1] < values[0], values
  out = zoo_side.measure(case, repeats=1, warmup=1)
  assert out['flops'] > 0 and out['peak_bytes'] > out['params'] * 4
  assert out['train_s'] > 0 and out['forward_s'] > 0
  assert out['examples_per_s'] == pytest.approx(4 / out['train_s'])


def test_sweep_point_times_only_within_budget():
  case = scaling._resized(cases_lib.smoke_case('dit', perf.EXPERIMENTS), 16)
  cheap = scaling.point(case, flops_per_s=1e15, max_seconds=10, repeats=1)
  dear = scaling.point(case, flops_per_s=1.0, max_seconds=10, repeats=1)
  assert cheap['train_s'] > 0 and 'train_s' not in dear
  assert dear['estimated_s'] == pytest.approx(cheap['flops'])
  assert cheap['side'] == 16 and cheap['peak_bytes'] > 0


def test_sampler_overhead_rows():
  case = cases_lib.smoke_case('unet', perf.EXPERIMENTS).with_batch(2)
  rows = scaling.sampler_overhead(case, nfes=(1, 3), repeats=3)
  assert [r['nfe'] for r in rows] == [1, 3]
  for r in rows:
    assert r['loop_s'] > 0 and r['bare_s'] > 0
    # The median of paired ratios lies between its quartiles (not the ratio of the medians).
    assert r['overhead_q1'] <= r['overhead'] <= r['overhead_q3']
    assert -0.9 < r['overhead'] < 9
  table = perf_report.sampler_table({'rows': rows})
  assert f"{rows[1]['overhead_q1']:+.1%} .. {rows[1]['overhead_q3']:+.1%}" in table


def test_report_tables_and_benchmarks_md(tmp_path):
  report = perf.run(families=('dit',), sizes=('smoke',), repeats=1, warmup=1, sweeps=False,
                    sampler=False)
  row, = report['rows']
  assert row['zoo']['mfu'] > 0 and row['torch']['mfu'] > 0
  assert row['zoo_over_best_peer'] == pytest.approx(
      row['zoo']['examples_per_s'] / row['torch']['examples_per_s'])
  report['command'] = 'zoo bench --families dit --sizes smoke'
  path = tmp_path / 'BENCHMARKS.md'
  perf_report.write_markdown(report, str(path))
  text = path.read_text()
  assert '**Machine**' in text and report['command'] in text
  assert f"| dit | smoke | {row['batch']} |" in text
  # --update: the measured row replaces its namesake, the others stay, both commands listed.
  old = json.loads(json.dumps(report))
  old['rows'].append(dict(row, family='vae'))
  old['sampler'] = {'case': {}, 'rows': [{'nfe': 2, 'loop_s': 1.0, 'bare_s': 1.0,
                                          'overhead': 0.0, 'images_per_s': 1.0}]}
  remeasured = dict(row, batch=row['batch'] + 1, zoo=dict(row['zoo'], mfu=0.99))
  new = dict(old, rows=[remeasured], command='zoo bench --families dit')
  del new['sampler']
  merged = perf_report.merge(old, new)
  assert [(r['family'], r['batch']) for r in merged['rows']] == [
      ('dit', row['batch'] + 1), ('vae', row['batch'])]
  # One peak for the table: the new row's MFU against the old report's peak.
  assert merged['rows'][0]['zoo']['mfu'] == pytest.approx(row['zoo']['mfu'])
  assert merged['sampler'] == old['sampler'] and merged['command'] == report['command']
  assert merged['updates'][0]['measured'] == ['dit/smoke']
  twice = perf_report.merge(merged, new)
  perf_report.write_markdown(twice, str(path))
  assert len(twice['updates']) == 2
  assert path.read_text().count('`zoo bench --families dit`') == 2
  # Another machine's numbers never go into the table: refused by merge, and by the run itself
  # right after it has measured its peak (before any benchmark).
  faster = dict(new, peak=dict(new['peak'], peak_flops_per_s=4 * old['peak']['peak_flops_per_s']))
  with pytest.raises(ValueError, match=r"is 4\.00x the report's .*allowed 0\.67-1\.50x"):
    perf_report.merge(old, faster)
  logged = []
  with pytest.raises(ValueError, match='without --update'):
    perf.run(families=('dit',), sizes=('smoke',), repeats=1, warmup=1, sweeps=False,
             sampler=False, torch_peer=False, same_peak_as=old['peak']['peak_flops_per_s'] / 4,
             log=logged.append)
  assert not any('dit' in line for line in logged)  # Stopped at the peak: no row measured.


def test_the_recorded_command_carries_the_environment_that_changes_the_numbers(monkeypatch):
  import zoo
  monkeypatch.setenv('ZOO_CPU_CONV', 'eigen')
  monkeypatch.setenv('XLA_FLAGS', f'--xla_foo=1 {zoo.YNN_FLAG}')
  assert perf.command_line(['--families', 'vlm']) == (
      "ZOO_CPU_CONV=eigen XLA_FLAGS='--xla_foo=1' zoo bench --families vlm")
  monkeypatch.delenv('ZOO_CPU_CONV')
  monkeypatch.setenv('XLA_FLAGS', '')
  assert perf.command_line([]) == 'zoo bench'


def test_cli_errors_name_the_flag_and_the_choices():
  run = lambda *a: subprocess.run([sys.executable, '-m', 'zoo.main', 'bench', *a],
                                  capture_output=True, text=True)
  bad = run('--repeats', '0')
  assert bad.returncode == 2 and '--repeats 0' in bad.stderr
  unknown = run('--families', 'unet,gan', '--no-sweeps', '--no-sampler', '--no-torch')
  assert unknown.returncode == 2 and "['gan']" in unknown.stderr and 'vlm' in unknown.stderr
  missing = run('--update', '/nonexistent/bench.json')
  assert missing.returncode == 2 and '--update /nonexistent/bench.json: no such report' in (
      missing.stderr)


def test_flax_peer_refuses_a_config_flax_cannot_express():
  import dataclasses

  @dataclasses.dataclass
  class Fake:
    in_channels: int = 4
  assert flax_peer._accepted(Fake, {'in_channels': 4, 'norm_num_groups': 32}) == {
      'in_channels': 4}
  with pytest.raises(ValueError, match="no 'norm_num_groups' .*needs 8"):
    flax_peer._accepted(Fake, {'in_channels': 4, 'norm_num_groups': 8})
  spec = peers.spec(cases_lib.smoke_case('clip', perf.EXPERIMENTS))
  batch = flax_peer._inputs(json.loads(json.dumps(spec)), 3)
  assert batch['images'].shape[0] == 3 and batch['tokens'].shape == (3, spec['inputs'][
      'tokens'][0][1])


def test_profile_attributes_the_step_to_its_instructions():
  from zoo.bench import profile
  case = cases_lib.smoke_case('vae', perf.EXPERIMENTS).with_batch(2)
  p = profile.profile_case(case, steps=1)
  assert p['op_s'] > 0 and sum(p['by_kind'].values()) == pytest.approx(p['op_s'])
  assert {'convolution', 'conv weight-grad'} <= set(p['by_kind'])
  seconds = [s for _, _, s in p['top']]
  assert seconds == sorted(seconds, reverse=True)
  rates = flax_peer.conv_rates(1, shapes=((1, 8, 4),))
  assert rates['jax'] == jax.__version__
  assert all(rates['rows'][0][k] > 0 for k in ('forward', 'input_grad', 'weight_grad'))
  text = profile.markdown({'command': 'python -m zoo.bench.profile', 'profiles': [p],
                           'conv': {'zoo flags': rates}})
  assert '## vae (smoke size)' in text and '| 1 × 8² × 4 |' in text


def test_flax_peer_environment_drops_zoo_only_flags(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                     '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT')
  monkeypatch.setenv('PYTHONPATH', '/somewhere')
  env = peers.peer_env()
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'
  assert 'PYTHONPATH' not in env
