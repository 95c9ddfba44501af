"""The one error type users see for bad input: which file, what is wrong, what to do."""

from __future__ import annotations

import sys


class DataError(ValueError):
    """Bad input data. ``str(err)`` reads ``FILE: PROBLEM. FIX``."""

    def __init__(self, file: str, problem: str, fix: str = ""):
        self.file, self.problem, self.fix = str(file), problem, fix
        super().__init__(f"{self.file}: {problem}" + (f". {fix}" if fix else ""))


def find_data_error(err: BaseException | None) -> DataError | None:
    """The DataError behind ``err``: itself, or its cause under wrappers that ``raise ...
    from`` it (MONAI's ``Failed to evaluate ConfigExpression``); else None."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DataError):
            return err
        seen.add(id(err))
        err = err.__cause__
    return None


def _excepthook(kind, err, tb) -> None:
    data_error = find_data_error(err)
    if data_error is None:
        sys.__excepthook__(kind, err, tb)
        return
    print(f"error: {data_error}", file=sys.stderr)
    raise SystemExit(2)


def report_data_errors() -> None:
    """Make this process end on an uncaught DataError as the CLI does: ``error: FILE: PROBLEM.
    FIX`` on stderr and exit status 2, instead of a traceback (a bundle config calls it, so
    ``python -m monai.bundle run`` shows the project's message). Other errors are unchanged."""
    sys.excepthook = _excepthook
