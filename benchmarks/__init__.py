"""Benchmarks for gfcompile: `python -m benchmarks <suite> [--profile quick|full] [--out DIR]`.

Suites are registered in `benchmarks.suites`; see benchmarks/README.md. Nothing in the
project imports this package.
"""
