r"""LoRA: teach a class-conditional shapes DiT a shape it never saw (hearts), training < 5%.

The base is experiments/dit_shapes.py trained on `single32_noheart` (the one-object scenes
without hearts: the heart rows of its 64 shape x colour label table never train). This run
loads that base (EMA), freezes it and trains rank-`rank` adapters on every attention, MLP and
adaLN-modulation projection (`config.lora`) on `single32_heart` (hearts in every colour).
The `adherence` evaluator judges 128 samples requested as hearts from their pixels: 'shape'
is the fraction that came out hearts (the base's is the same evaluator at step 0).

  zoo train --config experiments/dit_shapes.py:builder_config=single32_noheart \
      --workdir workdirs/dit_noheart
  zoo train --config experiments/lora_shapes.py:base=workdirs/dit_noheart \
      --workdir workdirs/lora_heart
  zoo export --workdir workdirs/lora_heart --out heart_dit.safetensors   # merged weights
  zoo export --workdir workdirs/lora_heart --lora --out heart_lora.safetensors  # adapters

Arguments: base (the base run's workdir), smoke (bool: tinysingle32, 20 steps, over the
dit_shapes smoke base), steps (int, 0 = default), rank (int, 4), targets (regex; default:
attention, MLP and adaLN kernels).
"""

from zoo import config as zoo_config
from zoo.nn import lora

ConfigDict = zoo_config.ConfigDict
TARGETS = lora.DEFAULT_TARGETS + '|adaLN_modulation_1/kernel$'
HEART = 4  # data.shapes.grammar.SHAPES.index('heart'): labels 32..39 are the hearts.


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, base='', smoke=False, steps=0, rank=4, targets=TARGETS)
  config = zoo_config.sibling(__file__, 'dit_shapes').get_config(
      f'smoke={arg.smoke}' + ('' if arg.smoke else ',builder_config=single32_heart'))
  config.lora = ConfigDict(dict(rank=arg.rank, alpha=float(arg.rank), targets=arg.targets,
                                base_from=arg.base or ('/tmp/dit_shapes_smoke' if arg.smoke
                                                       else 'workdirs/dit_noheart')))
  config.train.steps = arg.steps or (20 if arg.smoke else 1500)
  config.train.eval_every = 0 if arg.smoke else 500
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 2 if arg.smoke else 50
  config.optim.ema_decay = 0.99
  config.evals.samples.labels = tuple(HEART * 8 + c for c in range(8))
  config.evals.heart = ConfigDict(dict(
      type='adherence', split='validation', num_samples=16 if arg.smoke else 128,
      batch_size=16 if arg.smoke else 64, sampler='dpmpp_2m', steps=5 if arg.smoke else 20,
      guidance_scale=4.0, use_ema=True, seed=0, grid=16 if arg.smoke else 32,
      upscale=1 if arg.smoke else 2))
  return config
