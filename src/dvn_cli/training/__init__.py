"""Training: the multi-task loop, its resume state, precision and data-parallel helpers."""
