"""Demo cohorts built from real data shipped with installed packages (no downloads)."""
