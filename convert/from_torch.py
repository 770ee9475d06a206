"""Import a Hugging Face directory (GPT-2 or a variant, in any published layout) as a native checkpoint.

    python convert/from_torch.py SRC DST [--force]
"""
import sys

from flax_gpt2v.cli.convert import from_torch as main

if __name__ == "__main__":
    sys.exit(main())
