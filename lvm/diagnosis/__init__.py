"""Dataset diagnosis: what an article store can and cannot teach (statistics, report, CLI)."""
