"""The ``skeleton`` structure: all bone of a CT as one mask, from Hounsfield units alone.

The same definition serves labelled and unlabelled CTs, so both kinds of case agree.  Bone is what
is dense (HU above a threshold on a lightly smoothed CT) *and* passes rules that remove what is
dense but not bone:

* **outside the body** (table, head rest, blankets): the body is the largest connected region above
  −500 HU after an in-plane opening that cuts thin contacts, its holes (lungs, bowel gas) filled
  slice by slice; nothing outside it is kept.
* **contrast-filled blood pools** (heart, aorta, large veins, 150–900 HU): thick regions (they hold a
  ball of ``pool_radius_mm``) that are homogeneous (HU standard deviation below ``pool_sd_hu``) or
  large without a dense rim (over ``pool_volume_ml`` with under 10 % of their rim above 500 HU).
  Bone's thick parts (vertebral bodies, femoral heads) are textured trabecular bone inside a cortex.
* **dense contrast in vessels** (an injected vein can read 1 300–3 000 HU): solid dense tubes
  (over 1 000 HU and more than ``tube_radius_mm`` thick, median over 1 200 HU) inside the thoracic
  cavity (per slice, the convex hull of the lungs).  Cortical bone is a thin shell, and the femoral
  shaft lies outside the lungs' hull.
* **calcified plaques, noise, small calcifications**: connected pieces under ``min_volume_ml``.

Marrow cavities and trabecular bone below the threshold are filled: holes of the mask are closed
slice by slice (axial) and then in 3D.  Costal cartilages are not bone by HU (≈ 100 HU) and are not
included.  Pool and body analysis run on a grid of about 1.5 mm in-plane for speed; thresholding and
hole filling run on the CT's own grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: The structure name of the HU skeleton (not a TotalSegmentator class: one structure, all bone).
SKELETON_NAME = "skeleton"


@dataclass(frozen=True)
class SkeletonRules:
    """Every threshold of the skeleton definition (recorded in the case's segmentation source)."""

    bone_hu: float = 165.0
    smooth_mm: float = 0.6
    body_hu: float = -500.0
    body_open_mm: float = 4.0
    pool_low_hu: float = 120.0
    pool_high_hu: float = 900.0
    pool_radius_mm: float = 5.0
    pool_sd_hu: float = 60.0
    pool_volume_ml: float = 80.0
    pool_margin_mm: float = 1.5
    tube_hu: float = 1000.0
    tube_median_hu: float = 1200.0
    tube_radius_mm: float = 3.0
    tube_margin_mm: float = 4.0
    min_volume_ml: float = 0.5
    max_hole_mm2: float = 60.0
    canal_hu: tuple[float, float] = (-30.0, 50.0)
    canal_midline_mm: float = 30.0
    coarse_mm: float = 1.5

    def text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def _ball_opening(mask: np.ndarray, spacing, radius: float) -> np.ndarray:
    """Morphological opening by a ball of ``radius`` mm, through two distance transforms."""
    from scipy import ndimage

    core = ndimage.distance_transform_edt(mask, sampling=spacing) >= radius
    if not core.any():
        return core
    return ndimage.distance_transform_edt(~core, sampling=spacing) <= radius


def _near(mask: np.ndarray, spacing, mm: float) -> np.ndarray:
    from scipy import ndimage

    if not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= mm


def _coarse(hu: np.ndarray, spacing, target_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Block mean over in-plane (and slice) blocks so that each side is about ``target_mm``."""
    f = tuple(max(1, int(round(target_mm / s))) for s in spacing)
    shape = tuple(n // k * k for n, k in zip(hu.shape, f))
    a = hu[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    a = a.reshape(shape[0] // f[0], f[0], shape[1] // f[1], f[1], shape[2] // f[2], f[2]).mean((1, 3, 5))
    return a, f


def _fine(mask: np.ndarray, f, shape) -> np.ndarray:
    """Nearest upsampling of a coarse mask back to ``shape`` (edges beyond the blocks repeat)."""
    m = mask
    for ax, k in enumerate(f):
        m = np.repeat(m, k, axis=ax)
    pad = [(0, n - m.shape[i]) for i, n in enumerate(shape)]
    return np.pad(m, pad, mode="edge")


def body_mask(hu: np.ndarray, spacing, rules: SkeletonRules) -> np.ndarray:
    """The body outline: largest region above ``body_hu`` after an in-plane opening, holes filled per slice."""
    from scipy import ndimage

    m = hu > rules.body_hu
    r = np.maximum(1, np.round(rules.body_open_mm / np.asarray(spacing[1:]))).astype(int)
    disk = (np.mgrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1] ** 2 / (r[:, None, None] ** 2)).sum(0) <= 1
    m = ndimage.binary_opening(m, structure=disk[None])
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    m = lab == sizes.argmax()
    for k in range(m.shape[0]):
        m[k] = ndimage.binary_fill_holes(m[k])
    return m


#: Grid (mm) the body outline of ``clear_outside_body`` is found on (fast on any CT), and the band (mm)
#: beyond it in which voxels above ``body_hu`` still count as body (the skin rim that the opening and the
#: coarse grid round off; a couch touching the back keeps at most this sliver).
OUTLINE_COARSE_MM = 2.0
OUTLINE_MARGIN_MM = 3.0
#: What lies outside the body becomes air.
OUTSIDE_HU = -1024


def body_outline(hu: np.ndarray, spacing, rules: SkeletonRules | None = None) -> np.ndarray:
    """The body on the CT's own grid (bool, array order k, j, i): :func:`body_mask` on a grid of about
    ``OUTLINE_COARSE_MM``, back on the CT's grid, plus the voxels above ``body_hu`` within
    ``OUTLINE_MARGIN_MM`` of it.  Lungs and bowel gas are inside (holes filled slice by slice)."""
    from scipy import ndimage

    rules = rules or SkeletonRules()
    spacing = np.asarray(spacing, float)
    a, f = _coarse(hu, spacing, OUTLINE_COARSE_MM)
    cs = spacing * np.asarray(f)
    cbody = body_mask(a, cs, rules)
    r = np.maximum(1, np.ceil(OUTLINE_MARGIN_MM / cs[1:])).astype(int)
    disk = (np.mgrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1] ** 2 / (r[:, None, None] ** 2)).sum(0) <= 1
    band = ndimage.binary_dilation(cbody, structure=disk[None])
    return _fine(cbody, f, hu.shape) | (_fine(band, f, hu.shape) & (hu > rules.body_hu))


def clear_outside_body(ct, rules: SkeletonRules | None = None):
    """``(ct with every voxel outside the body at OUTSIDE_HU, body mask, record)`` for a CT
    :class:`~x2recon.io.volume.Volume` (a new Volume; ``ct`` is not changed).  The couch, head rests,
    blankets and tubes outside the body leave the DRRs, meshes and targets: a radiograph of a standing
    patient has none of them.  The record holds the body's volume and the volume above ``body_hu``
    that was cleared (ml)."""
    rules = rules or SkeletonRules()
    hu = np.asarray(ct.array)
    body = body_outline(hu, np.asarray(ct.spacing, float)[::-1], rules)
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    cleared = int(np.count_nonzero((hu > rules.body_hu) & ~body))
    out = np.where(body, hu, np.asarray(OUTSIDE_HU).astype(hu.dtype))
    return ct.with_array(out), body, {"body_ml": round(float(body.sum()) * voxel_ml, 1),
                                      "cleared_dense_ml": round(cleared * voxel_ml, 1)}


def blood_pools(sm: np.ndarray, body: np.ndarray, spacing, rules: SkeletonRules) -> np.ndarray:
    """Thick 150–900 HU regions that are homogeneous or large without a dense rim (heart, aorta…)."""
    from scipy import ndimage

    thick = _ball_opening((sm > rules.pool_low_hu) & (sm < rules.pool_high_hu) & body, spacing, rules.pool_radius_mm)
    lab, n = ndimage.label(thick)
    out = np.zeros_like(thick)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    for i, sl in enumerate(ndimage.find_objects(lab)):
        sl = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in sl)
        m = lab[sl] == i + 1
        vals = sm[sl][m]
        rim = ndimage.binary_dilation(m, iterations=2) & ~m
        dense_rim = float((sm[sl][rim] > 500).mean()) if rim.any() else 0.0
        if vals.std() < rules.pool_sd_hu or (m.sum() * voxel_ml > rules.pool_volume_ml and dense_rim < 0.1):
            out[sl] |= m
    return out


def thoracic_cavity(hu: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Per axial slice, the convex hull of the lungs (air inside the body); empty where there is no lung."""
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    air = (hu < -400) & body
    lab, n = ndimage.label(air)
    out = np.zeros_like(body)
    if n == 0:
        return out
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    lungs = np.isin(lab, np.flatnonzero(sizes >= 0.2 * sizes.max()))
    for k in range(lungs.shape[0]):
        if lungs[k].sum() > 50:
            out[k] = convex_hull_image(lungs[k])
    return out


def dense_vessels(sm: np.ndarray, cavity: np.ndarray, spacing, rules: SkeletonRules) -> np.ndarray:
    """Solid dense tubes inside the thoracic cavity (contrast-filled veins), not cortical shells."""
    from scipy import ndimage

    dense = sm > rules.tube_hu
    lab, n = ndimage.label(dense)
    out = np.zeros_like(dense)
    for i, sl in enumerate(ndimage.find_objects(lab)):
        m = lab[sl] == i + 1
        if not cavity[sl][m].mean() > 0.5 or np.median(sm[sl][m]) < rules.tube_median_hu:
            continue
        thick = ndimage.distance_transform_edt(np.pad(m, 1), sampling=spacing).max()
        if thick > rules.tube_radius_mm:
            out[sl] |= m
    return out


def fill_marrow(mask: np.ndarray, sm: np.ndarray, body: np.ndarray, spacing, rules: SkeletonRules) -> np.ndarray:
    """Close holes slice by slice (axial), then in 3D: marrow and trabecular bone inside the cortex.

    The spinal canal is enclosed by the vertebral arch but is not bone: an in-plane hole larger than
    ``max_hole_mm2``, with the median HU of cord and CSF (``canal_hu``), within ``canal_midline_mm``
    of the body's left–right centre stays open.  Marrow elsewhere (humeri, femora) is filled.
    """
    from scipy import ndimage

    m = ndimage.binary_closing(mask, structure=np.ones((1, 3, 3), bool)) | mask
    max_px = rules.max_hole_mm2 / float(spacing[1] * spacing[2])
    lo, hi = rules.canal_hu
    for k in range(m.shape[0]):
        holes = ndimage.binary_fill_holes(m[k]) & ~m[k]
        lab, n = ndimage.label(holes)
        if not n:
            continue
        sizes = np.bincount(lab.ravel())
        med = np.asarray(ndimage.median(sm[k], lab, np.arange(1, n + 1)))
        cols = np.flatnonzero(body[k].any(0))
        mid = (cols.min() + cols.max()) / 2 if cols.size else m.shape[2] / 2
        cx = np.asarray(ndimage.center_of_mass(holes, lab, np.arange(1, n + 1)))[:, 1]
        central = np.abs(cx - mid) * spacing[2] < rules.canal_midline_mm
        keep_open = (sizes[1:] > max_px) & (med >= lo) & (med <= hi) & central
        m[k] |= np.concatenate([[False], ~keep_open])[lab]
    return ndimage.binary_fill_holes(m)


def skeleton_mask(hu: np.ndarray, spacing, rules: SkeletonRules | None = None) -> np.ndarray:
    """All bone of a CT (``hu`` in (k, j, i) order, ``spacing`` in the same order, mm) as a bool mask."""
    from scipy import ndimage

    rules = rules or SkeletonRules()
    spacing = np.asarray(spacing, float)
    sm = ndimage.gaussian_filter(hu.astype(np.float32), rules.smooth_mm / spacing)
    csm, f = _coarse(sm, spacing, rules.coarse_mm)
    csp = spacing * np.asarray(f)
    cbody = body_mask(csm, csp, rules)
    pools = blood_pools(csm, cbody, csp, rules)
    tubes = dense_vessels(csm, thoracic_cavity(csm, cbody), csp, rules)
    excluded = _near(pools, csp, rules.pool_margin_mm) | _near(tubes, csp, rules.tube_margin_mm)
    body, excluded = _fine(cbody, f, hu.shape), _fine(excluded, f, hu.shape)
    bone = (sm > rules.bone_hu) & body & ~excluded
    bone = _drop_small(bone, spacing, rules.min_volume_ml)
    return fill_marrow(bone, sm, body, spacing, rules) & body & ~excluded


def _drop_small(mask: np.ndarray, spacing, min_ml: float) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel()) * (float(np.prod(spacing)) / 1000.0)
    sizes[0] = 0
    return (sizes >= min_ml)[lab]


def skeleton_from_ct(ct, rules: SkeletonRules | None = None) -> tuple[np.ndarray, dict[int, str], str]:
    """``(seg uint8, {1: 'skeleton'}, source text)`` for a CT :class:`~x2recon.io.volume.Volume`."""
    rules = rules or SkeletonRules()
    spacing = np.asarray(ct.spacing, float)[::-1]  # (x, y, z) → array order (k, j, i)
    mask = skeleton_mask(np.asarray(ct.array), spacing, rules)
    seg = mask.astype(np.uint8)
    return seg, ({1: SKELETON_NAME} if seg.any() else {}), f"skeleton from HU ({rules.text()})"
