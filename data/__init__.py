"""Datasets (TFDS builders) and the input pipeline that feeds the training loop."""

from data.pipeline import BUILTINS, Batches, check_config, component_config, get_dataset

__all__ = ['BUILTINS', 'Batches', 'check_config', 'component_config', 'get_dataset']
