"""X-ray inputs for reconstruction: an image in display intensities plus the geometry it was taken with.

Readers for what users bring — our DRR PNGs (with their ``<stem>.json`` geometry), other 8/16-bit
greyscale PNGs, DICOM radiographs, and 2D NIfTI/NRRD/MHA images — each turned into an ``XRay``:
``image`` (H, W) float32 in [0, 1], bone bright, row 0 at the top, and a ``ProjectionGeometry``
whose ``size`` is (W, H).  Files that are not already display images (DICOM, NIfTI, …) are mapped
as the dataset builder maps DRRs (robust linear window, then CLAHE), so the network sees what it
was trained on.  Without a geometry file the named view's default chest geometry is used, with the
file's pixel spacing (and a DICOM's source distances) where it has them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import X2ReconInputError
from ..geometry import CHEST_DEFAULTS, ProjectionGeometry
from .image import read_grey_2d, read_png

MIN_SIZE = 32
PNG_SUFFIXES = (".png",)
DICOM_SUFFIXES = (".dcm", ".dicom", "")
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class XRay:
    image: np.ndarray  # (H, W) float32 in [0, 1]
    geometry: ProjectionGeometry
    source: str = "array"

    @property
    def view_name(self) -> str:
        return self.geometry.name or "?"

    def resized(self, size: int) -> "XRay":
        """Area-resampled to ``size``² (the network's input), geometry resized to match."""
        from ..drr.render import area_matrix

        H, W = self.image.shape
        if (W, H) == (size, size):
            return self
        ry, rx = area_matrix(H, size), area_matrix(W, size)
        img = (ry @ self.image.astype(np.float64) @ rx.T).astype(np.float32)
        return replace(self, image=img, geometry=self.geometry.resized(size, size))

    def network_input(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image (1, size, size) float32, grid matrix (3, 4) float32)`` for X2B."""
        x = self.resized(size)
        return x.image[None].astype(np.float32), x.geometry.box_to_grid_matrix().astype(np.float32)


def _stem(path: Path) -> Path:
    name = path.name
    for suf in (".nii.gz",) + PNG_SUFFIXES + VOLUME_SUFFIXES + DICOM_SUFFIXES[:2]:
        if suf and name.lower().endswith(suf):
            return path.with_name(name[: -len(suf)])
    return path


def sidecar_geometry(path: str | Path) -> Path | None:
    """``<stem>.json`` beside an image (as ``write_drr`` writes it), if present."""
    p = _stem(Path(path)).with_suffix(".json") if not str(path).endswith(".json") else None
    return p if p is not None and p.is_file() else None


def default_geometry(view: str | float, width: int, height: int, *, pixel_mm: float | None = None,
                     sdd: float | None = None, sod: float | None = None) -> ProjectionGeometry:
    """The chest default geometry of ``view`` for a ``width``×``height`` image, isocentre at the origin."""
    if pixel_mm is None:
        if width != height:
            raise ValueError(f"a {width}×{height} image without pixel spacing or a geometry file: the default "
                             "detector is square; give --geometry")
        detector = CHEST_DEFAULTS["detector_mm"]
    else:
        detector = pixel_mm * width
    g = ProjectionGeometry.from_view(view, (0.0, 0.0, 0.0), sdd=sdd or CHEST_DEFAULTS["sdd"],
                                     sod=sod or CHEST_DEFAULTS["sod"], size=(width, height),
                                     detector_mm=detector, kind=CHEST_DEFAULTS["kind"])
    return g


def display_map(raw: np.ndarray, *, clahe: bool = True, clahe_clip: float = 0.01) -> np.ndarray:
    """Raw detector values (bone bright) → [0, 1] display as DRRs are made: linear between the 0.5th
    and 99.5th percentiles, then CLAHE."""
    a = np.asarray(raw, np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        raise ValueError("the image has no finite pixels")
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        raise ValueError("the image is constant")
    img = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0, 1)
    if clahe:
        from skimage.exposure import equalize_adapthist

        img = equalize_adapthist(img, clip_limit=clahe_clip)
    return img.astype(np.float32)


def xray_from_array(image: np.ndarray, geometry: ProjectionGeometry, source: str = "array") -> XRay:
    """An ``XRay`` from a display image: uint8 (/255), uint16 (/65535) or float in [0, 1]."""
    a = np.asarray(image)
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    if a.ndim != 2:
        raise X2ReconInputError(source, f"an X-ray must be one 2D greyscale image, got shape {a.shape}")
    H, W = a.shape
    if min(H, W) < MIN_SIZE:
        raise X2ReconInputError(source, f"image is {W}×{H} pixels; at least {MIN_SIZE}×{MIN_SIZE} are needed")
    if tuple(geometry.size) != (W, H):
        raise X2ReconInputError(source, f"image is {W}×{H} but its geometry is for {geometry.size[0]}×{geometry.size[1]}")
    if a.dtype == np.uint8:
        img = a / 255.0
    elif a.dtype == np.uint16:
        img = a / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < -1e-6 or a.max() > 1 + 1e-6:
            raise X2ReconInputError(source, "float display images must lie in [0, 1]")
        img = np.clip(a, 0, 1)
    else:
        raise X2ReconInputError(source, f"unsupported pixel type {a.dtype}")
    if float(img.max()) - float(img.min()) < 1e-6:
        raise X2ReconInputError(source, "the image is blank (constant)")
    return XRay(img.astype(np.float32), geometry, str(source))


def _dicom_tag(img, key: str) -> str | None:
    return img.GetMetaData(key).strip() if img.HasMetaDataKey(key) else None


def read_xray(path: str | Path, *, view: str | float = "AP", geometry: ProjectionGeometry | str | Path | None = None,
              clahe_clip: float = 0.01) -> XRay:
    """Read an X-ray file (see module doc); ``geometry`` (object or JSON path) overrides the sidecar
    and the default of ``view``."""
    path = Path(path)
    if not path.exists():
        raise X2ReconInputError(path, "X-ray file not found")
    if path.is_dir():
        raise X2ReconInputError(path, "is a folder; give one X-ray image file")
    if isinstance(geometry, (str, Path)):
        geometry = ProjectionGeometry.from_json(Path(geometry))
    name = path.name.lower()
    spacing = sdd = sod = None
    if name.endswith(PNG_SUFFIXES):
        raw = read_png(path)
        display = raw  # already a display image (our DRRs, exported radiographs)
    else:
        with open(path, "rb") as f:
            head = f.read(132)
        is_dicom = len(head) >= 132 and head[128:132] == b"DICM"
        if not (is_dicom or name.endswith(VOLUME_SUFFIXES)):
            raise X2ReconInputError(path, "unsupported X-ray format: give a PNG, a DICOM file, or a 2D NIfTI/NRRD/MHA image")
        img, a = read_grey_2d(path, "X-ray")
        sp = img.GetSpacing()
        if is_dicom:
            ips = _dicom_tag(img, "0018|1164")  # Imager Pixel Spacing (detector plane)
            if ips:
                spacing = float(ips.split("\\")[0])
            sdd = float(_dicom_tag(img, "0018|1110")) if _dicom_tag(img, "0018|1110") else None
            sod = float(_dicom_tag(img, "0018|1111")) if _dicom_tag(img, "0018|1111") else None
            if _dicom_tag(img, "0028|0004") == "MONOCHROME1":  # bone dark: invert
                a = a.max() - a
        if spacing is None and not np.allclose(sp[:2], 1.0):
            spacing = float(sp[0])
        try:
            display = display_map(a, clahe_clip=clahe_clip)
        except ValueError as e:
            raise X2ReconInputError(path, str(e)) from None
    H, W = display.shape
    if geometry is None:
        side = sidecar_geometry(path)
        if side is not None:
            geometry = ProjectionGeometry.from_json(side)
        else:
            try:
                geometry = default_geometry(view, W, H, pixel_mm=spacing, sdd=sdd, sod=sod)
            except ValueError as e:
                raise X2ReconInputError(path, str(e)) from None
    return xray_from_array(display, geometry, str(path))
