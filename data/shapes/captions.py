"""Templated captions: four paraphrases of a scene, each checkable against its labels.

  0 inventory  'A large red circle and a small blue star from left to right, on a striped
               background.'
  1 relations  'The red circle is left of the blue star. The blue star is in front of the red
               circle.' (at most two statements)
  2 counts     'Two shapes: a red circle and a blue star. A person raising one arm. A sign says
               "GO".'
  3 subject    'A picture of a large red circle and 1 other shape, with a person.'

Objects are named by colour and shape (colours are unique within a scene); the subject
of caption 3 is the labelled object (largest, then nearest). Relations are only stated
when unambiguous (see `relations`).
"""

import numpy as np

from data.shapes import grammar
from data.shapes import pose
from data.shapes import relations

NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four')
BACKGROUND_PHRASES = {'plain': 'a plain grey background', 'stripes': 'a striped background',
                      'checker': 'a checkered background'}
POSE_PHRASES = ('with arms down', 'raising one arm', 'raising both arms')


def join(items: list[str]) -> str:
  """'a', 'a and b', 'a, b and c'."""
  return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' and ' + items[-1]


def _sentence(text: str) -> str:
  return text[0].upper() + text[1:]


def _inventory(scene: grammar.Scene) -> str:
  ordered = sorted(scene.objects, key=lambda o: o.x)
  where = ' from left to right,' if len(ordered) > 1 else ''
  return _sentence(f'{join([o.phrase("a", size=True) for o in ordered])}{where} on '
                   f'{BACKGROUND_PHRASES[scene.background.kind]}.')


def _relations(facts: relations.Facts, rng: np.random.Generator) -> str:
  objs = facts.objects
  if len(objs) == 1:
    return f'There is only one shape: {objs[0].phrase("a", size=True)}.'
  true = facts.true_relations()
  if not true:
    return f'The shapes are close together: {join([o.phrase("a") for o in objs])}.'
  picked, pairs = [], set()
  for k in rng.permutation(len(true)):
    i, rel, j = true[k]
    if frozenset((i, j)) not in pairs and len(picked) < 2:
      pairs.add(frozenset((i, j)))
      picked.append(_sentence(f'{objs[i].phrase()} is {rel} {objs[j].phrase()}.'))
  return ' '.join(picked)


def person_phrase(person: grammar.Person) -> str:
  """'a person raising one arm' etc., from the wrists' height against the shoulders."""
  return f'a person {POSE_PHRASES[pose.raised_arms(person.array())]}'


def _counts(scene: grammar.Scene) -> str:
  n = len(scene.objects)
  parts = [_sentence(f'{NUMBER_WORDS[n]} shape{"s" if n > 1 else ""}: '
                     f'{join([o.phrase("a") for o in scene.objects])}.')]
  if scene.person is not None:
    parts.append(_sentence(f'{person_phrase(scene.person)}.'))
  if scene.sign is not None:
    parts.append(f'A sign says "{scene.sign.word}".')
  return ' '.join(parts)


def _subject(scene: grammar.Scene) -> str:
  subject = scene.subject()
  others = len(scene.objects) - 1
  text = f'A picture of {subject.phrase("a", size=True)}'
  if others:
    text += f' and {others} other shape{"s" if others > 1 else ""}'
  extras = [w for w, present in (('a person', scene.person), ('a sign', scene.sign)) if present]
  if extras:
    text += ', with ' + join(extras)
  return text + '.'


def captions(facts: relations.Facts, rng: np.random.Generator) -> list[str]:
  """The four captions of `facts.scene`; rng picks which relations caption 1 states."""
  scene = facts.scene
  return [_inventory(scene), _relations(facts, rng), _counts(scene), _subject(scene)]
