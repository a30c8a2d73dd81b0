"""Benchmark world, mini SD2-architecture model, classifier and evaluation harness."""
