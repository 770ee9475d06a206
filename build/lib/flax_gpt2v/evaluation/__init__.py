"""Measuring models: metrics of a checkpoint, comparison of runs, sampling, and the throughput benchmark
with its profiles.

May import: config, models, hf, data, training (its steps and mesh, never its loop).
"""
