"""Train a model: `python train_jax.py --config configs/X.json [--key value ...]`.

Any config key can be overridden (`--max_steps 40`, `--output_dir runs/demo`,
`--mesh.fsdp 4`); values are parsed as JSON when possible. Rerunning with the
same output_dir resumes from its last checkpoint. See flax_gpt2v/train.py.
"""
import sys

from flax_gpt2v.checkpoint import CheckpointError
from flax_gpt2v.config import ConfigError
from flax_gpt2v.train import parse_cli, train


def main(argv: list[str]) -> int:
    try:
        config, overrides = parse_cli(argv)
        train(config, overrides)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
