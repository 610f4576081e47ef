"""Processes that end with their parent, and one writer at a time: worker pools, launched
trainings, and the locks a cache or a fold folder is written under.

A child blocked on a queue, or a training launched by a scheduler, never notices that its
parent was killed (kill -9 runs no handler) and would live on, writing files nobody reads. On
Linux the kernel delivers a signal to the child when its parent dies (prctl PR_SET_PDEATHSIG);
elsewhere a thread polls the parent id.

No torch here.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from brats.errors import BratsError

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_POLL_S = 0.5  # how often a child without PR_SET_PDEATHSIG checks that its parent lives


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, never reaped: pid 1 of many containers reaps nothing) writes no more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def arm_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies; returns whether it could."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # orphaned: whoever started this process is gone


def die_with_parent(main_pid: int | None = None, sig: int = signal.SIGKILL) -> None:
    """End this process when its parent ends, even by kill -9 (in a worker's initializer, or in a
    launched child before it starts). `main_pid`: the process that must be alive, when the
    parent is a fork server between the two."""
    parent = os.getppid()
    armed = arm_parent_death_signal(sig)
    if os.getppid() != parent or (main_pid not in (None, parent) and not pid_alive(main_pid)):
        os._exit(1)  # the parent died before the signal was armed
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def lock_holder(fd: int) -> str:
    """The pid holding a lock on the file behind `fd`, read from /proc/locks ("?" elsewhere)."""
    st = os.fstat(fd)
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return "?"
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 12345 08:01:1234 0 EOF"
        parts = line.split()
        if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(st.st_ino):
            return parts[4]
    return "?"


@contextmanager
def exclusive_lock(folder: Path, what: str, fix: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` itself (no lock file is left behind) while the block
    runs; another process holding it is refused in one line naming it and ending in `fix`. The
    kernel releases the lock when its holder dies, even by kill -9: a stale lock never blocks a
    rerun."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise BratsError(f"cannot lock {what} ({folder}: {e.strerror})") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BratsError(f"{what} is in use by process {lock_holder(fd)}: {fix}") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def launched_by_accelerate() -> bool:
    """Whether this process is a worker that `accelerate launch` (or torchrun under it) started."""
    return "ACCELERATE_DYNAMO_BACKEND" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher() -> None:
    """A training started by `accelerate launch` ends when the launcher does (kill -9 of the
    launcher would otherwise leave it writing its fold). A training started from a shell is left
    alone: it may be meant to outlive the shell (nohup)."""
    if launched_by_accelerate():
        die_with_parent()


def child_dies_with_us() -> Callable[[], None]:
    """For subprocess.Popen(preexec_fn=child_dies_with_us()): the child is killed when this
    process dies, also when it died before the child could ask."""
    parent = os.getpid()

    def arm() -> None:  # runs in the child, between fork and exec
        arm_parent_death_signal()
        if os.getppid() != parent:
            os._exit(1)

    return arm
