"""Evaluation and benchmarks (quality, speed)."""
