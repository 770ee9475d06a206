"""Export a native flax_gpt2v checkpoint as a Hugging Face directory (docs/export.md).

    python convert/to_torch.py SRC DST [--dtype float32|bfloat16] [--force]
"""
import sys

from flax_gpt2v.cli.convert import to_torch as main

if __name__ == "__main__":
    sys.exit(main())
