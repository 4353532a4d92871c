"""Evaluation and reports: accuracy and latency rows, file descriptions, CSV and plots."""
