"""How an ``lbi-fx`` command ends: its exit code, its one-line error, its warnings.

:data:`EXIT_CODES` is the one table of exit codes (the README's Command line section
shows the same rows; ``tests/test_cli_exits.py`` holds both to it and checks every error
class). Warnings are printed as ``lbi-fx: warning (FACTORY --regions SPEC): Category:
message``: attributed to the model and spec the command was given, not to a line of
lbi-fx or of the installed entry script that happened to be on the stack.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

from lbi_fx.cli.factory import UsageError
from lbi_fx.errors import (
    CheckpointError,
    InputError,
    InternalError,
    LBIError,
    RegionSpecError,
)

# code -> (what it means, what raises it); README's "Exit codes" table, row for row
EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("success", "every boundary holds (or no budget was given: min cuts only); the "
                   "command did what it was asked"),
    1: ("a check failed", "`verify`: a boundary is wider than the budget; `parity`: a "
                          "row's gradients are not within tolerance"),
    2: ("usage or spec error", "bad flags (argparse), `UsageError` (a factory that cannot "
                               "be imported, called or returns the wrong thing), "
                               "`InputError` (`SequenceAxisError`), `RegionSpecError`, "
                               "`CheckpointError`"),
    3: ("the model is refused, or the run failed", "`TraceError`, `SeparatorError`, "
        "`RewriteError` (`BatchMixingError`), `ModeError`, `HookError`, `NonFiniteError`, "
        "`HigherOrderError`, `DistributedError`; an error of the model's own code, "
        "PyTorch or the system"),
    4: ("a bug in lbi-fx", "`InternalError`: lbi-fx failed where plain PyTorch works; "
                           "please report it"),
}

# errors of what the user typed (flags, factory, region spec, a checkpoint for another
# run): exit 2. Every other LBIError refuses the model: exit 3.
USAGE_ERRORS: tuple[type[BaseException], ...] = (UsageError, InputError, RegionSpecError,
                                                 CheckpointError)


def exit_code(exc: BaseException) -> int:
    """The exit code of a command that raised ``exc`` (:data:`EXIT_CODES`)."""
    if isinstance(exc, InternalError):
        return 4
    if isinstance(exc, USAGE_ERRORS):
        return 2
    return 3


def error_line(exc: BaseException) -> str:
    """``lbi-fx: error: Class: first line of the message`` (a hint to see the traceback
    where the error is not a refusal that names its culprit)."""
    msg = " ".join(str(exc).split("\n")[0].split())
    hint = "" if isinstance(exc, LBIError) else " (LBI_FX_TRACEBACK=1 shows where)"
    return f"lbi-fx: error: {type(exc).__name__}: {msg}{hint}"


def report_error(exc: BaseException) -> int:
    """Print ``exc`` on one line of stderr and return its exit code; with
    ``LBI_FX_TRACEBACK=1`` re-raise it instead (the caller is in an ``except``)."""
    if os.environ.get("LBI_FX_TRACEBACK"):
        raise exc
    print(error_line(exc), file=sys.stderr)
    return exit_code(exc)


def _package_dirs() -> tuple[str, ...]:
    import lbi_fx
    import lbi_fx.kernels
    import lbi_fx.passes

    return tuple(str(Path(m.__file__).resolve().parent) + os.sep
                 for m in (lbi_fx, lbi_fx.passes, lbi_fx.kernels))


@contextlib.contextmanager
def attributed_warnings(subject: list[str]) -> Iterator[None]:
    """Print warnings as ``lbi-fx: warning (SUBJECT): Category: message`` while the
    command runs. ``subject`` (filled in once the flags are parsed: the factory and
    ``--regions``) names what the warning is about. A warning raised from lbi-fx's own
    code, or attributed to a frame that called the command (the installed entry script,
    ``python -m``'s runpy), carries no file:line: that line is not the user's; one in the
    user's own code (their model's file) keeps it."""
    callers = {f.filename for f in traceback.extract_stack()[:-2]}
    ours = _package_dirs()
    saved = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None) -> str:
        text = " ".join(str(message).split())
        text = text[len("lbi-fx: "):] if text.startswith("lbi-fx: ") else text
        name = str(Path(filename).resolve()) if filename and Path(filename).exists() else ""
        own = filename in callers or "runpy" in filename or (name and name.startswith(ours))
        where = "" if own else f"{filename}:{lineno}: "
        about = f" ({' '.join(subject)})" if subject else ""
        return f"lbi-fx: warning{about}: {where}{category.__name__}: {text}\n"

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = saved


def subject_of(args) -> list[str]:
    """What a command's warnings are about: its factory and region spec, as typed."""
    out = []
    for flag, attr in (("", "factory"), ("--model ", "model"), ("--regions ", "regions")):
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            out.append(f"{flag}{value}")
    return out
