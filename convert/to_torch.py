"""Export a native flax_gpt2v checkpoint as a Hugging Face directory (SPEC 7).

    python convert/to_torch.py SRC DST [--dtype float32|bfloat16] [--force]
"""
import argparse
import os
import sys

# Run as a script from a checkout: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax_gpt2v.checkpoint import EXPORT_DTYPES, export_hf  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="native checkpoint directory")
    parser.add_argument("dst", help="Hugging Face directory to write")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32", help="weight dtype written")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)
    try:
        result = export_hf(args.src, args.dst, dtype=args.dtype, force=args.force)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} with weights in {result['dtype']}: {', '.join(result['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
