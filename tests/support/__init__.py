"""Test infrastructure shared by tests and benchmarks: real servers on loopback."""
