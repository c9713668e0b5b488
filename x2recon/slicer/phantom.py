"""The synthetic chest phantom the Slicer modules' self-tests start from (no data files needed)."""

from __future__ import annotations

import numpy as np


def phantom_ct():
    """(CT ``Volume`` in HU, rod mask): a 64³ grid of 3 mm voxels centred at the origin holding a water
    cylinder (the body) and a bone rod posterior of its axis (a vertebral column of sorts)."""
    from ..io.volume import Volume

    n = 64
    z, y, x = np.mgrid[:n, :n, :n]
    ct = np.full((n, n, n), -1000, np.int16)
    ct[(x - 32) ** 2 + (y - 32) ** 2 < 26**2] = 40  # body
    rod = ((x - 32) ** 2 + (y - 40) ** 2 < 5**2) & (z > 4) & (z < 60)
    ct[rod] = 700
    return Volume(ct, (3.0, 3.0, 3.0), (-96.0, -96.0, -96.0), np.eye(3)), rod
