"""Where the sample CTs live: the one lookup used by the demo, the benchmarks and the tests.

The half-resolution chest CT with its labels (``chest_lidc0001_half``, 8 MB) ships inside the package
(``x2recon/resources/sample/``, licence and attribution in its README), so a plain clone or install runs
the demo.  The larger cases live in a shared data folder: ``$X2RECON_SHARED_DATA``, else a
``shared/data`` beside the repository or the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import X2ReconInputError

ENV = "X2RECON_SHARED_DATA"
#: Cases shipped inside the package.
BUNDLED_CASES = ("chest_lidc0001_half",)


def bundled_data_dir() -> Path:
    """The package's own sample folder (``x2recon/resources/sample``)."""
    return Path(__file__).resolve().parent / "resources" / "sample"


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


def case_dir(case: str, data: str | Path | None = None) -> Path:
    """Folder of sample case ``case`` (holding ``ct.nii.gz``).

    ``data`` given: ``data/case`` only.  Otherwise the bundled copy first (bundled cases), then the
    shared data folder (:func:`sample_data_dir`).  A case found nowhere fails naming where it looked.
    """
    if data is not None:
        looked = [Path(data) / case]
    else:
        looked = ([bundled_data_dir() / case] if case in BUNDLED_CASES else []) + [sample_data_dir() / case]
    for d in looked:
        if (d / "ct.nii.gz").is_file():
            return d
    where = " or ".join(str(d) for d in looked)
    hint = "" if data is not None else f"; set {ENV} to the folder holding {case}/ (bundled: {', '.join(BUNDLED_CASES)})"
    raise X2ReconInputError(looked[0] / "ct.nii.gz", f"sample CT {case!r} not found in {where}{hint}")
