"""Fake destination servers on loopback, for tests and benchmarks."""
