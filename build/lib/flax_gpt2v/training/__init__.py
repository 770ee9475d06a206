"""The trainer: options, the jitted steps, the device mesh, the loop and what keeps a run whole
(lock, signals, verified checkpoints), reporting, starting from a pretrained checkpoint and the
original's experiment files.

May import: config, models, hf, data. Never evaluation.
"""
