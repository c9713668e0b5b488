"""The one error type users see for bad input: it names the file and the problem."""

from __future__ import annotations

from pathlib import Path


class X2ReconInputError(ValueError):
    """Bad user input (unreadable file, wrong content, missing structures...).

    The message always starts with the offending path (when there is one) so that a
    batch run's summary and the CLI can show it without a traceback.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):
        # picklable with its two arguments: a --workers process or a Dask worker raises it to the parent
        return type(self), (self.path, self.problem)


class CancelledError(RuntimeError):
    """A long operation was cancelled by the user (progress callback returned False)."""
