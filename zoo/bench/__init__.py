"""Benchmarks: scripts that print a table and write JSON (`python -m zoo.bench.<name>`)."""
