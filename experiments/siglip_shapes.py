r"""SigLIP on the shapes scenes (RGB 32x32): the sigmoid loss, a MAP-pooled ViT, a bidirectional text
tower with last-token pooling; everything else as experiments/clip_shapes.py (same data, sizes,
schedule and evaluators), so the two runs compare the losses.

  zoo train --config experiments/siglip_shapes.py --workdir workdirs/siglip_shapes
  zoo train --config experiments/siglip_shapes.py:batch=32 --workdir workdirs/siglip_b32
  zoo train --config experiments/siglip_shapes.py:smoke=True --workdir /tmp/siglip_smoke

Arguments: those of clip_shapes.py, plus chunked (bool, default True: the sigmoid loss passes
the text embeddings around the devices of the data axes, so no device holds the global BxB
logits; on one device it is the dense loss).
"""

from zoo import config as zoo_config

clip_shapes = zoo_config.sibling(__file__, 'clip_shapes')


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, **clip_shapes.ARGS, chunked=True)
  config = clip_shapes.make(arg, kind='siglip', loss='sigmoid')
  config.task.chunked = arg.chunked
  return config
