r"""LiT on the shapes scenes: a locked, supervised image tower and a text tower trained to match it.

The image tower is a ViT classifier trained on the 64 shape x colour classes of the one-object
scenes (`shapes_classifier.py:model=vit`; it has the architecture of clip_shapes.py's tower).
Its params are loaded, frozen by the optimizer mask and not differentiated through; the text
tower and the projections learn with CLIP's softmax loss on the full scenes' captions, as in
clip_shapes.py, with the same evaluators.

  zoo train --config experiments/shapes_classifier.py:model=vit --workdir workdirs/shapes_vit
  zoo train --config experiments/lit_shapes.py --workdir workdirs/lit_shapes
  zoo train --config experiments/lit_shapes.py:smoke=True,image_from=/tmp/vit_smoke --workdir /tmp/lit_smoke

Arguments: those of clip_shapes.py, plus image_from (the ViT classifier run; default
workdirs/shapes_vit).
"""

from zoo import config as zoo_config

clip_shapes = zoo_config.sibling(__file__, 'clip_shapes')


def get_config(arg=None):
  arg = zoo_config.parse_arg(arg, **clip_shapes.ARGS, image_from='workdirs/shapes_vit')
  config = clip_shapes.make(arg, kind='clip', loss='softmax')
  config.task.image_from = arg.image_from
  config.task.image_subtree = ''
  config.task.lock_image = True
  return config
