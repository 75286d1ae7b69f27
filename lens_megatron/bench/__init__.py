"""Benchmarks shipped with the library (entry points lens-bench, ...)."""
