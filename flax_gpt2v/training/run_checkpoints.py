"""The training run's Orbax checkpoints (`<output_dir>/checkpoints/<step>`), verified and fail-safe.

- Integrity: once Orbax has committed a step, process 0 writes `sha256.json` into it: the size and
  SHA-256 of every file of the step. Restoring checks it, so flipped, truncated or missing bytes are
  found before they are trained on. A step without the file (written before checksums existed, or
  a process killed between Orbax's commit and the checksum) is restored as it is.
- Fallback: a damaged or unreadable latest step is reported in one line and removed, and the run
  resumes from the newest intact one; only when none is intact is the run refused.
- Failures while saving (a full disk, above all) stop the run with one line; Orbax removes old
  steps only after a new one is committed, so the previous checkpoint stays intact.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
from typing import Callable

from flax_gpt2v.hf.checkpoint import NATIVE_FORMAT, PER_LAYER_FORMAT, CheckpointError

MANIFEST = "sha256.json"
# The state's layout goes with the native one (hf/checkpoint.py); saved in each step's meta.
FORMAT_KEY = "flax_gpt2v_format"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def file_digests(step_dir: str) -> dict:
    """{relative path: [size, sha256]} of every file under step_dir but the manifest."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel.startswith(MANIFEST):
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[rel] = [os.path.getsize(path), h.hexdigest()]
    return dict(sorted(out.items()))


def write_manifest(step_dir: str) -> None:
    files = file_digests(step_dir)
    tmp = os.path.join(step_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify(step_dir: str) -> str | None:
    """None when the step matches its manifest (or has none), else what is wrong, naming the file."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            want = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} is unreadable"
    for rel, (size, digest) in want.items():
        file = os.path.join(step_dir, rel)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes, {size} were written"
    got = file_digests(step_dir)
    for rel, (_, digest) in want.items():
        if got[rel][1] != digest:
            return f"{os.path.join(step_dir, rel)} does not match its checksum"
    return None


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].rstrip(":") if text else type(e).__name__


def disk_errno(e: BaseException) -> int | None:
    """The errno of a full disk anywhere in e's chain (Orbax wraps the OSError of its writers)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return e.errno
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return errno.ENOSPC
        e = e.__cause__ or e.__context__
    return None


NOISY_LOGGERS = ("absl", "orbax", "asyncio")


def _loop_closed(e) -> bool:
    return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


def _quiet_hooks(excepthook, unraisablehook):
    """The hooks minus the "Event loop is closed" errors that TensorStore's callbacks raise into
    Orbax's event loop after a failed write closed it."""
    return (lambda t, v, tb: None if _loop_closed(v) else excepthook(t, v, tb),
            lambda u: None if _loop_closed(u.exc_value) else unraisablehook(u))


@contextlib.contextmanager
def quiet_orbax():
    """Orbax logs every failed read or write with a traceback, from its background threads too;
    the run reports them in one line of its own instead. Held while a run trains."""
    loggers = [logging.getLogger(n) for n in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    hooks = sys.excepthook, sys.unraisablehook
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    sys.excepthook, sys.unraisablehook = _quiet_hooks(*hooks)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            if lg.level <= logging.CRITICAL:  # not silenced for good meanwhile
                lg.setLevel(level)
        if not _silenced:
            sys.excepthook, sys.unraisablehook = hooks


_silenced = False


def silence_failed_saves() -> None:
    """After a failed save the process is about to stop, and Orbax's background tasks keep failing
    as it ends; those go unsaid too, to the end of the process."""
    global _silenced
    _silenced = True
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


class RunCheckpoints:
    """Orbax CheckpointManager of {"state": pytree, "meta": JSON dict} per step, with the above."""

    def __init__(self, directory: str, max_to_keep: int | None, log: Callable[[str], None]):
        import jax
        import orbax.checkpoint as ocp
        self.ocp = ocp
        self.directory = os.path.abspath(directory)
        self.log = log
        self.is_main = jax.process_index() == 0
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                 enable_async_checkpointing=True))
        self.pending: int | None = None   # saved, not yet checksummed
        self.last_saved: int | None = None
        self.failure: CheckpointError | None = None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, abstract_state) -> tuple[dict, dict] | None:
        """(state, meta) of the newest intact step, or None when there is no step."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged, first_problem = [], None
        for step in steps:
            problem = verify(self.step_dir(step))
            if problem is None:
                try:
                    with quiet_orbax():
                        out = self.manager.restore(step, args=self.ocp.args.Composite(
                            state=self.ocp.args.StandardRestore(abstract_state), meta=self.ocp.args.JsonRestore()))
                except Exception as e:  # Orbax reports a damaged or mismatched tree in many exception types
                    problem = f"{self.step_dir(step)} cannot be restored: {first_line(e)}"
                    written = self._format(step)
                    if written not in (None, NATIVE_FORMAT):
                        problem = (f"{self.step_dir(step)} holds flax_gpt2v_format {written} state; this version "
                                   f"restores format {NATIVE_FORMAT} (the layers stacked)")
                else:
                    self._remove(damaged)
                    self.last_saved = step
                    meta = dict(out["meta"])
                    meta.pop(FORMAT_KEY, None)
                    return out["state"], meta
            damaged.append(step)
            first_problem = first_problem or problem
            if step != steps[-1]:
                self.log(f"checkpoint step {step} is damaged: {problem}; falling back to the previous one")
        if steps:
            raise CheckpointError(f"cannot resume from {self.directory}: no checkpoint is intact (written by "
                                  f"another flax-gpt2v version, or damaged); step {steps[0]}: {first_problem}; "
                                  "use a new output_dir")
        return None

    def _format(self, step: int) -> int | None:
        """The state format a step's meta names (none: format 2, before it was saved), or None when
        its meta is unreadable."""
        try:
            with quiet_orbax():
                meta = self.manager.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))
        except Exception:  # damaged: the caller reports Orbax's own error
            return None
        return meta["meta"].get(FORMAT_KEY, PER_LAYER_FORMAT)

    def _remove(self, steps: list[int]) -> None:
        # Training will reach these steps again and write them anew.
        for step in steps:
            with quiet_orbax():
                self.manager.delete(step)
            self.log(f"removed damaged checkpoint step {step}")

    def save(self, step: int, state, meta: dict) -> None:
        """Start an asynchronous save. A failure is not raised here: poll() returns it at the next
        step, so that the training loop ends in its usual way; finish() raises it."""
        if self.pending is not None:  # Orbax would wait for it too; it gets its checksum first
            self._wait()
        if self.failure is not None:
            return
        try:
            with quiet_orbax():
                self.manager.save(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(state),
                                                                     meta=self.ocp.args.JsonSave(
                                                                         {**meta, FORMAT_KEY: NATIVE_FORMAT})))
        except Exception as e:
            self._failed(step, e)
            return
        self.pending = step

    def poll(self) -> CheckpointError | None:
        """Per training step: note a failed background save; checksum a finished one. Cheap."""
        if self.pending is None or self.failure is not None:
            return self.failure
        if self.manager.is_saving_in_progress():
            return None
        step, self.pending = self.pending, None
        try:
            with quiet_orbax():
                self.manager.check_for_errors()
        except Exception as e:
            self._failed(step, e)
            return self.failure
        if step not in self.manager.all_steps() and not os.path.isdir(self.step_dir(step)):
            self._failed(step, RuntimeError("Orbax did not commit it"))
            return self.failure
        if self.is_main:
            try:
                write_manifest(self.step_dir(step))
            except OSError as e:
                self._failed(step, e)
                return self.failure
        self.last_saved = step
        return None

    def _failed(self, step: int, e: BaseException) -> None:
        silence_failed_saves()
        kept = (f"the checkpoint of step {self.last_saved} is intact" if self.last_saved is not None
                else "no earlier checkpoint exists")
        if disk_errno(e) is not None:
            what = f"disk full while writing checkpoint step {step} to {self.directory}"
            then = "free space and run the same command to resume"
        else:
            what = f"writing checkpoint step {step} to {self.directory} failed: {first_line(e)}"
            then = "run the same command to resume"
        self.failure = CheckpointError(f"{what}; {kept}; {then}")

    def _wait(self) -> None:
        try:
            with quiet_orbax():
                self.manager.wait_until_finished()
        except Exception as e:
            if self.pending is not None:
                self._failed(self.pending, e)
        self.poll()

    def finish(self) -> None:
        """Wait for the last save, checksum it; raises the failure of any save."""
        self._wait()
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        with quiet_orbax(), contextlib.suppress(Exception):
            self.manager.close()
