"""Errors as the user reads them: one line. The error contract of every command (train_jax.py,
eval_jax.py, convert/*, benchmark.py): an expected failure (bad config, data, checkpoint,
conversion, a path that is missing, unreadable or read-only) is one line `error: ...` on stderr and
exit status 2; anything else is a bug and keeps its traceback. Imports nothing of ours, so every
subpackage may import it.
"""
from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable, Sequence


def first_line(e: BaseException, *, with_type: bool = False) -> str:
    """The first line of e's message, for a one-line error that wraps it. Libraries put the cause first
    and details (tracebacks of their threads, long listings) after it; a trailing colon announced those.
    Without a message: e's type name; with_type puts the type name before the message too."""
    lines = str(e).strip().splitlines()
    text = lines[0].rstrip(":") if lines else ""
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if with_type else text


# The project's expected errors, by the module that defines each. A class is looked up only
# once its module is loaded (an error cannot come from a module never imported), so the
# converters do not import JAX through the data pipeline just to name DataError.
_EXPECTED = {"flax_gpt2v.config": "ConfigError", "flax_gpt2v.hf.files": "CheckpointError",
             "flax_gpt2v.hf.keymap": "ConversionError", "flax_gpt2v.data.common": "DataError",
             "flax_gpt2v.evaluation.evaluate": "EvalError", "flax_gpt2v.data.tokenizer": "TokenizerError",
             "flax_gpt2v.training.harness": "HarnessError", "flax_gpt2v.errors": "UsageError"}


# Failures of the filesystem as a whole, which name no file: full, over quota, read-only.
_FILESYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class UsageError(Exception):
    """Bad command-line arguments."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors follow the contract (argparse itself prints the usage too)."""

    def error(self, message):
        raise UsageError(message)


def positive(text: str) -> int:
    """An argparse type: an integer > 0 (a size or count of 0 would silently mean a default)."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def is_expected(e: BaseException) -> bool:
    """The project's errors, and OSErrors about the user's files: one naming a file, a full or
    read-only filesystem, or a "not found" raised with a message. Other OSErrors are bugs."""
    if isinstance(e, tuple(getattr(sys.modules[m], n) for m, n in _EXPECTED.items() if m in sys.modules)):
        return True
    return isinstance(e, OSError) and (e.filename is not None or e.errno in _FILESYSTEM_ERRNOS
                                       or (isinstance(e, FileNotFoundError) and e.errno is None))


def error_line(e: BaseException) -> str:
    """The one line printed for an expected error."""
    if isinstance(e, OSError) and e.filename is not None:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        text = f"{where}: {e.strerror or type(e).__name__}"
    elif isinstance(e, OSError) and e.strerror:  # without "[Errno N]"
        text = e.strerror
    else:
        text = str(e) or type(e).__name__
    return "error: " + " ".join(text.split())


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """main(argv)'s exit status; 2 with one line on stderr for an expected error."""
    try:
        return main(argv) or 0
    except Exception as e:
        if is_expected(e):
            print(error_line(e), file=sys.stderr)
            return 2
        raise
