"""Train a model: `python train_jax.py --config configs/X.json [--key value ...]` (`flax-gpt2v-train`).

`--check [--target h100] [--devices N]` compiles the run's train step (for N devices of the target, which
need not be here: the mesh's by default) and reports its peak memory, attention kernel, collectives and
FLOPs; a step that does not fit is refused in one line. Nothing is trained, no data is read.

Any config key can be overridden (`--max_steps 40`, `--output_dir runs/demo`,
`--mesh.fsdp 4`); values are parsed as JSON when possible, and `--key null`
removes a key (its default applies). Rerunning with the
same output_dir resumes from its last checkpoint. See flax_gpt2v/training/trainer.py.
"""
import sys

from flax_gpt2v.errors import run_cli


def help_text() -> str:
    from flax_gpt2v.training.options import IGNORED_KEYS, SECTIONS

    lines = [f"usage: python train_jax.py (or flax-gpt2v-train) --config FILE [--KEY VALUE ...]\n\n{__doc__.split(chr(10), 1)[1].strip()}"]
    for title, rows in SECTIONS:
        heading = f"{title} (--KEY DEFAULT, then what it does)" if title == "trainer options" else title
        lines += [f"\n{heading}:", *(f"  --{key} {shown}\n      {meaning}" for key, shown, meaning in rows)]
    return "\n".join(lines + [
        "\nmodel keys (model_type, n_layer, n_embd, ...; README, docs/gpt2.md, docs/variants) are overridden the same way.",
        "--KEY null removes KEY from the config, so that its default applies (e.g. --dataset null).",
        "accepted, no effect here (named once in the log): " + ", ".join(sorted(IGNORED_KEYS)),
    ])


def _main(argv: list[str]) -> int:
    from flax_gpt2v.training.run_guard import RunStopped
    from flax_gpt2v.training.options import parse_cli
    from flax_gpt2v.training.trainer import train

    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    check = "--check" in argv
    argv = [a for a in argv if a != "--check"]
    config, overrides = parse_cli(argv)
    if check:
        from flax_gpt2v.evaluation.aot import check_run
        target, count = overrides.pop("target", None), overrides.pop("devices", None)
        return check_run(config, overrides, target, count)
    try:
        train(config, overrides, exit_at_once=True)
    except RunStopped as e:  # a signal (128 + its number) or divergence (3): the run can be resumed
        print(str(e), file=sys.stderr)
        return e.status
    return 0


def main(argv: list[str] | None = None) -> int:
    from flax_gpt2v.training.run_guard import StopSignals

    # From here on, while the config is read and devices start, a signal exits at once in one line too;
    # train() takes over with its own for the run.
    signals = StopSignals()
    signals.install()
    try:
        return run_cli(_main, sys.argv[1:] if argv is None else argv)
    finally:
        signals.restore()
