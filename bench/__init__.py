"""Benchmarks of the persistence layer against their baselines (issue 4).

Run from the repository root: `.venv/bin/python -m bench [--quick] [--only credits,http]`.
"""
