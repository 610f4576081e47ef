"""Processes that end with their parent: worker pools and launched trainings.

A child blocked on a queue, or a training launched by a scheduler, never notices that its
parent was killed (kill -9 runs no handler) and would live on, writing files nobody reads. On
Linux the kernel delivers a signal to the child when its parent dies (prctl PR_SET_PDEATHSIG);
elsewhere a thread polls the parent id.

No torch here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

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
