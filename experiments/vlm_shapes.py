r"""A vision-language transformer on the shapes scenes: VQA or captioning, fused early, mid or late.

  zoo train --config experiments/vlm_mid_shapes.py --workdir workdirs/vlm_mid
  zoo train --config experiments/vlm_early_shapes.py --workdir workdirs/vlm_early
  zoo train --config experiments/vlm_late_shapes.py --workdir workdirs/vlm_late
  zoo train --config experiments/vlm_mid_shapes.py:reduce=merge,merge_r=32 \
    --workdir workdirs/vlm_mid_merge
  zoo train --config experiments/vlm_mid_shapes.py:objective=caption --workdir workdirs/vlm_mid_cap
  zoo train --config experiments/vlm_mid_shapes.py:init=workdirs/vlm_early \
    --workdir workdirs/vlm_mid_warm
  zoo train --config experiments/vlm_mid_shapes.py:smoke=True --workdir /tmp/vlm_smoke
  zoo ask --workdir workdirs/vlm_mid --image scene.png "how many shapes are there?"

The three fusion files differ only in the `fusion` default; every argument below works with
each. The model is `models.vlm` preset 'tiny' (a 2-layer ViT over a conv stem, 8x8 tokens of
width 64; a 4-layer language model of width 96 over the word-level 'shapes' tokenizer).

Arguments: smoke (bool: tiny32, 20 steps), fusion ('mid', 'early', 'late', 'none' = text
only, the language prior), objective ('vqa' or 'caption'), builder_config ('' = res32, tiny32
for smoke; 'res32_noise30' etc. for the caption-noise study), types (QA types to train on,
'+'-separated; '' = all), attention ('full', 'window', 'block', 'linformer', 'nystrom'),
window, block, rank, reduce ('none', 'prune', 'merge'), reduce_from, prune_keep, merge_r,
resampler (latents, 0 = none), cross_every, steps (0 = default), batch (0 = default), lr,
init (a VLM workdir whose vision tower, language model and head warm-start this one:
`task.pretrained_from`; mid fusion from scratch keeps its zero-initialised gates shut),
vision_from (a CLIP / SigLIP / ViT run, e.g. experiments/clip_shapes.py's: its image tower
becomes the vision tower, the model's vision fields are read from that run once it exists:
`task.vision_from`), lock_vision (bool, default True: with vision_from the tower stays frozen,
as Flamingo's).

  zoo train --config experiments/vlm_mid_shapes.py:vision_from=workdirs/clip_shapes \
    --workdir workdirs/vlm_mid_clip
"""

from zoo import config as zoo_config
from zoo import models
from zoo import sharding
from zoo.tasks import vlm as vlm_task

ConfigDict = zoo_config.ConfigDict


def get_config(arg=None, fusion='mid'):
  arg = zoo_config.parse_arg(
      arg, smoke=False, fusion=fusion, objective='vqa', builder_config='', types='',
      attention='full', window=1, block=16, rank=16, reduce='none', reduce_from=1,
      prune_keep=0.5, merge_r=0, resampler=0, cross_every=2, steps=0, batch=0, lr=1e-3,
      init='', vision_from='', lock_vision=True)
  zoo_config.check_choice(arg.objective, ('vqa', 'caption'), 'experiment argument objective')
  config = ConfigDict()
  config.seed = 0
  config.data = ConfigDict(dict(
      name='shapes', data_dir=None, resolution=32, image_key='image', label_key='',
      builder_config=arg.builder_config or ('tiny32' if arg.smoke else 'res32'),
      train_split='train', eval_split='validation', features=()))
  if arg.objective == 'vqa':
    config.data.qa = ConfigDict(dict(tokenizer='shapes', tokenizer_path='', max_len=20,
                                     types=tuple(t for t in arg.types.split('+') if t)))
  else:
    config.data.text = ConfigDict(dict(caption_key='captions', tokenizer='shapes',
                                       tokenizer_path='', max_len=28))
  config.model = models.config(
      'vlm', preset='tiny', fusion=arg.fusion, max_len=36, attention=arg.attention,
      window=arg.window, block=arg.block, rank=arg.rank, reduce=arg.reduce,
      reduce_from=arg.reduce_from, prune_keep=arg.prune_keep, merge_r=arg.merge_r,
      resampler_latents=arg.resampler, cross_every=arg.cross_every)
  # Until the source run exists the config loads with the preset's tower; building the task
  # then names the missing run.
  if arg.vision_from and zoo_config.existing_run_config(arg.vision_from) is not None:
    config.model.update(vlm_task.vision_config(arg.vision_from, 'experiment argument vision_from'))
  config.task = ConfigDict(dict(name='vlm', objective=arg.objective,
                                max_new=6 if arg.objective == 'vqa' else 8, beams=4,
                                pretrained_from=arg.init, vision_from=arg.vision_from,
                                lock_vision=arg.lock_vision and bool(arg.vision_from)))
  steps = arg.steps or (20 if arg.smoke else 6000)
  config.train = ConfigDict(dict(
      steps=steps, batch_size=arg.batch or (16 if arg.smoke else 64), grad_accum=1,
      log_every=5 if arg.smoke else 100, checkpoint_every=10 if arg.smoke else 500,
      eval_every=0 if arg.smoke else 1000, max_to_keep=1, async_checkpointing=True,
      progress_bar=not arg.smoke))
  config.optim = ConfigDict(dict(
      name='adamw', lr=arg.lr, schedule='cosine', warmup_steps=2 if arg.smoke else 200,
      end_lr_factor=0.05, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0,
      ema_decay=0.9 if arg.smoke else 0.999))
  config.evals = ConfigDict()
  kind = 'vqa' if arg.objective == 'vqa' else 'caption_bleu'
  config.evals[kind] = ConfigDict(dict(
      type=kind, split='test', num_examples=16 if arg.smoke else 200,
      batch_size=16 if arg.smoke else 256, use_ema=True, decoding='greedy'))
  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = ConfigDict(sharding.DEFAULT_RULES)
  config.init_from = ''
  return config
