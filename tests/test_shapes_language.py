"""Shapes captions and questions, parsed back and checked against relations recomputed from labels.

Every stated relation must hold and every answer must follow from the stored labels alone.
"""

import collections
import re

import numpy as np

from data.shapes import generate
from data.shapes import geometry
from data.shapes import grammar
from data.shapes import questions
from data.shapes import relations

SPEC = generate.GenSpec(resolution=32, sizes=(120, 0, 0, 40))
SIZE = '|'.join(grammar.SIZES)
COLOUR = '|'.join(grammar.COLOUR_NAMES)
SHAPE = '|'.join(grammar.SHAPES)
REL = '|'.join(relations.RELATIONS)
NUMBERS = ('zero', 'one', 'two', 'three', 'four')
BACKGROUND = {'plain': 'a plain grey background', 'stripes': 'a striped background',
              'checker': 'a checkered background'}


class Labels:
  """An example's objects with relations recomputed from the stored labels alone."""

  def __init__(self, example):
    o = example['objects']
    self.objs = [
        {'shape': s, 'colour': c, 'size': grammar.SIZES.index(z), 'x': float(xy[0]),
         'y': float(xy[1]), 'depth': int(d)}
        for s, c, z, xy, d in zip(o['shape'], o['colour'], o['size'], o['center'], o['depth'])]
    radii = [grammar.SIZE_RADIUS[z] for z in o['size']]
    masks = [geometry.shape_mask(a['shape'], a['x'], a['y'], r, 64)
             for a, r in zip(self.objs, radii)]
    self.overlap = [[(m & n).sum() >= relations.MIN_OVERLAP for n in masks] for m in masks]

  def by_colour(self, colour):
    return next(k for k, a in enumerate(self.objs) if a['colour'] == colour)

  def holds(self, i, rel, j):
    a, b = self.objs[i], self.objs[j]
    m = relations.MARGIN
    return {'left of': b['x'] - a['x'] > m, 'right of': a['x'] - b['x'] > m,
            'above': b['y'] - a['y'] > m, 'below': a['y'] - b['y'] > m,
            'bigger than': a['size'] > b['size'], 'smaller than': a['size'] < b['size'],
            'in front of': self.overlap[i][j] and a['depth'] < b['depth'],
            'behind': self.overlap[i][j] and a['depth'] > b['depth']}[rel]

  def clearly_not(self, i, rel, j):
    a, b = self.objs[i], self.objs[j]
    spatial = {'left of': a['x'] >= b['x'], 'right of': a['x'] <= b['x'],
               'above': a['y'] >= b['y'], 'below': a['y'] <= b['y']}
    return spatial[rel] if rel in spatial else not self.holds(i, rel, j)

  def ref(self, phrase):
    """Index of the object 'the COLOUR SHAPE' or 'the SHAPE' (asserting it is unique)."""
    words = phrase.split()
    hits = [k for k, a in enumerate(self.objs)
            if words[-1] == a['shape'] and (len(words) == 1 or words[0] == a['colour'])]
    assert len(hits) == 1, phrase
    return hits[0]


def _examples():
  for split in ('train', 'held_out'):
    for i in range(SPEC.size(split)):
      yield split, generate.make_example(SPEC, split, i)


EXAMPLES = list(_examples())


def _objects_in(text, with_size):
  size = f'({SIZE}) ' if with_size else ''
  pattern = rf'\ban? {size}({COLOUR}) ({SHAPE})\b'
  return re.findall(pattern, text)


def _described(a):
  return grammar.SIZES[a['size']], a['colour'], a['shape']


def _raised_arms(kp):
  return int(kp[4, 1] < kp[2, 1]) + int(kp[7, 1] < kp[5, 1])


def test_captions_state_only_what_the_labels_say():
  for _, example in EXAMPLES:
    _check_captions(example)


def _check_captions(example):
  lab = Labels(example)
  objs, n = lab.objs, len(lab.objs)
  inventory, rels, counts, subject = example['captions']
  by_x = sorted(objs, key=lambda a: a['x'])
  assert _objects_in(inventory.lower(), True) == [_described(a) for a in by_x]
  assert inventory.endswith(f'on {BACKGROUND[example["background"]]}.')
  statements = re.findall(rf'The ({COLOUR}) ({SHAPE}) is ({REL}) the ({COLOUR}) ({SHAPE})\.', rels)
  assert rels.count('.') == len(statements) or n == 1 or rels.startswith('The shapes are close')
  for c1, s1, rel, c2, s2 in statements:
    i, j = lab.by_colour(c1), lab.by_colour(c2)
    assert (objs[i]['shape'], objs[j]['shape']) == (s1, s2) and lab.holds(i, rel, j), (rel, objs)
  if rels.startswith('The shapes are close'):
    assert not any(lab.holds(i, r, j) for i in range(n) for j in range(n) if i != j
                   for r in relations.RELATIONS)
  assert counts.startswith(f'{NUMBERS[n].capitalize()} shape')
  listed = collections.Counter(_objects_in(counts.lower(), False))
  assert listed == collections.Counter((a['colour'], a['shape']) for a in objs)
  person = example['pose_visibility'].any()
  phrases = ('with arms down', 'raising one arm', 'raising both arms')
  assert ('A person' in counts) == person == (', with a person' in subject)
  if person:
    assert f'A person {phrases[_raised_arms(example["pose_keypoints"])]}.' in counts
  sign = bool(example['word'])
  assert (f'A sign says "{example["word"]}".' in counts) == sign == ('a sign' in subject)
  best = min(objs, key=lambda a: (-a['size'], a['depth']))
  assert _objects_in(subject.lower(), True)[0] == _described(best)
  assert grammar.SHAPES[example['label']] == best['shape']
  assert (f'and {n - 1} other shape' in subject) == (n > 1)


def _answer(lab, example, question, qtype):
  """The answer recomputed from labels, or None if the question does not parse as its type."""
  objs, n = lab.objs, len(lab.objs)
  patterns = {
      'count': r'How many (\w+) are there\?',
      'colour': rf'What colour is the ({SHAPE})\?',
      'shape': rf'What shape is the ({COLOUR}) object\?',
      'position': rf'Is the ({COLOUR}) ({SHAPE}) ({REL}) the ({COLOUR}) ({SHAPE})\?',
      'exists': rf'Is there an? ({COLOUR}) ({SHAPE})\?',
      'read_text': r'What does the sign say\?',
      'two_hop': (rf'What (colour|shape) is the (?:shape|object) ({REL}) '
                  rf'the ((?:(?:{COLOUR}) )?(?:{SHAPE}))\?'),
  }
  m = re.fullmatch(patterns[qtype], question)
  if m is None:
    return None
  g = m.groups()
  if qtype == 'count':
    plurals = {s + ('es' if s.endswith('s') else 's'): s for s in grammar.SHAPES}
    assert g[0] == 'shapes' or g[0] in plurals, question
    return str(n if g[0] == 'shapes' else sum(a['shape'] == plurals[g[0]] for a in objs))
  if qtype == 'colour':
    return objs[lab.ref(g[0])]['colour']
  if qtype == 'shape':
    return objs[lab.by_colour(g[0])]['shape']
  if qtype == 'position':
    i, j = lab.by_colour(g[0]), lab.by_colour(g[3])
    assert lab.holds(i, g[2], j) or lab.clearly_not(i, g[2], j), question
    return 'yes' if lab.holds(i, g[2], j) else 'no'
  if qtype == 'exists':
    return 'yes' if any((a['colour'], a['shape']) == g for a in objs) else 'no'
  if qtype == 'read_text':
    return example['word']
  anchor = lab.ref(g[2])
  others = [k for k in range(n) if k != anchor]
  hits = [k for k in others if lab.holds(k, g[1], anchor)]
  assert len(hits) == 1, question
  assert all(lab.clearly_not(k, g[1], anchor) for k in others if k != hits[0]), question
  return objs[hits[0]][g[0]]


def test_answers_follow_from_the_labels():
  for _, example in EXAMPLES:
    lab = Labels(example)
    types = example['question_types']
    assert types == [t for t in questions.QUESTION_TYPES if t in types]
    assert {'count', 'shape', 'exists'} <= set(types)
    assert ('read_text' in types) == bool(example['word'])
    for question, answer, qtype in zip(example['questions'], example['answers'], types):
      assert _answer(lab, example, question, qtype) == answer, (question, answer, lab.objs)


def test_every_question_type_and_relation_occurs():
  types = collections.Counter(t for _, e in EXAMPLES for t in e['question_types'])
  assert set(types) == set(questions.QUESTION_TYPES)
  text = ' '.join(c for _, e in EXAMPLES for c in e['captions'] + e['questions'])
  for rel in relations.RELATIONS:
    assert f' {rel} the ' in text, rel
  answers = collections.Counter(a for _, e in EXAMPLES
                                for a, t in zip(e['answers'], e['question_types'])
                                if t in ('position', 'exists'))
  assert answers['yes'] > 10 and answers['no'] > 10
  assert np.mean([len(e['objects']['shape']) for _, e in EXAMPLES]) > 2.0
