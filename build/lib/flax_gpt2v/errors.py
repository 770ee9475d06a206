"""Errors as the user reads them: one line. Imports nothing, so every subpackage may import it."""
from __future__ import annotations


def first_line(e: BaseException, *, with_type: bool = False) -> str:
    """The first line of e's message, for a one-line error that wraps it. Libraries put the cause first
    and details (tracebacks of their threads, long listings) after it; a trailing colon announced those.
    Without a message: e's type name; with_type puts the type name before the message too."""
    lines = str(e).strip().splitlines()
    text = lines[0].rstrip(":") if lines else ""
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if with_type else text
