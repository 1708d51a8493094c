"""Run infrastructure: run directories, atomic files, checkpoints, signals, threads, precision, launchers, errors, CLI conventions."""
