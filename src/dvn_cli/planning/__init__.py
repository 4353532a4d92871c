"""Budgets and plans: which level of a task fits a budget, and levels for tasks that run at once."""
