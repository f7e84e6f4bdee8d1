"""Benchmarks and claim reproductions: ``python -m benchmarks.<name>`` scripts and the ``make bench`` suite."""
