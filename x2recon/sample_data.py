"""Where the bundled sample CTs live (``../shared/data`` beside the repository, or
``$X2RECON_SHARED_DATA``): the one lookup used by the demo, the benchmarks and the tests."""

from __future__ import annotations

import os
from pathlib import Path

ENV = "X2RECON_SHARED_DATA"


def sample_data_dir() -> Path:
    """``$X2RECON_SHARED_DATA``, else the first ``shared/data`` found beside the repository or the
    working directory (returned even if missing, so errors can name where it was looked for)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    cwd = Path.cwd().resolve()
    for cand in (repo / "shared" / "data", repo.parent / "shared" / "data", cwd / "shared" / "data",
                 cwd.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return repo.parent / "shared" / "data"
