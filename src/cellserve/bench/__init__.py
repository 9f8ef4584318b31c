"""Benchmarks: commands that print a table and write JSON (never timed tests), their load generators,
workloads and plots."""
