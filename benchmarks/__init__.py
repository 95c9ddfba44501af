"""Speed, memory and quality measurements of the bundles (see benchmarks/run.py)."""
