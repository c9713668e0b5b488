"""Line integrals → radiograph-like display intensities (bone bright), CLAHE, 16-bit."""

from __future__ import annotations

import numpy as np


def to_display(line_integral: np.ndarray, *, percentile: float = 99.9, clahe: bool = True,
               clahe_clip: float = 0.01, kernel_fraction: float = 1 / 8) -> tuple[np.ndarray, dict]:
    """Map line integrals to [0, 1] display values and optionally apply CLAHE (X2BR paper §4.1).

    The linear map divides by a robust maximum (the ``percentile`` of non-zero line integrals)
    so that a few very dense pixels (metal, contrast) do not darken the image.  Returns
    ``(image float32 in [0, 1], mapping)``; ``mapping`` records every parameter for meta.json.
    """
    li = np.asarray(line_integral, dtype=np.float32)
    nz = li[li > 0]
    ref = float(np.percentile(nz, percentile)) if nz.size else 1.0
    ref = ref if ref > 0 else 1.0
    img = np.clip(li / ref, 0.0, 1.0)
    mapping = {"kind": "linear", "reference": ref, "percentile": percentile, "clahe": bool(clahe)}
    if clahe:
        from skimage.exposure import equalize_adapthist

        k = max(8, int(round(min(img.shape) * kernel_fraction)))
        img = equalize_adapthist(img, kernel_size=k, clip_limit=clahe_clip).astype(np.float32)
        mapping.update(clahe_clip=clahe_clip, clahe_kernel=k)
    return img, mapping


def to_uint16(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 65535.0).astype(np.uint16)
