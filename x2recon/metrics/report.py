"""Per-case result tables shared by the evaluations: mean ± std over finite values, atomic CSV."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write_text


def write_csv(rows: list[dict], path: str | Path) -> None:
    """One line per row; the header is the union of the rows' keys (a row may carry a note)."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std of the values that are neither None nor NaN (NaN, NaN when none are)."""
    a = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0
