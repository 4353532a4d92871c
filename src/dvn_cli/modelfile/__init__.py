"""Model files: the safetensors container, checkpoints, compact models and bundles behind one reader."""
