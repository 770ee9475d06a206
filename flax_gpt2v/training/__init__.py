"""The trainer: its options described once (options), the jitted steps and the one eval loop (steps),
the device mesh (sharding), joining a multi-host run (cluster: launcher, process, GPUs), the loop of
named phases (trainer), what a run writes (run_files) and what keeps it whole (run_guard: lock,
signals; run_checkpoints: verified checkpoints), reporting, starting from a pretrained checkpoint,
the original's experiment files, and the lm-evaluation-harness model (harness: run at each evaluation
with eval_harness_tasks, and by eval_jax.py --tasks).

May import: config, models, hf, data. Never evaluation.
"""
