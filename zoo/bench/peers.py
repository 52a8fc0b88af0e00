"""The PyTorch references of the speed benchmark: diffusers and transformers models of the same
architecture and size, built from the config.json that `zoo export` would write, trained on the
same inputs with the same loss (`cases`) and torch.optim.AdamW, in eager mode (what a user of
those libraries runs by default; attention through SDPA).

The last Flax implementations (diffusers 0.39, transformers 4.57) need older jax / flax than zoo
pins, so they run in another venv: `flax_peer.py` is a standalone script for that interpreter.
"""

import json
import os
import subprocess

import numpy as np

from zoo import bench
from zoo.bench import cases as cases_lib
from zoo.convert import configs
from zoo.convert import transformers as hf

FLAX_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'flax_peer.py')
# Families each peer implements (diffusers has no Flax UNet2DModel or DiT).
TORCH_FAMILIES = ('unet', 'unet_t2i', 'vae', 'dit', 'vit', 'text', 'clip', 'siglip')
FLAX_FAMILIES = ('unet_t2i', 'vae', 'vit', 'text', 'clip')


def peer_config(case) -> dict:
  """The public config.json of the case's model (diffusers or transformers)."""
  kw = case.kwargs
  if case.model == 'unet':
    cfg = configs.unet_config(kw)
    if cfg['_class_name'] == 'UNet2DModel' and not cfg['attention_head_dim']:
      cfg['attention_head_dim'] = None  # One head (google/ddpm-* configs say null).
    return cfg
  if case.model == 'vae':
    return configs.vae_config(kw)
  if case.model == 'dit':  # The timestep shift and learned-σ width do not change the cost.
    return configs.dit_config(kw | dict(freq_shift=1.0))
  if case.model == 'dual_encoder':
    return hf.hf_config(kw)
  raise ValueError(f'{case.family}: no public reference model (peers: {TORCH_FAMILIES})')


def spec(case) -> dict:
  """What a peer needs to rebuild the case: family, config, batch and input shapes."""
  return {'family': case.family, 'config': peer_config(case), 'batch': case.batch,
          'inputs': {k: [list(v.shape), str(v.dtype)] for k, v in cases_lib.inputs(case).items()}}


def _torch_model(case, torch):
  cfg = {k: v for k, v in peer_config(case).items() if not k.startswith('_')}
  if case.model in ('unet', 'vae', 'dit'):
    import diffusers
    cls = getattr(diffusers, peer_config(case)['_class_name'])
    return cls(**{k: v for k, v in cfg.items() if k not in ('architectures',)})
  import transformers
  kind = case.kwargs['kind']
  config = (transformers.CLIPConfig if kind == 'clip' else transformers.SiglipConfig)(**cfg)
  if case.family == 'vit':
    return transformers.CLIPVisionModel(config.vision_config)
  if case.family == 'text':
    return transformers.CLIPTextModel(config.text_config)
  return (transformers.CLIPModel if kind == 'clip' else transformers.SiglipModel)(config)


def _loss(case, torch, model, b, alphas_cumprod):
  """The torch twin of `zoo_side.loss_fn` (NCHW images)."""
  nchw = lambda x: x.permute(0, 3, 1, 2)
  objective = case.objective
  if objective == 'diffusion':
    ab = alphas_cumprod[b['t']].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * nchw(b['x0']) + (1 - ab).sqrt() * nchw(b['noise'])
    kw = {}
    if 'context' in b:
      kw['encoder_hidden_states'] = b['context']
    if 'labels' in b:
      kw['class_labels'] = b['labels']
    pred = model(x_t, b['t'], **kw).sample
    channels = b['noise'].shape[-1]
    return torch.mean((pred[:, :channels] - nchw(b['noise'])) ** 2)
  if objective == 'vae':
    x = nchw(b['x'])
    posterior = model.encode(x).latent_dist
    rec = model.decode(posterior.mean + posterior.std * nchw(b['e'])).sample
    kl = 0.5 * torch.mean(posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar)
    return torch.mean((rec - x) ** 2) + 1e-6 * kl
  if case.family == 'vit':
    return torch.mean(model(pixel_values=nchw(b['images'])).pooler_output * b['r'])
  if case.family == 'text':
    return torch.mean(model(input_ids=b['tokens']).pooler_output * b['r'])
  logits = model(input_ids=b['tokens'], pixel_values=nchw(b['images'])).logits_per_image
  n = logits.shape[0]
  if case.kwargs['kind'] == 'clip':
    labels = torch.arange(n)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, labels) + ce(logits.T, labels))
  signs = 2.0 * torch.eye(n) - 1.0
  return -torch.mean(torch.nn.functional.logsigmoid(signs * logits))


def torch_device():
  """'cuda' when this torch build sees a GPU, else 'cpu'."""
  import torch
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def torch_measure(case, repeats=5, warmup=2, threads=None):
  """Median seconds of a torch train step (AdamW) and of a batch-1 forward, eager."""
  import torch
  torch.set_num_threads(threads or os.cpu_count())
  torch.manual_seed(0)
  device = torch_device()
  model = _torch_model(case, torch).to(device).train()
  betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(device)

  def to_torch(arrays):
    out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    return {k: (v.long() if v.dtype != torch.float32 else v).to(device) for k, v in out.items()}
  batch = to_torch(cases_lib.inputs(case))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)

  def train():
    opt.zero_grad(set_to_none=True)
    loss = _loss(case, torch, model, batch, alphas_cumprod)
    loss.backward()
    opt.step()
    return loss
  def done(result):
    if device == 'cuda':
      torch.cuda.synchronize()
    return result
  out = {'train_s': bench.median_seconds(train, repeats, warmup, sync=done),
         'threads': torch.get_num_threads(), 'device': device, 'version': torch.__version__}
  out['examples_per_s'] = case.batch / out['train_s']
  one = to_torch(cases_lib.inputs(case.with_batch(1)))
  model.eval()
  with torch.inference_mode():
    out['forward_s'] = bench.median_seconds(
        lambda: _loss(case, torch, model, one, alphas_cumprod), repeats, warmup, sync=done)
  return out


def torch_matmul_peak(n=2048, repeats=5):
  import torch
  a = torch.randn(n, n, device=torch_device())
  sync = (lambda r: torch.cuda.synchronize()) if a.is_cuda else (lambda r: r)
  seconds = bench.median_seconds(lambda: a @ a, repeats, warmup=2, sync=sync)
  return 2 * n ** 3 / seconds


def peer_env():
  """The environment for another venv's interpreter: no PYTHONPATH, no zoo-only XLA flag (an
  older jaxlib aborts on flags it does not know)."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if 'xla_cpu_experimental_ynn_fusion_type' not in f)
  return env


def flax_measure(case, python, repeats=5, warmup=2, timeout=1800):
  """Runs `flax_peer.py` under another interpreter (its venv holds the old Flax libraries)."""
  proc = subprocess.run([python, FLAX_PEER, json.dumps(spec(case)), str(repeats), str(warmup)],
                        capture_output=True, text=True, timeout=timeout, env=peer_env())
  if proc.returncode:
    raise RuntimeError(f'{case.family} flax peer failed ({python}):\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def flax_versions(python):
  code = ('import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in '
          '("jax", "flax", "diffusers", "transformers")}))')
  return json.loads(subprocess.run([python, '-c', code], capture_output=True, text=True,
                                   check=True).stdout)
