"""Line integrals → radiograph-like display intensities (bone bright), CLAHE, 16-bit.

A radiograph shows dense structures bright.  The line integral Σ μ·mm already grows with density,
so the display map is linear in it: divide by a *robust* maximum (a high percentile of the pixels
that the body covers, so a few metal or contrast pixels do not darken the image), clip to [0, 1].
Then, as the X2BR paper (§4.1), contrast-limited adaptive histogram equalisation (CLAHE,
``skimage.exposure.equalize_adapthist``) with a configurable clip limit (default 0.01).  Every
parameter goes into the returned ``mapping`` dict, which the pipeline stores in ``meta.json``, so
the linear part can be inverted: ``line_integral ≈ display_before_clahe × reference``.
"""

from __future__ import annotations

import numpy as np

#: skimage's CLAHE works on a 14-bit grey scale internally.
CLAHE_GREY_LEVELS = 2**14


def robust_reference(line_integral: np.ndarray, percentile: float = 99.9) -> float:
    """The ``percentile`` of the positive line integrals (1.0 when there are none)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    li = np.asarray(line_integral, dtype=np.float64)
    pos = li[np.isfinite(li) & (li > 0)]
    ref = float(np.percentile(pos, percentile)) if pos.size else 0.0
    return ref if ref > 0 else 1.0


def to_display(
    line_integral: np.ndarray,
    *,
    percentile: float = 99.9,
    clahe: bool = True,
    clahe_clip: float = 0.01,
    kernel_size: int | None = None,
    nbins: int = 256,
) -> tuple[np.ndarray, dict]:
    """Map line integrals ``(H, W)`` to display values in [0, 1]; returns ``(image float32, mapping)``.

    Without CLAHE the map is ``clip(li / reference, 0, 1)`` (monotone).  ``kernel_size`` is CLAHE's
    tile size in pixels (default: 1/8 of the smaller image side, as skimage); ``nbins`` its
    histogram bins.
    """
    li = np.asarray(line_integral, dtype=np.float32)
    if li.ndim != 2:
        raise ValueError(f"line integrals must be a 2D image, got shape {li.shape}")
    ref = robust_reference(li, percentile)
    img = np.clip(np.nan_to_num(li, nan=0.0) / np.float32(ref), 0.0, 1.0).astype(np.float32)
    mapping = {
        "kind": "linear",
        "formula": "display = clip(line_integral / reference, 0, 1)" + (" then CLAHE" if clahe else ""),
        "reference": ref,
        "percentile": float(percentile),
        "clahe": bool(clahe),
    }
    if clahe:
        if not 0 < clahe_clip <= 1:
            raise ValueError(f"clahe_clip must be in (0, 1], got {clahe_clip}")
        from skimage.exposure import equalize_adapthist

        k = int(kernel_size) if kernel_size else max(min(img.shape) // 8, 1)
        if img.max() > img.min():  # CLAHE of a constant image is undefined (skimage divides by 0)
            img = equalize_adapthist(img, kernel_size=k, clip_limit=clahe_clip, nbins=nbins).astype(np.float32)
        mapping.update(clahe_clip=float(clahe_clip), clahe_kernel=k, clahe_nbins=int(nbins),
                       clahe_impl="skimage.exposure.equalize_adapthist")
    return img, mapping


def to_uint16(img: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint16 (0 … 65535), rounding to nearest."""
    return np.round(np.clip(np.asarray(img, dtype=np.float64), 0, 1) * 65535.0).astype(np.uint16)
