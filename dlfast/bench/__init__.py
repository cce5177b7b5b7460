"""Benchmarks of dlfast's ops against their peers, behind `python -m dlfast bench`."""
