"""2D images: 16-bit PNG (DRRs) with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import X2ReconInputError
from .atomic import atomic_path


def write_png16(img: np.ndarray, path: str | Path) -> None:
    """Write a 2D uint16 array as a 16-bit greyscale PNG, atomically."""
    import SimpleITK as sitk

    a = np.asarray(img)
    if a.ndim != 2 or a.dtype != np.uint16:
        raise ValueError(f"write_png16 needs a 2D uint16 array, got {a.dtype} {a.shape}")
    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp))


def read_png(path: str | Path) -> np.ndarray:
    """Read a greyscale PNG (8 or 16 bit) as a 2D array."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise X2ReconInputError(path, "image file not found")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError:
        raise X2ReconInputError(path, "cannot read as an image") from None
    a = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise X2ReconInputError(path, f"expected a greyscale image, got {img.GetNumberOfComponentsPerPixel()} channels")
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    return a
