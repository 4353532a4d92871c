"""Datasets: the registry of tasks held in memory, batches and augmentation, offline preparation."""
