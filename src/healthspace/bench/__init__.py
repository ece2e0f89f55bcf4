"""Benchmarks: each suite measures a figure and a baseline in the same run and reports their ratio."""
