"""The thorax-centred isocentre (``--isocenter thorax``): the centre of the lungs, found from HU.

A whole-body CT's bones are centred on the abdomen, so "centre of the structures" puts a chest-sized
box in a different place on every patient.  The lungs fix the thorax on any CT, labelled or not: the
air-density region (below ``air_hu``) inside the body outline (the skeleton's body mask), its large
connected pieces only (both lungs, not bowel gas or the trachea alone).  The isocentre is the centre
of their bounding box in world (LPS) coordinates.  Analysis runs on a grid of about ``coarse_mm``.
"""

from __future__ import annotations

import numpy as np

from ..errors import X2ReconInputError
from .skeleton import SkeletonRules, _coarse, body_mask

#: Air density inside the body (lung parenchyma is about −850 HU; soft tissue above −100).
AIR_HU = -400.0
#: A lung piece is kept when it holds at least this share of the largest air piece's volume…
LUNG_SHARE = 0.2
#: …and at least this volume (ml): a stomach bubble or a loop of gas is smaller than a lung.
MIN_LUNG_ML = 100.0


def lung_mask(hu: np.ndarray, spacing, coarse_mm: float = 3.0) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Coarse lung mask (array order k, j, i) and the block factor per axis; empty if there are no lungs."""
    from scipy import ndimage

    a, f = _coarse(np.asarray(hu), spacing, coarse_mm)
    cs = np.asarray(spacing, float) * np.asarray(f)
    body = body_mask(a, cs, SkeletonRules())
    lab, n = ndimage.label((a < AIR_HU) & body)
    if n == 0:
        return np.zeros(a.shape, bool), f
    sizes = np.bincount(lab.ravel()).astype(float)
    sizes[0] = 0
    voxel_ml = float(np.prod(cs)) / 1000.0
    keep = np.flatnonzero((sizes >= LUNG_SHARE * sizes.max()) & (sizes * voxel_ml >= MIN_LUNG_ML))
    return np.isin(lab, keep), f


def lung_center(ct) -> np.ndarray:
    """World (LPS mm) centre of the lungs' bounding box of a CT :class:`~x2recon.io.volume.Volume`.

    Raises :class:`X2ReconInputError` naming the CT when it shows no lungs (a head, a limb, a crop).
    """
    spacing = np.asarray(ct.spacing, float)[::-1]  # (x, y, z) → array order (k, j, i)
    lungs, f = lung_mask(np.asarray(ct.array), spacing)
    if not lungs.any():
        raise X2ReconInputError(
            ct.path, f"--isocenter thorax: no lungs found (no air region inside the body of at least "
            f"{MIN_LUNG_ML:.0f} ml); use --isocenter structures or ct for a CT without the thorax")
    idx = np.argwhere(lungs)  # (k, j, i), coarse
    fk = np.asarray(f, float)
    lo = idx.min(0) * fk  # first fine voxel of the first block
    hi = (idx.max(0) + 1) * fk - 1  # last fine voxel of the last block
    corners = np.array([[a, b, c] for a in (lo[2], hi[2]) for b in (lo[1], hi[1]) for c in (lo[0], hi[0])], float)
    w = ct.index_to_world(corners)
    return (w.min(0) + w.max(0)) / 2
