"""2D greyscale images: 16-bit PNG for DRRs (written atomically), with clear errors on bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import X2ReconInputError
from ..geometry import MAX_PIXELS
from . import native_path
from .atomic import atomic_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of exact area resampling: output pixel j averages the input over
    ``[j, j + 1) · n_in / n_out`` (input pixel i covers ``[i, i + 1)``), fractional overlaps included."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    i = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, i + 1) - np.maximum(lo, i), 0, None)
    return overlap / overlap.sum(1, keepdims=True)


def check_pixel_count(width: int, height: int, what: str, path=None) -> None:
    """An ``X2ReconInputError`` for a ``width``×``height`` image over ``MAX_PIXELS``, before anything is allocated."""
    if int(width) * int(height) > MAX_PIXELS:
        raise X2ReconInputError(path, f"{what} is {int(width)}×{int(height)} pixels; x2recon reads and renders at "
                                      f"most {MAX_PIXELS:,} pixels (16384²)")


def write_png16(img: np.ndarray, path: str | Path) -> Path:
    """Write a 2D uint16 array as a 16-bit greyscale PNG, atomically; returns the path."""
    import SimpleITK as sitk

    a = np.asarray(img)
    if a.ndim != 2 or a.dtype != np.uint16:
        raise ValueError(f"write_png16 needs a 2D uint16 array, got {a.dtype} {a.shape}")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"write_png16: {path} does not end in .png")
    with atomic_path(path) as tmp:
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(a)), native_path(tmp))
    return path


def read_grey_2d(path: str | Path, kind: str = "image"):
    """``(SimpleITK image, (H, W) array)`` of a one-channel, one-slice image file (PNG, DICOM, NIfTI,
    NRRD, MHA…), or an ``X2ReconInputError`` naming the file and what is wrong with it."""
    import SimpleITK as sitk

    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(native_path(path))
        reader.ReadImageInformation()  # the header only: refuse huge images before decoding them
        size = reader.GetSize()
        check_pixel_count(size[0], size[1] if len(size) > 1 else 1, f"the {kind}", path)
        if len(size) > 2 and size[2] > 1:
            raise X2ReconInputError(path, f"expected one 2D {kind}, got a volume with {size[2]} slices")
        img = reader.Execute()
    except RuntimeError as e:
        raise X2ReconInputError(path, f"cannot read the {kind} ({str(e).strip().splitlines()[-1][:160]})") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise X2ReconInputError(path, f"expected a greyscale {kind}, got {img.GetNumberOfComponentsPerPixel()} channels")
    a = sitk.GetArrayFromImage(img)
    if a.ndim == 3:
        if a.shape[0] != 1:
            raise X2ReconInputError(path, f"expected one 2D {kind}, got a volume with {a.shape[0]} slices")
        a = a[0]
    if a.ndim != 2:
        raise X2ReconInputError(path, f"expected a 2D {kind}, got shape {a.shape}")
    return img, a


def png_header(path: str | Path) -> dict:
    """What a PNG's chunks before its image data say: ``width``, ``height``, ``bit_depth``, ``colour_type``
    (0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA) and ``significant_bits`` (the sBIT chunk's grey or
    red value; None without one)."""
    import struct

    out = {"significant_bits": None}
    with open(path, "rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise X2ReconInputError(path, "not a PNG file (bad signature)")
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND") or length > 1 << 24:
                break
            data = f.read(length)
            f.seek(4, 1)  # CRC
            if kind == b"IHDR" and len(data) >= 10:
                out.update(zip(("width", "height", "bit_depth", "colour_type"), struct.unpack(">IIBB", data[:10])))
            elif kind == b"sBIT" and data:
                out["significant_bits"] = data[0]
    if "colour_type" not in out:
        raise X2ReconInputError(path, "not a valid PNG file (no IHDR header chunk)")
    return out


def _grey_of_grey_alpha_png(path: Path, info: dict) -> np.ndarray:
    """The grey channel of a grey + alpha PNG, which ITK cannot read ("Unknown PixelType"), decoded by Pillow
    (a scikit-image dependency).  Its alpha must be opaque everywhere: what lies under transparent pixels is
    unknown, so such a file is refused rather than flattened onto a guessed background.  Pillow decodes
    16-bit grey + alpha at 8 bits."""
    from PIL import Image

    check_pixel_count(info["width"], info["height"], "the PNG", path)
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im)
    except Exception as e:  # a truncated or corrupt file: Pillow's own words
        raise X2ReconInputError(path, f"cannot read the grey + alpha PNG ({type(e).__name__}: {e})") from None
    if a.ndim != 3 or a.shape[-1] not in (2, 4):
        raise X2ReconInputError(path, f"cannot read the grey + alpha PNG (decoded as {a.shape})")
    grey, alpha = a[..., 0], a[..., -1]
    opaque = np.iinfo(alpha.dtype).max
    if (alpha < opaque).any():
        raise X2ReconInputError(path, f"grey + alpha PNG with {float((alpha < opaque).mean()):.1%} of its pixels "
                                      "(partly) transparent: what lies under them is unknown; save the radiograph "
                                      "without transparency (flatten it)")
    return np.ascontiguousarray(grey)


def read_png(path: str | Path) -> np.ndarray:
    """Read a greyscale PNG (8 or 16 bit) as a 2D ``uint8``/``uint16`` array ``(H, W)``.  A grey + alpha
    PNG whose alpha is opaque everywhere is read as its grey channel (see ``_grey_of_grey_alpha_png``)."""

    path = Path(path)
    if not path.is_file():
        raise X2ReconInputError(path, "image file not found")
    info = png_header(path)
    if info["colour_type"] == 4:
        a = _grey_of_grey_alpha_png(path, info)
    else:
        _, a = read_grey_2d(path, "PNG")
    if a.dtype not in (np.uint8, np.uint16):
        raise X2ReconInputError(path, f"expected 8- or 16-bit unsigned pixels, got {a.dtype}")
    return a
