"""TFDS dataset `shapes`: procedural scenes with captions, masks, depth, pose, VQA and text.

Modules: `grammar` (vocabularies, the scene description), `sampling` (random scenes),
`pose` (stick-figure joints), `geometry` (aliased rasterisers), `render` (scene -> image
and maps), `relations`, `captions` and `questions` (language from a scene), `generate`
(one example from (split, index)), `shapes_dataset_builder` (the TFDS builder), `score`
(pixel-level scorers), `show` (a PNG grid) and `measure` (build speed, scorer accuracy).
Nothing here imports TensorFlow.
"""
