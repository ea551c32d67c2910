"""Benchmarks of the router and the engines: `python -m benchmarks.<name>` (see benchmarks/README.md)."""
