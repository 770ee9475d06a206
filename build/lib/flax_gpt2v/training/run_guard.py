"""What keeps a training run whole against the world outside it: one run per output_dir
(a lock), and stopping cleanly on SIGTERM / SIGINT (preemption, Ctrl-C).

The lock is `fcntl.flock` on `<output_dir>/.lock`, which the kernel releases when its
holder dies however it dies, so a dead run never blocks the next. The holder writes
"host pid" into the file and removes it on a clean exit (with output_dir itself when it
created it and left it empty); a file left with text in it names a run that died holding
the lock, and the new holder says so. On a shared
filesystem, flock works across hosts only where the filesystem supports it (NFSv4,
Lustre mounted with -o flock).

Signals: the first SIGTERM or SIGINT asks the training loop to stop after the step in
progress (it then checkpoints that step); a second one exits at once. Before the loop
starts (data preparation, compilation) the first signal stops at once: nothing is lost.
With several processes, `agreed_stop` makes every process stop at the same step.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import socket
import sys
import threading

import numpy as np

from flax_gpt2v.config import ConfigError

LOCK_FILE = ".lock"
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Exit statuses: 128 + the signal's number for a stop by signal (the shell's convention),
# and this one for a run stopped because its loss diverged.
DIVERGED_STATUS = 3
# With several processes, they agree on a stop every this many steps (and after every save step), not
# at every step: an all-gather makes each host wait for the step before it to finish on every host.
AGREE_EVERY = 10


# A BaseException, like KeyboardInterrupt: code that catches Exception (a checkpoint restore that would
# take the interruption for damage, a data loader, a reporting backend) must never swallow a stop.
class RunStopped(BaseException):
    """The run stopped before its end on purpose (a signal, divergence); `status` is the exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class RunLock:
    """An exclusive lock on an output_dir; `acquire` raises ConfigError naming the holder."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.file = None
        self.created_dir = False

    def acquire(self, log) -> None:
        try:
            self.created_dir = not os.path.isdir(os.path.dirname(self.path))
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise ConfigError(f"config key 'output_dir': cannot use {os.path.dirname(self.path)}: "
                              f"{e.strerror}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise ConfigError(f"config key 'output_dir': cannot lock {self.path}: {e.strerror}") from None
            f.seek(0)
            holder = describe(f.read())
            f.close()
            raise ConfigError(f"config key 'output_dir': {os.path.dirname(self.path)} is in use by another "
                              f"run ({holder}, lock {self.path}); wait for it to end or use another "
                              "output_dir") from None
        if not _same_file(f, self.path):
            # The holder removed the lock file (release) between our open and its unlock: the lock we got
            # is on a file no one else will open. Take the new one instead.
            f.close()
            created = self.created_dir
            self.acquire(log)
            self.created_dir = created
            return
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log(f"{os.path.dirname(self.path)}: taking over the lock of a run that ended without releasing "
                f"it ({describe(previous)})")
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)  # before unlocking: a waiter that got this file retries (_same_file)
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
            if self.created_dir and not os.listdir(os.path.dirname(self.path)):
                os.rmdir(os.path.dirname(self.path))  # a run that wrote nothing leaves nothing


def _same_file(f, path: str) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def describe(holder: str) -> str:
    parts = holder.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return "holder unknown"
    host, pid = parts[0], int(parts[1])
    if host != socket.gethostname():
        return f"PID {pid} on host {host}"
    return f"PID {pid} on this host ({host}), {'running' if _alive(pid) else 'no longer running'}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopSignals:
    """SIGTERM / SIGINT handlers for the duration of a run (main thread only; elsewhere a no-op)."""

    def __init__(self):
        self.received: int | None = None  # the first signal's number
        self.in_loop = False              # True: finish the step and checkpoint; False: stop at once
        self._previous = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            # The second signal: the user wants out now. No traceback, no cleanup that could hang.
            print(f"stopped by a second {name} without a checkpoint; run the same command to resume from "
                  "the last one", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        if not self.in_loop:
            raise RunStopped(f"stopped by {name} before training; run the same command to resume", 128 + signum)


def agree(code: int) -> int:
    """The largest of every process's `code` (one tiny all-gather when there are several)."""
    import jax
    if jax.process_count() == 1:
        return code
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(code))))


def agreed_stop(step: int, save_steps: int, code: int) -> int:
    """The stop code (a signal's number, 255 for a failed save, 0 to go on) every process acts on
    before `step`. One process acts on its own at once. Several agree (the largest code) every
    AGREE_EVERY steps and after every save step, the same steps on every process; a stop waits for
    the next of those, and a stop after a save step needs no checkpoint of its own."""
    import jax
    if jax.process_count() == 1:
        return code
    if step % AGREE_EVERY and step % save_steps:
        return 0
    return agree(code)
