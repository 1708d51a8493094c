"""The safety system's plain parts: collapse detectors, guard events, buffered per-step statistics."""
