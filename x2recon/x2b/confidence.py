"""Saying when the network does not know: a per-vertex confidence and an out-of-distribution check.

Confidence of a surface vertex: ``|p(v + h·n) − p(v − h·n)|``, the occupancy on either side of the surface,
``h = PROBE_BOX`` (1/128 of the box, 3 mm in a 384 mm box) along the vertex normal.  To first order it is the
occupancy's gradient norm times ``2h`` — the margin ``|p − τ|`` the field reaches one probe step off the surface:
1 where the field jumps from "no bone" to "bone" within 6 mm (a decisive boundary), near 0 where it is flat near
τ (the surface sits wherever noise puts it).  It is in probability units, bounded in [0, 1], orientation-free
(a raw surface's flipped normals give the same value) and costs two evaluations per vertex.

Out of distribution: the X-ray is compared with what the model's training patient looks like in the same
geometry — the bundled chest sample rendered as a DRR with the X-ray's geometry, the isocentre moved to the
sample's lung centre as the training builds do (``--isocenter thorax``).  The column profile of the central half
of the image (left–right: two lung fields either side of the mediastinum; the outer quarters hold air beside a
DRR's body but arms and soft tissue on a film) and the row profile (head–foot: apices, lungs, diaphragm) of both
images are correlated; either below its floor gets a warning naming it.
"""

from __future__ import annotations

import numpy as np

#: the mesh's per-vertex scalar (PLY vertex property, VTK point-data array, Slicer point scalar)
CONFIDENCE_ARRAY = "confidence"
#: probe step either side of the surface, in box units
PROBE_BOX = 1.0 / 128
#: correlation floors of the profiles with the reference chest DRR.  Measured (columns / rows; 64² DRRs in the
#: bundled ``skeleton`` model's geometry): the sample's AP 0.96 / 0.99 and PA 1.00 / 0.99; another patient's chest
#: AP (chest_lungdx_a0001) 0.73 / 0.69; a real PA film placed from its lung fields (NIH ChestX-ray14
#: 00000001_000) 0.68 / 0.63 — none warns; the sample's lateral given as AP 0.23 / 0.97, an abdomen AP
#: (abdomen_pancreas_cb001) 0.82 / 0.47 and a head AP (head_invesalius) 0.36 / 0.09 warn.
COLUMN_FLOOR = 0.5
ROW_FLOOR = 0.55
#: side of the images compared (area-resampled)
PROFILE_SIZE = 64


def vertex_confidence(prob, vertices_box: np.ndarray, normals_box: np.ndarray, h: float = PROBE_BOX) -> np.ndarray:
    """Per-vertex confidence (N,) float32 in [0, 1]: ``|p(v + h n) − p(v − h n)|`` with ``prob`` the occupancy
    at points in box coordinates (``OccupancyField.prob``) and ``normals_box`` unit vertex normals."""
    v = np.asarray(vertices_box, np.float32)
    n = np.asarray(normals_box, np.float32)
    if len(v) == 0:
        return np.zeros(0, np.float32)
    out = np.clip(np.asarray(prob(v + h * n)), 0, 1)
    inn = np.clip(np.asarray(prob(v - h * n)), 0, 1)
    return np.abs(out - inn).astype(np.float32)


def _small(img: np.ndarray, n: int = PROFILE_SIZE) -> np.ndarray:
    from ..io.image import area_matrix

    a = np.asarray(img, np.float64)
    return area_matrix(a.shape[0], n) @ a @ area_matrix(a.shape[1], n).T


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else 0.0


def reference_image(geometry) -> np.ndarray:
    """The bundled chest sample (the training patient, half resolution) as a DRR in ``geometry`` resized to
    ``PROFILE_SIZE``², its isocentre moved to the sample's lung centre (the ``--isocenter thorax`` framing)."""
    from ..dataset.thorax import lung_center
    from ..drr.render import render_drr
    from ..io.volume import read_ct
    from ..io.xray import xray_from_array
    from ..sample_data import case_dir

    ct = read_ct(case_dir("chest_lidc0001_half") / "ct.nii.gz")
    g = geometry.resized(PROFILE_SIZE, PROFILE_SIZE)
    g = g.translated(lung_center(ct) - np.asarray(g.isocenter, np.float64))
    d = render_drr(ct, g)
    return xray_from_array(d.display, d.geometry).image


def profile_similarity(image: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(column, row) profile correlations of ``image`` with ``reference`` (both area-resampled to the same size):
    columns of the central half, rows whole."""
    a, b = _small(image), _small(reference)
    c = slice(PROFILE_SIZE // 4, PROFILE_SIZE - PROFILE_SIZE // 4)
    return _corr(a[:, c].mean(0), b[:, c].mean(0)), _corr(a.mean(1), b.mean(1))


def training_likeness_warnings(xray, reference: np.ndarray | None = None) -> list[str]:
    """Why ``xray`` does not look like a frontal chest X-ray in the training framing (empty: it does).
    Lateral inputs (an X2B2 model's second view) are not checked.  ``reference``: the training-patient image
    (``reference_image(xray.geometry)`` when None)."""
    if abs(float(np.asarray(xray.geometry.plane_normal)[1])) < 0.7:  # not frontal (the normal is not along y)
        return []
    ref = reference_image(xray.geometry) if reference is None else reference
    col, row = profile_similarity(xray.image, ref)
    out = []
    if col < COLUMN_FLOOR:
        out.append(f"its left–right profile does not look like a frontal chest (correlation {col:.2f} with the "
                   f"training patient's, below {COLUMN_FLOOR}): two lung fields either side of the spine are "
                   "missing — a lateral view, or not a chest?")
    if row < ROW_FLOOR:
        out.append(f"its head–foot profile does not look like a thorax in the training framing (correlation "
                   f"{row:.2f} with the training patient's, below {ROW_FLOOR}): an abdomen, a head or a limb, or "
                   "the chest shifted in the image?")
    return out
