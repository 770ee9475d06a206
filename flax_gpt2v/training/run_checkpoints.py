"""The training run's Orbax checkpoints (`<output_dir>/checkpoints/<step>`), verified and fail-safe.

- Integrity: once Orbax has committed a step, a thread beside the training loop (reading the step
  costs about a second per GB) writes `sha256.json` into it on process 0: the size and SHA-256 of
  every file of the step; the run's end and a stop wait for it. Restoring checks it, so flipped, truncated or missing bytes are
  found before they are trained on. A step without the file was never vouched for (its process was
  killed between Orbax's commit and the checksum, or it predates checksums) and is not trusted.
- Fallback: a damaged, unreadable or unverified latest step is reported in one line and removed, and
  the run resumes from the newest intact one; only when none is intact is the run refused.
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
import threading
from typing import Callable

from flax_gpt2v import durable
from flax_gpt2v.errors import first_line
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
    # Orbax's files on disk before the manifest that vouches for them: a step with a sha256.json is whole
    # after a power loss too.
    durable.fsync_tree(step_dir)
    durable.write_json(os.path.join(step_dir, MANIFEST), {"files": file_digests(step_dir)}, indent=1)


def verify(step_dir: str) -> str | None:
    """None when the step matches its manifest, else what is wrong, naming the file."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return f"{path} was never written (the run stopped before checksumming the step)"
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


class _Hush:
    """Orbax logs every failed read or write with a traceback, from its background threads too; the
    run reports them in one line of its own instead. Hushed only while checkpoint I/O is under way,
    so the rest of the process logs as it would: held around each checkpoint operation, and for a
    save until its background commit and checksum end. Counted, because those holds overlap and
    a save's ends in another thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.holders = 0
        self.levels: list[tuple[logging.Logger, int]] = []
        self.hooks = None

    def enter(self) -> None:
        with self.lock:
            self.holders += 1
            if self.holders == 1:
                self.levels = [(lg, lg.level) for lg in map(logging.getLogger, NOISY_LOGGERS)]
                self.hooks = sys.excepthook, sys.unraisablehook
                for lg, _ in self.levels:
                    lg.setLevel(logging.CRITICAL)
                sys.excepthook, sys.unraisablehook = _quiet_hooks(*self.hooks)

    def exit(self) -> None:
        with self.lock:
            self.holders -= 1
            if self.holders == 0:
                for lg, level in self.levels:
                    if lg.level <= logging.CRITICAL:  # not silenced for good meanwhile
                        lg.setLevel(level)
                if not _silenced:
                    sys.excepthook, sys.unraisablehook = self.hooks


_hush = _Hush()


@contextlib.contextmanager
def quiet_orbax():
    """Orbax hushed for the operation inside (see _Hush)."""
    _hush.enter()
    try:
        yield
    finally:
        _hush.exit()


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
        with quiet_orbax():
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                     enable_async_checkpointing=True))
        self.pending: int | None = None   # saved, its commit and checksum awaited by self.checksum
        self.checksum: threading.Thread | None = None
        self.last_saved: int | None = None
        self.failure: CheckpointError | None = None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def restore(self, abstract_state) -> tuple[dict, dict] | None:
        """(state, meta) of the newest intact step, or None when there is no step."""
        with quiet_orbax():
            steps = sorted(self.manager.all_steps(), reverse=True)
        damaged, first_problem = [], None
        for step in steps:
            verified = os.path.exists(os.path.join(self.step_dir(step), MANIFEST))
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
                state = "is damaged" if verified else "is not trusted"
                self.log(f"checkpoint step {step} {state}: {problem}; falling back to the previous one")
        if steps:
            raise CheckpointError(f"cannot resume from {self.directory}: no checkpoint is intact (written by "
                                  f"another flax-gpt2v version, damaged, or never verified); step {steps[0]}: "
                                  f"{first_problem}; use a new output_dir")
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
            self.log(f"removed checkpoint step {step}")

    def save(self, step: int, state, meta: dict) -> None:
        """Start an asynchronous save, committed and checksummed in the background. A failure is not
        raised here: poll() returns it at a later step, so that the training loop ends in its usual
        way; finish() raises it."""
        self._wait()  # Orbax would wait for the previous save too; it gets its checksum first
        if self.failure is not None:
            return
        _hush.enter()  # until _vouch ends: Orbax's threads write, and may fail, meanwhile
        try:
            self.manager.save(step, args=self.ocp.args.Composite(state=self.ocp.args.StandardSave(state),
                                                                 meta=self.ocp.args.JsonSave(
                                                                     {**meta, FORMAT_KEY: NATIVE_FORMAT})))
        except Exception as e:
            _hush.exit()
            self._failed(step, e)
            return
        self.pending = step
        self.checksum = threading.Thread(target=self._vouch, args=(step,), daemon=True,
                                         name=f"checksum of checkpoint step {step}")
        self.checksum.start()

    def _vouch(self, step: int) -> None:
        """In the background: wait for Orbax to commit `step`, then write its manifest (process 0).
        Until the manifest is written the step is not trusted (see restore), so a kill meanwhile is safe."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
            if not os.path.isdir(self.step_dir(step)):
                raise RuntimeError("Orbax did not commit it")
            if self.is_main:
                write_manifest(self.step_dir(step))
        except Exception as e:
            self._failed(step, e)
        else:
            self.last_saved = step
        finally:
            _hush.exit()

    def poll(self) -> CheckpointError | None:
        """Per training step: the failure of a background save, if any. Cheap: waits for nothing."""
        return self.failure

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
        """Until the pending save is committed and checksummed (or has failed)."""
        if self.pending is not None:
            self.checksum.join()
            self.pending = self.checksum = None

    def finish(self) -> None:
        """Wait for the last save and its checksum; raises the failure of any save."""
        self._wait()
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        self._wait()  # a run that ends by an exception leaves no checksum half-written behind it
        with quiet_orbax(), contextlib.suppress(Exception):
            self.manager.close()
