"""Benchmarks: timing (CUDA events on GPU), cases, tables and plots."""
