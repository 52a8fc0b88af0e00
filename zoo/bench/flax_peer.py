"""The last Flax implementations as speed-benchmark peers: a standalone script (no zoo import).

diffusers dropped Flax after 0.39 and transformers after 4.57, and those need older jax / flax
than zoo pins, so this runs under another interpreter, made once with

  python3.11 -m venv V && V/bin/pip install diffusers==0.39.0 transformers==4.57.6 \
      jax==0.4.38 jaxlib==0.4.38 flax==0.10.2 optax==0.2.4

and is called by `python -m zoo.bench.perf --flax-python V/bin/python` as
`V/bin/python flax_peer.py SPEC_JSON REPEATS WARMUP`; SPEC_JSON is `peers.spec(case)`
(`flax_peer.py --conv`: the convolution rates of `conv_rates` under that jax). It
prints one JSON line: compile seconds, XLA's FLOPs of the step, median train-step and batch-1
forward seconds.

Same step as zoo's: the loss of zoo/bench/cases.py, its gradient and optax.adamw (lr 1e-4),
params and optimizer state donated, under jax.jit.
"""

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _median(call, repeats, warmup):
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _inputs(spec, batch):
  rng = np.random.default_rng(0)
  out = {}
  for name, (shape, dtype) in spec['inputs'].items():
    shape = [batch, *shape[1:]]
    if dtype.startswith('int'):
      high = 1000 if name == 't' else 2
      if name == 'tokens':
        text = spec['config'].get('text_config', {})
        high = text.get('vocab_size', 2)
      if name == 'labels':
        high = spec['config']['num_embeds_ada_norm']
      out[name] = jnp.asarray(rng.integers(0, high, shape), jnp.int32)
    else:
      out[name] = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return out


# Fields the Flax classes lack, with the value they hard-code: a config that needs another value
# is not the same model in Flax (e.g. FlaxUNet2DConditionModel's GroupNorm always has 32 groups).
FIXED = {'norm_num_groups': 32, 'norm_eps': 1e-5, 'downsample_padding': 1,
         'num_class_embeds': None, 'use_quant_conv': True, 'use_post_quant_conv': True,
         'mid_block_add_attention': True, 'shift_factor': None}


def _accepted(cls, cfg):
  """The config restricted to the Flax class's fields; refuses what it cannot express."""
  import dataclasses
  fields = {f.name for f in dataclasses.fields(cls)}
  for key in sorted(set(cfg) - fields):
    if key in FIXED and cfg[key] != FIXED[key]:
      raise ValueError(f'{cls.__name__} has no {key!r} (fixed at {FIXED[key]!r}); this case '
                       f'needs {cfg[key]!r}')
  return {k: v for k, v in cfg.items() if k in fields}


def _model(spec):
  """(apply(params, name, *args, **kw), params) of the peer model."""
  family, cfg = spec['family'], {k: v for k, v in spec['config'].items()
                                 if not k.startswith('_') and k != 'architectures'}
  if family in ('unet_t2i', 'vae'):
    import diffusers
    cls = (diffusers.FlaxUNet2DConditionModel if family == 'unet_t2i'
           else diffusers.FlaxAutoencoderKL)
    if family == 'unet_t2i':
      cfg['sample_size'] = spec['inputs']['x0'][0][1]
    else:
      cfg['sample_size'] = spec['inputs']['x'][0][1]
    module = cls(**_accepted(cls, cfg))
    params = module.init_weights(jax.random.key(0))
    return module, params
  import transformers
  config = transformers.CLIPConfig(**cfg)
  if family == 'vit':
    model = transformers.FlaxCLIPVisionModel(config.vision_config)
  elif family == 'text':
    model = transformers.FlaxCLIPTextModel(config.text_config)
  else:
    model = transformers.FlaxCLIPModel(config)
  return model, model.params


def _loss_fn(spec, model):
  family = spec['family']
  nchw = lambda x: jnp.transpose(x, (0, 3, 1, 2))
  if family == 'unet_t2i':
    betas = jnp.linspace(1e-4, 0.02, 1000, dtype=jnp.float32)
    alphas_cumprod = jnp.cumprod(1 - betas)

    def diffusion(params, b):
      ab = alphas_cumprod[b['t']][:, None, None, None]
      x_t = jnp.sqrt(ab) * b['x0'] + jnp.sqrt(1 - ab) * b['noise']
      pred = model.apply({'params': params}, nchw(x_t), b['t'], b['context'], train=True).sample
      return jnp.mean((pred - nchw(b['noise'])) ** 2)
    return diffusion
  if family == 'vae':
    def vae(params, b):
      posterior = model.apply({'params': params}, nchw(b['x']), method=model.encode).latent_dist
      z = posterior.mean + posterior.std * b['e']  # NHWC latents, as the encoder returns.
      rec = model.apply({'params': params}, z, method=model.decode).sample
      kl = 0.5 * jnp.mean(posterior.mean ** 2 + posterior.var - 1.0 - posterior.logvar)
      return jnp.mean((rec - nchw(b['x'])) ** 2) + 1e-6 * kl
    return vae
  if family == 'vit':
    return lambda params, b: jnp.mean(
        model(pixel_values=nchw(b['images']), params=params, train=True).pooler_output * b['r'])
  if family == 'text':
    return lambda params, b: jnp.mean(
        model(input_ids=b['tokens'], params=params, train=True).pooler_output * b['r'])

  def clip(params, b):
    logits = model(input_ids=b['tokens'], pixel_values=nchw(b['images']), params=params,
                   train=True).logits_per_image
    labels = jnp.arange(logits.shape[0])
    ce = lambda lg: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(lg, labels))
    return 0.5 * (ce(logits) + ce(logits.T))
  return clip


# (batch, side, channels) of the 3x3 convolutions of conv_rates: a VAE / U-Net's levels.
CONV_SHAPES = ((2, 128, 64), (2, 64, 128), (2, 32, 256), (8, 32, 128), (8, 16, 256))


def conv_rates(repeats=3, shapes=CONV_SHAPES):
  """GFLOP/s of a 3x3 'SAME' float32 convolution, its input gradient and its weight gradient
  (NHWC / HWIO, as flax), under this interpreter's jax: the same programs on two jaxlibs."""
  rows = []
  for b, side, c in shapes:
    x = jax.random.normal(jax.random.key(0), (b, side, side, c), jnp.float32)
    w = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, c, c), jnp.float32)
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = conv(x, w)  # The cotangent (only its shape matters); the forward is dead code below.
    dx = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0])
    dw = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1])
    flops = 2.0 * b * side * side * 9 * c * c
    fwd = jax.jit(conv)
    rows.append({'batch': b, 'side': side, 'channels': c, **{
        name: flops / _median(fn, repeats, 1) / 1e9 for name, fn in (
            ('forward', lambda: fwd(x, w)), ('input_grad', lambda: dx(x, w, y)),
            ('weight_grad', lambda: dw(x, w, y)))}})
  return {'jax': jax.__version__, 'rows': rows}


def main(argv):
  if argv[1:2] == ['--conv']:
    print(json.dumps(conv_rates()))
    return
  spec, repeats, warmup = json.loads(argv[1]), int(argv[2]), int(argv[3])
  model, params = _model(spec)
  loss = _loss_fn(spec, model)
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)
  batch = _inputs(spec, spec['batch'])

  def step(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = {'compile_s': time.perf_counter() - start, 'flops': float(cost.get('flops', 0.0))}
  state = [params, opt_state]

  def train():
    state[0], state[1], value = compiled(state[0], state[1], batch)
    return value
  out['train_s'] = _median(train, repeats, warmup)
  out['examples_per_s'] = spec['batch'] / out['train_s']
  one = _inputs(spec, 1)
  forward = jax.jit(loss).lower(state[0], one).compile()
  out['forward_s'] = _median(lambda: forward(state[0], one), repeats, warmup)
  print(json.dumps(out))


if __name__ == '__main__':
  main(sys.argv)
