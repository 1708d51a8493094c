"""Tools over runs: fault drills, the Optuna search, run comparison and sweep summaries."""
