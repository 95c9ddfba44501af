"""The one error type users see for bad input: which file, what is wrong, what to do."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. ``str(err)`` reads ``FILE: PROBLEM. FIX``."""

    def __init__(self, file: str, problem: str, fix: str = ""):
        self.file, self.problem, self.fix = str(file), problem, fix
        super().__init__(f"{self.file}: {problem}" + (f". {fix}" if fix else ""))
