"""One exception type for every problem a user can fix; the CLIs print it as one line."""

from __future__ import annotations

import atexit
import gc
import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class BratsError(Exception):
    """A problem with the user's input or files, with the message saying how to fix it."""


class CaseError(BratsError):
    """A problem with one patient's files; `patient_id` names the patient."""

    def __init__(self, patient_id: str, message: str):
        super().__init__(f"{patient_id}: {message}")
        self.patient_id = patient_id
        self.reason = message


def exit_on_error(fn: F) -> F:
    """Turn a BratsError raised by a CLI command into one line on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BratsError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper  # type: ignore[return-value]


def run_cli(app: Callable[[], object]) -> None:
    """Run a command's app as the program, and spare the interpreter's exit the garbage
    collector's sweep of every object alive (torch, dynamo, sympy, scipy...; bench/RESULTS.md,
    "Exit"). The freeze is an exit handler, so it happens only when the process
    ends (not after an in-process call, as in tests), after the handlers registered since; only
    reference cycles alive at exit go uncollected."""
    atexit.register(gc.freeze)
    app()
