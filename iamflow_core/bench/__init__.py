"""Benchmarks that print numbers (full-size models, random weights). Never part of the timed test suite."""
