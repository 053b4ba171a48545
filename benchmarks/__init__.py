"""Benchmarks: ours against a peer measured in the same run (see run.py)."""
