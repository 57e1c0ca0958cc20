"""Benchmarks: plain scripts (``python -m bench.overhead``, ``python -m bench.hang_rate``)."""
