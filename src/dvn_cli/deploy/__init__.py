"""Deployment: compact plain models of one (task, level) and exported files with a manifest."""
