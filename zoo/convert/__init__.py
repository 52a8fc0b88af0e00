"""Public PyTorch checkpoints (as name -> array dicts, e.g. from safetensors) to zoo params."""
