"""Benchmarks: `python -m lvm.bench` (CPU loops, data path, 5CAT rate) and `python -m lvm.bench.gpu`."""
