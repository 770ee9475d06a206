"""Import a Hugging Face directory (GPT-2 or a variant, in any published layout) as a native checkpoint.

    python convert/from_torch.py SRC DST [--force]
"""
import os
import sys

# Run as a script from a checkout: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax_gpt2v.cli import ArgumentParser, run_cli  # noqa: E402
from flax_gpt2v.hf.checkpoint import import_hf  # noqa: E402


def _main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="Hugging Face directory: config.json + model.safetensors, pytorch_model.bin "
                                    "or a sharded index (see README, Conversion)")
    parser.add_argument("dst", help="native checkpoint directory to write")
    parser.add_argument("--force", action="store_true",
                        help="replace the files a previous conversion wrote in DST (nothing else there is touched)")
    args = parser.parse_args(argv)
    files = import_hf(args.src, args.dst, force=args.force)
    print(f"wrote {args.dst} with weights in float32: {', '.join(files)}")
    return 0


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
