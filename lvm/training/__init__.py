"""A training run: config validation, building the trainer and callbacks from config, the run's life from start to results.json."""
