"""Question/answer pairs about a scene: at most one of each type, all answerable from labels.

Types and templates ('the X' names an object by colour and shape):
  count      'How many shapes are there?' / 'How many circles are there?' -> '0'..'4'
  colour     'What colour is the star?' (the star is the only star)      -> 'red'
  shape      'What shape is the red object?'                              -> 'star'
  position   'Is the X left of the Y?' (or right of, above, below, in front of, behind)
                                                                          -> 'yes' / 'no'
  exists     'Is there a green circle?'                                   -> 'yes' / 'no'
  read_text  'What does the sign say?'                                    -> 'STOP'
  two_hop    'What colour is the shape left of the star?' / 'What shape is the object behind the X?'
Questions whose answer would be ambiguous (see `relations`) are never asked. Outside the
held_out split, 'exists' never names a held-out composition.
"""

import numpy as np

from data.shapes import grammar
from data.shapes import relations

QUESTION_TYPES = ('count', 'colour', 'shape', 'position', 'exists', 'read_text', 'two_hop')
_POSITION_RELATIONS = ('left of', 'right of', 'above', 'below', 'in front of', 'behind')


def plural(shape: str) -> str:
  """'circles', 'crosses'."""
  return shape + ('es' if shape.endswith('s') else 's')


def _pick(rng: np.random.Generator, items: list):
  return items[rng.integers(len(items))] if items else None


def _count(facts, rng, spec):
  objs = facts.objects
  if rng.random() < 0.5:
    return 'How many shapes are there?', str(len(objs))
  shape = _pick(rng, list(spec.shapes))
  return f'How many {plural(shape)} are there?', str(sum(o.shape == shape for o in objs))


def _unique_shape(facts, k: int) -> bool:
  return sum(o.shape == facts.objects[k].shape for o in facts.objects) == 1


def _colour(facts, rng, spec):
  k = _pick(rng, [k for k in range(len(facts.objects)) if _unique_shape(facts, k)])
  if k is None:
    return None
  return f'What colour is the {facts.objects[k].shape}?', facts.objects[k].colour


def _shape(facts, rng, spec):
  o = _pick(rng, list(facts.objects))
  return f'What shape is the {o.colour} object?', o.shape


def _position(facts, rng, spec):
  n = len(facts.objects)
  triples = [(i, rel, j) for i in range(n) for j in range(n) if i != j
             for rel in _POSITION_RELATIONS]
  yes = [t for t in triples if facts.holds(*t)]
  no = [t for t in triples if facts.clearly_not(*t)]
  answer = 'yes' if yes and (not no or rng.random() < 0.5) else 'no'
  triple = _pick(rng, yes if answer == 'yes' else no)
  if triple is None:
    return None
  i, rel, j = triple
  return f'Is {facts.objects[i].phrase()} {rel} {facts.objects[j].phrase()}?', answer


def _exists(facts, rng, spec, held_out):
  present = {(o.shape, o.colour) for o in facts.objects}
  candidates = spec.seen_pairs()
  if held_out:
    candidates = [(s, c) for s in spec.shapes for c in spec.colours]
  absent = [p for p in candidates if p not in present]
  if absent and rng.random() < 0.5:
    shape, colour = _pick(rng, absent)
    answer = 'no'
  else:
    o = _pick(rng, list(facts.objects))
    shape, colour, answer = o.shape, o.colour, 'yes'
  return f'Is there {grammar.with_article("a", f"{colour} {shape}")}?', answer


def _read_text(facts, rng, spec):
  sign = facts.scene.sign
  return ('What does the sign say?', sign.word) if sign is not None else None


def _anchor_phrase(facts, k: int) -> str:
  o = facts.objects[k]
  return f'the {o.shape}' if _unique_shape(facts, k) else o.phrase()


def _two_hop(facts, rng, spec):
  n = len(facts.objects)
  found = [(rel, k, facts.unique_partner(rel, k)) for k in range(n) for rel in _POSITION_RELATIONS]
  rel, anchor, target = _pick(rng, [f for f in found if f[2] is not None]) or (None, None, None)
  if rel is None:
    return None
  if rng.random() < 0.5:
    question = f'What colour is the shape {rel} {_anchor_phrase(facts, anchor)}?'
    return question, facts.objects[target].colour
  question = f'What shape is the object {rel} {_anchor_phrase(facts, anchor)}?'
  return question, facts.objects[target].shape


def questions(facts: relations.Facts, rng: np.random.Generator, spec: grammar.SceneSpec,
              held_out: bool) -> tuple[list[str], list[str], list[str]]:
  """(questions, answers, types): one question per type the scene can answer, in type order."""
  makers = {'count': _count, 'colour': _colour, 'shape': _shape, 'position': _position,
            'exists': lambda f, r, s: _exists(f, r, s, held_out), 'read_text': _read_text,
            'two_hop': _two_hop}
  qs, answers, types = [], [], []
  for qtype in QUESTION_TYPES:
    qa = makers[qtype](facts, rng, spec)
    if qa is not None:
      qs.append(qa[0])
      answers.append(qa[1])
      types.append(qtype)
  return qs, answers, types
