"""Import a Hugging Face directory (ours or the original's Hub format) as a native checkpoint.

    python convert/from_torch.py SRC DST [--force]
"""
import argparse
import os
import sys

# Run as a script from a checkout: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax_gpt2v.checkpoint import import_hf  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="Hugging Face directory (config.json + model.safetensors)")
    parser.add_argument("dst", help="native checkpoint directory to write")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        files = import_hf(args.src, args.dst, force=args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} with weights in float32: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
