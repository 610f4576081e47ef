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
    if hasattr(app, "registered_commands"):
        prepare_help(app)
    app()


def finished(files: list[tuple[object, str]], next_step: str | None) -> None:
    """How a command ends: the files it wrote, each with what it is, and the command to run
    next (stdout, after everything else)."""
    if files:
        width = max(len(str(f)) for f, _ in files)
        print("wrote:")
        for f, what in files:
            print(f"  {str(f):<{width}}  {what}")
    if next_step:
        print(f"next: {next_step}")


def describe(doc: str) -> str:
    """A module docstring as a command's --help description (Markdown, as `command_app` renders
    help): each block of indented example lines becomes a code block, one command a line."""
    out, block = [], []
    for line in doc.strip().splitlines() + [""]:
        if line.startswith("    "):
            block.append(line.strip())
            continue
        if block:
            out += ["```", *block, "```"]
            block = []
        out.append(line)
    return "\n".join(out).strip()


def command_app(doc: str):
    """A typer app for one command: help in Markdown (text in brackets, as in "[default: best]",
    stays as written; Rich markup would swallow it), described by `doc` (see `describe`)."""
    import typer

    return typer.Typer(
        add_completion=False, help=describe(doc), rich_markup_mode="markdown", pretty_exceptions_enable=False
    )


def prepare_help(app) -> None:
    """A one-command app shows its command's help, not its own: give the command the app's."""
    for command in app.registered_commands:
        if command.help is None and app.info.help:
            command.help = app.info.help
