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


def plain(value) -> str:
    """``value`` as a user reads it in a message: numpy scalars and arrays as plain numbers and lists
    (never ``np.float64(0.0)`` or ``array([...])``), floats to 6 significant digits."""
    if hasattr(value, "tolist"):  # numpy scalar or array, torch tensor
        value = value.tolist()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(plain(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return str(value)


def without_numpy_reprs(text: str) -> str:
    """``text`` with numpy reprs that slipped into a message written plainly: ``np.float64(0.5)`` → ``0.5``,
    ``array([1., 2.])`` → ``[1., 2.]`` (the CLI's last step before printing an error)."""
    import re

    text = re.sub(r"\bnp\.(?:float|int|uint|bool|complex|str)\w*\(([^()]*)\)", r"\1", text)
    return re.sub(r"\barray\((\[[^()]*\])(?:,\s*dtype=\w+)?\)", r"\1", text)


class CancelledError(RuntimeError):
    """A long operation was cancelled by the user (progress callback returned False)."""
