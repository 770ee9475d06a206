"""Measuring models: metrics of a checkpoint, comparison of runs, sampling, and the throughput benchmark
with its profiles.

May import: config, models, hf, data, training (its options, steps, mesh and run files; never its loop, trainer.py).
"""
