"""Keyword scoring, the evaluation sets and metrics, the before/after report."""
