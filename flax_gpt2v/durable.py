"""Files that a power loss cannot tear, and reading back the files the project derives.

Every file the package writes goes through `write_file`: a temporary file in the destination's
directory, flushed and fsynced, renamed over the destination, and the directory fsynced, so a reader
sees the old content or the new, never a mix, and a file written before another is on disk before
it. Files written together into a staging directory (a checkpoint, tokenizer files) are fsynced with
`fsync_tree` before the directory takes its place, or moved in one by one with `move_into`. Files the project
derives (summaries, cache sidecars, results) are read with `read_derived_json`, which treats a
damaged one as missing, so that it is rebuilt. Imports nothing of ours, so every part may import it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from typing import IO, Any, Callable


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_name(name: str) -> str:
    """The name a write of `name` has until it is whole: hidden, `.<name>.partial-<host>-<pid>-<id>`, so
    that whoever cleans up after a kill can tell a dead writer's leftovers from a live writer's file."""
    return f".{name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def partial_writer(path: str | os.PathLike) -> tuple[str, int] | None:
    """(host, pid) of the process that wrote the partial file `path` (`partial_name`); None if not one."""
    head, _, _ = os.path.basename(path).rpartition(".partial-")[2].rpartition("-")
    host, _, pid = head.rpartition("-")
    return (host, int(pid)) if host and pid.isdigit() else None


def write_file(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> None:
    """Write `path` atomically and durably: write(f) fills a temporary file beside it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, partial_name(os.path.basename(path)))
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename == tmp:  # the error names the file the user asked for
            e.filename = path
        raise
    fsync_dir(directory)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_file(path, lambda f: f.write(text))


def write_json(path: str | os.PathLike, data: Any, **dump_args) -> None:
    """JSON (json.dump's arguments) plus a final newline, written atomically."""
    write_text(path, json.dumps(data, **dump_args) + "\n")


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file and directory under `directory` (one another library wrote), before it is renamed."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def move_into(directory: str | os.PathLike, write: Callable[[str], None]) -> list[str]:
    """Run write(staging), which makes the directory `staging` inside `directory` and writes files into
    it, then move each file into `directory`, durably (each one old or new, never torn); the names moved."""
    staging = os.path.join(directory, partial_name("staging"))
    os.makedirs(directory, exist_ok=True)
    try:
        write(staging)
        names = sorted(os.listdir(staging))
        fsync_tree(staging)
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
        fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def read_derived_json(path: str | os.PathLike, log: Callable[[str], None] | None = None) -> dict | None:
    """A JSON object the project derived (it can be rebuilt), or None when it is missing or damaged
    (empty, truncated, not UTF-8, not an object); a damaged one is named in one line to `log`."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
        problem = None if isinstance(data, dict) else "not a JSON object"
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        problem = "empty" if not raw else f"{type(e).__name__}: {e}"
    if problem is None:
        return data
    if log is not None:
        log(f"{os.fspath(path)} is damaged ({problem}); treating it as missing")
    return None
