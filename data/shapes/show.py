"""Writes a PNG grid of shapes examples beside their maps and captions.

  python -m data.shapes.show --out /tmp/shapes_grid.png [--resolution 64] [--split train] [--num 8]

Each row: image | semantic mask | instance mask | depth (near = bright) | skeleton | the
first caption and the first question with its answer. Examples come straight from the
generator (the same content a build stores), so nothing needs to be built first.
"""

import argparse
import textwrap

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from data import conditions
from data.shapes import generate
from data.shapes import grammar
from data.shapes import pose
from zoo import files

_TEXT_WIDTH = 420
_HEADERS = ('image', 'semantic', 'instance', 'depth', 'skeleton')


def panels(example: dict) -> list[np.ndarray]:
  """The image and its maps as uint8 RxRx3 pictures."""
  depth = 255 - example['depth']
  return [
      example['image'],
      conditions.palette(len(grammar.SEMANTIC_CLASSES))[example['semantic_mask']],
      conditions.palette(grammar.PERSON_INSTANCE)[example['instance_mask']],
      np.repeat(depth[..., None], 3, axis=-1),
      conditions.palette(len(pose.LIMBS))[example['skeleton']],
  ]


def _text_panel(example: dict, height: int, font) -> PIL.Image.Image:
  panel = PIL.Image.new('RGB', (_TEXT_WIDTH, height), (255, 255, 255))
  draw = PIL.ImageDraw.Draw(panel)
  lines = textwrap.wrap(example['captions'][0], 56)
  if example['questions']:
    lines += textwrap.wrap(f'Q: {example["questions"][0]}  A: {example["answers"][0]}', 56)
  for i, line in enumerate(lines):
    draw.text((6, 6 + 14 * i), line, fill=(0, 0, 0), font=font)
  return panel


def grid(examples: list[dict], cell: int = 128) -> PIL.Image.Image:
  """One row per example: five upscaled panels and a text panel, under a header row."""
  font = PIL.ImageFont.load_default()
  header = 18
  size = (5 * cell + _TEXT_WIDTH, header + cell * len(examples))
  out = PIL.Image.new('RGB', size, (255, 255, 255))
  draw = PIL.ImageDraw.Draw(out)
  for k, name in enumerate(_HEADERS + ('first caption, first question',)):
    draw.text((k * cell + 4, 3), name, fill=(0, 0, 0), font=font)
  for row, example in enumerate(examples):
    y = header + row * cell
    for k, picture in enumerate(panels(example)):
      big = PIL.Image.fromarray(picture).resize((cell, cell), PIL.Image.Resampling.NEAREST)
      out.paste(big, (k * cell, y))
    out.paste(_text_panel(example, cell, font), (5 * cell, y))
  return out


def main(argv=None) -> None:
  """CLI entry point."""
  parser = argparse.ArgumentParser(prog='python -m data.shapes.show',
                                   description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='PNG path to write')
  parser.add_argument('--resolution', type=int, default=64)
  parser.add_argument('--split', default='train', choices=generate.SPLITS)
  parser.add_argument('--num', type=int, default=8)
  parser.add_argument('--start', type=int, default=0, help='index of the first example')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--cell', type=int, default=128, help='panel size in pixels')
  args = parser.parse_args(argv)
  try:
    spec = generate.GenSpec(resolution=args.resolution, seed=args.seed,
                            sizes=(args.start + args.num,) * len(generate.SPLITS))
  except ValueError as e:
    parser.error(str(e))
  examples = [generate.make_example(spec, args.split, args.start + i) for i in range(args.num)]
  with files.atomic_path(args.out) as tmp:
    grid(examples, args.cell).save(tmp, format='PNG')
  print(args.out)


if __name__ == '__main__':
  main()
