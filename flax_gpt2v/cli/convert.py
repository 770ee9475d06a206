"""The converters: a native checkpoint to a Hugging Face directory (docs/export.md), and a Hugging
Face directory (GPT-2 or a variant, in any published layout) to a native checkpoint.

    python convert/to_torch.py SRC DST [--dtype float32|bfloat16] [--force]    (flax-gpt2v-to-torch)
    python convert/from_torch.py SRC DST [--force]                             (flax-gpt2v-from-torch)
"""
from __future__ import annotations

import argparse

from flax_gpt2v.errors import ArgumentParser, run_cli
from flax_gpt2v.hf.checkpoint import EXPORT_DTYPES, export_hf, import_hf

_FORCE_HELP = "replace the files a previous conversion wrote in DST (nothing else there is touched)"


def _parser(description: str, src: str, dst: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument("src", help=src)
    parser.add_argument("dst", help=dst)
    parser.add_argument("--force", action="store_true", help=_FORCE_HELP)
    return parser


def _to_torch(argv=None) -> int:
    parser = _parser("Export a native flax_gpt2v checkpoint as a Hugging Face directory (docs/export.md).",
                     "native checkpoint directory", "Hugging Face directory to write")
    parser.add_argument("--dtype", choices=EXPORT_DTYPES, default="float32", help="weight dtype written")
    args = parser.parse_args(argv)
    result = export_hf(args.src, args.dst, dtype=args.dtype, force=args.force)
    print(f"wrote {args.dst} with weights in {result['dtype']}: {', '.join(result['files'])}")
    return 0


def _from_torch(argv=None) -> int:
    args = _parser("Import a Hugging Face directory (GPT-2 or a variant, in any published layout) as a native "
                   "checkpoint.",
                   "Hugging Face directory: config.json + model.safetensors, pytorch_model.bin or a sharded "
                   "index (see README, Conversion)", "native checkpoint directory to write").parse_args(argv)
    files = import_hf(args.src, args.dst, force=args.force)
    print(f"wrote {args.dst} with weights in float32: {', '.join(files)}")
    return 0


def to_torch(argv=None) -> int:
    return run_cli(_to_torch, argv)


def from_torch(argv=None) -> int:
    return run_cli(_from_torch, argv)
