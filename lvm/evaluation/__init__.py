"""Evaluation: 5CAT, its metrics, gates, reference predictors (baselines) and report."""
