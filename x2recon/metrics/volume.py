"""Volume metrics of SPIDER's tables (§4.1, Tables 1–3): PSNR and SSIM of the reconstructed CT, and
Dice, HD95 and Chamfer distance (CD) of the segmented structures.

The paper names the metrics and their references but gives no formulas, so the definitions here are
the standard ones, chosen explicitly:

* PSNR = 10·log10(R² / MSE) over all voxels, with R the ``data_range``.  ``volume_metrics`` clips both
  CTs to an HU window (default [−1024, 3071], the 12-bit CT range) and uses its width as R, so one
  case's PSNR does not depend on its own brightest voxel; ``psnr`` alone takes R explicitly and
  defaults to the reference's dynamic range (max − min) when R is None.
* SSIM as Wang et al. 2004 (the paper's ref. [36]) in 3D: Gaussian-weighted local statistics
  (σ = 1.5 voxels, 11-tap window), population covariances, K1 = 0.01, K2 = 0.03, C = (K·R)², averaged
  over the voxels whose window lies inside the volume — scikit-image's ``structural_similarity`` with
  ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False`` computes the same number.
* Dice = 2|P∩G| / (|P|+|G|) per structure (a structure may be a group of label ids, e.g. both kidneys).
* Surface distances: a structure's surface is its border voxels (inside, with a 6-neighbour outside;
  the array's edge counts as outside); for each border voxel of one mask, the Euclidean distance in
  mm (anisotropic spacing honoured) from its centre to the nearest border-voxel centre of the other.
* HD95 = 95th percentile of the pooled distances of both directions (as medpy's ``hd95``);
  ``hd_mode="max"`` gives the other common reading, the larger of the two directed 95th percentiles
  (MONAI, DeepMind's surface-distance).
* CD = ½ (mean directed distance P→G + mean G→P), the same convention as ``chamfer_l1`` in
  ``metrics.mesh`` (ONet's Chamfer-L1); the sum convention is twice this.

Empty structures never raise: Dice is NaN when the structure is in neither volume (nothing to score)
and 0 when it is in only one.  HD95 and CD of a structure in only one volume (a miss: the model
predicts nothing where the ground truth has it; or a false positive) have no surface to measure to:
they are NaN by default, or ``empty_penalty`` mm when one is given — the SPIDER evaluation passes the
reconstruction box's diagonal, the largest distance two points of the box can have, so a miss counts
as the worst boundary error instead of dropping out of the mean.  Averages are means over the
structures with a finite value; ``VolumeMetrics.missing`` says which structures were absent and
where, so a miss never hides.  The paper's tables print SSIM and Dice ×100.

Spacing is given per array axis, in the array's axis order: for a ``Volume`` (array ``[z, y, x]``,
spacing ``(sx, sy, sz)``) pass ``vol.spacing[::-1]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

#: Default HU window for PSNR/SSIM in ``volume_metrics``: the 12-bit CT range, width 4095 HU.
HU_WINDOW = (-1024.0, 3071.0)


def psnr(pred: np.ndarray, gt: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, 10·log10(R²/MSE); R = ``data_range`` or gt.max() − gt.min().
    ``inf`` for identical volumes."""
    p, g = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if p.shape != g.shape:
        raise ValueError(f"shapes differ: {p.shape} vs {g.shape}")
    r = float(g.max() - g.min()) if data_range is None else float(data_range)
    if not r > 0:
        raise ValueError(f"data_range must be positive, got {r}")
    mse = float(np.mean((p - g) ** 2))
    return np.inf if mse == 0 else float(10.0 * np.log10(r * r / mse))


def ssim(pred: np.ndarray, gt: np.ndarray, data_range: float, *, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03, truncate: float = 3.5) -> float:
    """Mean SSIM (Wang et al. 2004) of two volumes (any dimension), Gaussian window, see module doc.

    Computed in float64 (HU² local moments lose digits in float32).  The mean is over voxels at least
    the window's radius (``int(truncate·sigma + ½)``) from the edge, as scikit-image does."""
    p, g = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if p.shape != g.shape:
        raise ValueError(f"shapes differ: {p.shape} vs {g.shape}")
    rad = int(truncate * sigma + 0.5)
    if min(p.shape) < 2 * rad + 1:
        raise ValueError(f"SSIM needs at least {2 * rad + 1} voxels per axis, got {p.shape}")

    def blur(a):
        return ndimage.gaussian_filter(a, sigma, mode="reflect", truncate=truncate)

    mp, mg = blur(p), blur(g)
    vp = blur(p * p) - mp * mp
    vg = blur(g * g) - mg * mg
    cov = blur(p * g) - mp * mg
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mp * mg + c1) * (2 * cov + c2)) / ((mp * mp + mg * mg + c1) * (vp + vg + c2))
    inner = tuple(slice(rad, n - rad) for n in s.shape)
    return float(s[inner].mean(dtype=np.float64))


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P∩G| / (|P|+|G|) of two boolean masks; NaN when both are empty, 0 when one is."""
    a, b = np.asarray(pred, bool), np.asarray(gt, bool)
    n = int(a.sum()) + int(b.sum())
    return np.nan if n == 0 else float(2.0 * np.logical_and(a, b).sum() / n)


_FACE = {}  # ndim -> 2·ndim-connected structuring element


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Border voxels of a boolean mask: inside, with a face neighbour outside (the array edge is outside)."""
    m = np.asarray(mask, bool)
    st = _FACE.setdefault(m.ndim, ndimage.generate_binary_structure(m.ndim, 1))
    return m & ~ndimage.binary_erosion(m, structure=st, border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(d_pg, d_gp)``: for each border voxel of ``pred`` the distance (mm) to the nearest border voxel
    of ``gt``, and the reverse.  Both masks must be non-empty.

    Exact Euclidean distance transforms (``distance_transform_edt`` with ``sampling=spacing``) on the
    masks' joint bounding box plus one voxel: every border voxel and every nearest one lies inside it,
    so cropping changes no distance and a 128³ volume's structure costs milliseconds."""
    a, b = np.asarray(pred, bool), np.asarray(gt, bool)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    sp = np.asarray(spacing, np.float64).reshape(-1)
    if sp.size != a.ndim or not np.all(sp > 0):
        raise ValueError(f"spacing must be {a.ndim} positive numbers (one per array axis), got {spacing}")
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    box = ndimage.find_objects((a | b).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, a.shape))
    # the one-voxel margin keeps masks off the crop's edge unless they touch the array's edge
    sa, sb = surface_voxels(a[box]), surface_voxels(b[box])
    d_to_b = ndimage.distance_transform_edt(~sb, sampling=sp)
    d_to_a = ndimage.distance_transform_edt(~sa, sampling=sp)
    return d_to_b[sa], d_to_a[sb]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], mode: str = "pooled") -> float:
    """95th-percentile Hausdorff distance in mm (NaN if either mask is empty); ``mode``: "pooled"
    (percentile of both directions' distances together) or "max" (larger directed percentile)."""
    if not np.any(pred) or not np.any(gt):
        return np.nan
    d1, d2 = surface_distances(pred, gt, spacing)
    return _hd95(d1, d2, mode)


def _hd95(d1: np.ndarray, d2: np.ndarray, mode: str) -> float:
    if mode == "pooled":
        return float(np.percentile(np.concatenate([d1, d2]), 95))
    if mode == "max":
        return float(max(np.percentile(d1, 95), np.percentile(d2, 95)))
    raise ValueError(f"hd mode must be 'pooled' or 'max', got {mode!r}")


def chamfer(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Chamfer distance in mm between the masks' surfaces, ½(mean P→G + mean G→P); NaN if one is empty."""
    if not np.any(pred) or not np.any(gt):
        return np.nan
    d1, d2 = surface_distances(pred, gt, spacing)
    return float(0.5 * (d1.mean() + d2.mean()))


@dataclass
class VolumeMetrics:
    """Metrics of one reconstruction.  Per-structure dicts are keyed by structure name (or label id)."""

    psnr: float
    ssim: float
    dice: dict = field(default_factory=dict)
    hd95: dict = field(default_factory=dict)
    chamfer: dict = field(default_factory=dict)
    mean_dice: float = np.nan
    mean_hd95: float = np.nan
    mean_chamfer: float = np.nan
    missing: dict = field(default_factory=dict)  # structure -> "pred" | "gt" | "both"
    data_range: float = np.nan

    def to_dict(self) -> dict:
        return asdict(self)


def _structures(labels, pred_labels, gt_labels) -> dict:
    """Normalise ``labels`` to {key: tuple of ids}."""
    if labels is None:
        ids = np.union1d(np.unique(pred_labels), np.unique(gt_labels))
        return {int(i): (int(i),) for i in ids if i != 0}
    if isinstance(labels, Mapping):
        return {k: tuple(int(i) for i in (v if isinstance(v, Iterable) else (v,))) for k, v in labels.items()}
    return {int(i): (int(i),) for i in labels}


def _nanmean(values) -> float:
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    return float(v.mean()) if v.size else np.nan


def _unwrap(volumes, spacing):
    """Arrays from arrays or ``Volume``s; spacing per array axis (a Volume's, reversed, by default)."""
    grids = [v for v in volumes if hasattr(v, "array") and hasattr(v, "spacing")]
    for v in grids[1:]:
        if not v.same_grid(grids[0]):
            raise ValueError(f"volumes are on different grids: {grids[0].grid_text(v)} vs {v.grid_text(grids[0])}")
    if spacing is None:
        if not grids:
            raise ValueError("spacing is needed when plain arrays are given")
        spacing = np.asarray(grids[0].spacing, np.float64)[::-1]
    return [v.array if hasattr(v, "array") else v for v in volumes], spacing


def volume_metrics(pred_ct, gt_ct, pred_labels, gt_labels, spacing: Sequence[float] | None = None, labels=None,
                   *, hu_window: tuple[float, float] | None = HU_WINDOW, data_range: float | None = None,
                   hd_mode: str = "pooled", empty_penalty: float | None = None) -> VolumeMetrics:
    """All of SPIDER's metrics for one case: CT (PSNR, SSIM) and per-structure Dice, HD95, CD.

    Inputs are arrays on one grid (``spacing`` per array axis) or ``Volume``s (then ``spacing``
    defaults to theirs, reversed to the array's [z, y, x] order).  ``labels``: None (every non-zero
    id in either labelmap), a sequence of ids, or a mapping name → id or name → ids (a group scored
    as one structure, as the paper's "Kidney" or "Vertebrae").  ``hu_window``: both CTs are clipped
    to it and its width is the data range; ``hu_window=None`` leaves them as they are and takes
    ``data_range`` (default: the reference's max − min).  Either pair of inputs may be None to skip
    those metrics (their values are NaN).  ``empty_penalty`` (mm): HD95 and CD of a structure in
    only one of the two labelmaps (see the module doc); None leaves them NaN."""
    (pred_ct, gt_ct, pred_labels, gt_labels), spacing = _unwrap((pred_ct, gt_ct, pred_labels, gt_labels), spacing)
    out = VolumeMetrics(psnr=np.nan, ssim=np.nan)
    if pred_ct is not None and gt_ct is not None:
        p, g = np.asarray(pred_ct, np.float64), np.asarray(gt_ct, np.float64)
        if hu_window is not None:
            lo, hi = map(float, hu_window)
            p, g = np.clip(p, lo, hi), np.clip(g, lo, hi)
            r = hi - lo if data_range is None else float(data_range)
        else:
            r = float(g.max() - g.min()) if data_range is None else float(data_range)
        out.data_range = r
        out.psnr = psnr(p, g, r)
        out.ssim = ssim(p, g, r)
    if pred_labels is not None and gt_labels is not None:
        pl, gl = np.asarray(pred_labels), np.asarray(gt_labels)
        if pl.shape != gl.shape:
            raise ValueError(f"labelmap shapes differ: {pl.shape} vs {gl.shape}")
        for key, ids in _structures(labels, pl, gl).items():
            pm, gm = np.isin(pl, ids), np.isin(gl, ids)
            has_p, has_g = bool(pm.any()), bool(gm.any())
            out.dice[key] = dice(pm, gm)
            if has_p and has_g:
                d1, d2 = surface_distances(pm, gm, spacing)
                out.hd95[key] = _hd95(d1, d2, hd_mode)
                out.chamfer[key] = float(0.5 * (d1.mean() + d2.mean()))
            else:
                one_sided = has_p or has_g
                out.hd95[key] = out.chamfer[key] = np.nan if empty_penalty is None or not one_sided \
                    else float(empty_penalty)
                out.missing[key] = "both" if not one_sided else ("pred" if has_g else "gt")
        out.mean_dice = _nanmean(out.dice.values())
        out.mean_hd95 = _nanmean(out.hd95.values())
        out.mean_chamfer = _nanmean(out.chamfer.values())
    return out
