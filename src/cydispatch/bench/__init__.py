"""Benchmarks: drive wrk against every mode side by side."""
