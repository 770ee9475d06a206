"""What keeps a training run whole against the world outside it: one run per output_dir
(a lock), and stopping cleanly on SIGTERM / SIGINT (preemption, Ctrl-C) at any moment of the run.

The lock is `fcntl.flock` on output_dir itself, which the kernel releases when its holder dies
however it dies, so a dead run never blocks the next, and which no one deletes by accident.
`<output_dir>/.lock` says who holds it ("host pid"); the holder writes it again if it is removed
and removes it on a clean exit (with output_dir itself when it created it and left it empty); a
file left with text in it names a run that died holding the lock, and the new holder says so.
Where the filesystem cannot flock a directory (NFS emulates flock with byte-range locks, which
need a file open for writing) the lock is on `.lock` instead, and the holder stops when that file
is removed or replaced. On a shared filesystem, flock works across hosts only where the
filesystem supports it (NFSv4, Lustre mounted with -o flock).

Signals: the first SIGTERM or SIGINT during training asks the loop to stop after the step in
progress (it then checkpoints that step); a second one exits at once. Before the loop (data
preparation, compilation, restoring) and once training is complete and checkpointed (the final
model, export and summary) the first signal exits at once: nothing is lost, the same command
resumes or finishes the run. With several processes, `agreed_stop` makes every process stop at
the same step.
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
from typing import Callable

import numpy as np

from flax_gpt2v.config import ConfigError
from flax_gpt2v.data.common import process_alive

LOCK_FILE = ".lock"
SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Exit statuses: 128 + the signal's number for a stop by signal (the shell's convention),
# and this one for a run stopped because its loss diverged.
DIVERGED_STATUS = 3
# Stop codes beside a signal's number, agreed on like one (agreed_stop): a failed checkpoint save, and
# the lock lost (RunLock.lost) on the process that holds it.
FAILED_SAVE, LOCK_LOST = 255, 254
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
        self.dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.dir_fd: int | None = None  # the locked directory; None: the lock is on .lock (file)
        self.file = None
        self.created_dir = False

    def acquire(self, log) -> None:
        try:
            self.created_dir = not os.path.isdir(self.dir)
            os.makedirs(self.dir, exist_ok=True)
            dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise ConfigError(f"config key 'output_dir': cannot use {self.dir}: {e.strerror}") from None
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                os.close(dir_fd)
                raise self._in_use() from None
            os.close(dir_fd)  # this filesystem cannot lock a directory: .lock is the lock
            dir_fd = None
        self.dir_fd = dir_fd
        try:
            self.file = self._open_lock_file(log)
        except BaseException:
            self._unlock_dir()
            raise

    def _open_lock_file(self, log):
        """.lock, written "host pid", locked too (the lock itself where the directory is not)."""
        try:
            f = open(self.path, "a+")
        except OSError as e:
            raise ConfigError(f"config key 'output_dir': cannot use {self.dir}: {e.strerror}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise ConfigError(f"config key 'output_dir': cannot lock {self.path}: {e.strerror}") from None
            f.close()
            raise self._in_use() from None
        if not _same_file(f, self.path):
            # The holder removed the lock file (release) between our open and its unlock: the lock we got
            # is on a file no one else will open. Take the new one instead.
            f.close()
            return self._open_lock_file(log)
        f.seek(0)
        previous = f.read().strip()
        if previous:
            log(f"{self.dir}: taking over the lock of a run that ended without releasing it ({describe(previous)})")
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
        f.flush()
        return f

    def _in_use(self) -> ConfigError:
        try:
            with open(self.path) as f:
                holder = describe(f.read())
        except OSError:
            holder = describe("")
        return ConfigError(f"config key 'output_dir': {self.dir} is in use by another run ({holder}, lock "
                           f"{self.path}); wait for it to end or use another output_dir")

    def lost(self, log) -> str | None:
        """Why the lock no longer keeps other runs out of output_dir (None: it does). Called at every
        step: two stats. A removed .lock is written again where the directory is the lock."""
        if self.file is None:
            return None
        if self.dir_fd is not None:
            if not _same_file(self.dir_fd, self.dir):
                return f"{self.dir} was moved or removed while this run was writing to it"
            if not _same_file(self.file, self.path):
                self.file.close()
                self.file = self._open_lock_file(log)
                log(f"{self.path} was removed; written again (the lock is on {self.dir} itself)")
            return None
        if not _same_file(self.file, self.path):
            return (f"{self.path} was removed or replaced while this run held it, so another run may now "
                    f"write to {self.dir}")
        return None

    def release(self) -> None:
        if self.file is None:
            return
        ours = self.dir_fd is None or _same_file(self.dir_fd, self.dir)  # not moved or replaced
        if ours and _same_file(self.file, self.path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)  # before unlocking: a waiter that got this file retries (_same_file)
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None
        self._unlock_dir()
        if self.created_dir and ours:
            with contextlib.suppress(OSError):  # not empty: this run wrote something
                os.rmdir(self.dir)  # a run that wrote nothing leaves nothing

    def _unlock_dir(self) -> None:
        if self.dir_fd is not None:
            os.close(self.dir_fd)  # closing the last descriptor releases the flock
            self.dir_fd = None


def _same_file(f, path: str) -> bool:
    """f (a file or a descriptor) is what path names now."""
    try:
        held, named = os.fstat(f if isinstance(f, int) else f.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def describe(holder: str) -> str:
    parts = holder.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return "holder unknown"
    host, pid = parts[0], int(parts[1])
    if host != socket.gethostname():
        return f"PID {pid} on host {host}"
    return f"PID {pid} on this host ({host}), {'running' if process_alive(pid) else 'no longer running'}"


class StopSignals:
    """SIGTERM / SIGINT for the duration of a run (installed from the main thread; elsewhere a no-op).

    Python runs a handler only between the main thread's bytecodes: late while that thread is inside
    XLA (compiling, a step, a transfer), once for two signals that came meanwhile, and an exception
    it raised would come out of whatever ran then (JAX's tracing, a garbage-collection callback).
    So the handler does nothing: a thread reads every signal from the wakeup fd, where the C handler
    writes one byte per signal as it arrives, and acts on it. During training (`phase` "loop") the
    first sets `received`, which the loop acts on at the next step; a second exits at once.
    Before training ("setup") and once training is complete and checkpointed ("finishing"), the
    first exits at once too when `exit_at_once` (the command line: a process a scheduler stops).
    Without it (train() called from Python, e.g. in a notebook, whose interrupt must not end the
    kernel) the first is only recorded: before training the loop stops before its first step
    (RunStopped); while finishing, the final files are finished first.
    Exiting at once is os._exit after one line and `on_exit` (the lock's release): no Python cleanup,
    so no exception or teardown can meet XLA's or Orbax's threads halfway.
    """

    def __init__(self, on_exit: Callable[[], None] | None = None, exit_at_once: bool = True):
        self.received: int | None = None  # the first signal's number
        self.phase = "setup"
        self.on_exit = on_exit
        self.exit_at_once = exit_at_once
        self._lock = threading.Lock()
        self._previous = {}
        self._pipe = self._wakeup = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        self._pipe = read, write
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, _ignore)
        self._wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read,), daemon=True, name="stop signals").start()

    def restore(self) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._wakeup)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        os.close(self._pipe[1])  # the watcher reads the end of the pipe and ends (it closes the read end)
        self._pipe = None

    def _watch(self, read: int) -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            for byte in iter(lambda: pipe.read(1), b""):
                signum = byte[0]
                if signum in SIGNALS:
                    self._act(signum)

    def _act(self, signum: int) -> None:
        with self._lock:
            if self.received is not None:
                # The second signal: the user wants out now. No traceback, no cleanup that could hang.
                self._exit(f"\nstopped by a second {signal.Signals(signum).name} without a checkpoint; run the "
                           "same command to resume from the last one", signum)
            self.received = signum
            if self.phase == "loop":
                return
            if self.exit_at_once:
                self._exit(self._line(signum), signum)
            then = ("the run stops before its first step" if self.phase == "setup"
                    else "the final model, export and summary are finished first")
            os.write(2, f"\n{signal.Signals(signum).name} received: {then}; a second signal exits at once\n".encode())

    def enter(self, phase: str) -> None:
        """Into "loop" or "finishing"; a signal that came during the loop but was not acted on there (it
        came after its last check) is acted on now."""
        with self._lock:
            self.phase = phase
            if phase != "loop" and self.received is not None and self.exit_at_once:
                self._exit(self._line(self.received), self.received)

    def _line(self, signum: int) -> str:
        name = signal.Signals(signum).name
        if self.phase == "setup":
            return f"stopped by {name} before training; run the same command to resume"
        return (f"stopped by {name} while writing the final model, export and summary (training is complete "
                "and checkpointed); run the same command to write them")

    def _exit(self, line: str, signum: int) -> None:
        try:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.write(2, (line + "\n").encode())
            if self.on_exit is not None:
                with contextlib.suppress(Exception):
                    self.on_exit()
        finally:
            os._exit(128 + signum)


def _ignore(signum, frame) -> None:
    """Installed so that the C handler writes to the wakeup fd; StopSignals' thread acts."""


def agree(code: int) -> int:
    """The largest of every process's `code` (one tiny all-gather when there are several)."""
    import jax
    if jax.process_count() == 1:
        return code
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(code))))


def agreed_stop(step: int, save_steps: int, code: int) -> int:
    """The stop code (a signal's number, FAILED_SAVE, LOCK_LOST, 0 to go on) every process acts on
    before `step`. One process acts on its own at once. Several agree (the largest code) every
    AGREE_EVERY steps and after every save step, the same steps on every process; a stop waits for
    the next of those, and a stop after a save step needs no checkpoint of its own."""
    import jax
    if jax.process_count() == 1:
        return code
    if step % AGREE_EVERY and step % save_steps:
        return 0
    return agree(code)
