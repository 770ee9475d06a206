"""Export a native flax_gpt2v checkpoint as a Hugging Face directory (docs/export.md).

    python convert/to_torch.py SRC DST [--dtype float32|bfloat16] [--force]
"""
import os
import sys

# Run as a script from a checkout: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax_gpt2v.cli import ArgumentParser, run_cli  # noqa: E402
from flax_gpt2v.hf.checkpoint import EXPORT_DTYPES, export_hf  # noqa: E402


def _main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="native checkpoint directory")
    parser.add_argument("dst", help="Hugging Face directory to write")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32", help="weight dtype written")
    parser.add_argument("--force", action="store_true",
                        help="replace the files a previous conversion wrote in DST (nothing else there is touched)")
    args = parser.parse_args(argv)
    result = export_hf(args.src, args.dst, dtype=args.dtype, force=args.force)
    print(f"wrote {args.dst} with weights in {result['dtype']}: {', '.join(result['files'])}")
    return 0


def main(argv=None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
