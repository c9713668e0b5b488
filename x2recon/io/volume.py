"""CT and labelmap volumes: reading with clear errors, and the voxel ↔ LPS-mm affine."""

from __future__ import annotations

import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import X2ReconInputError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class Volume:
    """A 3D image in LPS mm.  ``array`` is indexed ``[k, j, i]`` (z, y, x) as SimpleITK gives it."""

    array: np.ndarray
    spacing: np.ndarray  # (sx, sy, sz) mm
    origin: np.ndarray  # LPS mm of voxel (0, 0, 0)'s centre
    direction: np.ndarray  # 3×3, columns = world directions of the i, j, k axes
    path: str | None = None

    def __post_init__(self):
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[::-1])

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix mapping continuous voxel index (i, j, k, 1) to LPS mm."""
        A = np.eye(4)
        A[:3, :3] = self.direction @ np.diag(self.spacing)
        A[:3, 3] = self.origin
        return A

    def index_to_world(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64)
        A = self.affine
        return ijk @ A[:3, :3].T + A[:3, 3]

    def world_to_index(self, xyz) -> np.ndarray:
        xyz = np.asarray(xyz, dtype=np.float64)
        Ainv = np.linalg.inv(self.affine)
        return xyz @ Ainv[:3, :3].T + Ainv[:3, 3]

    def corners_world(self) -> np.ndarray:
        """The 8 corners of the voxel grid's outer boundary (voxel edges, not centres)."""
        n = np.array(self.shape_xyz, dtype=np.float64)
        c = np.array([[a, b, d] for a in (0, 1) for b in (0, 1) for d in (0, 1)], dtype=np.float64)
        return self.index_to_world(c * n - 0.5)

    def same_grid(self, other: "Volume", tol: float = 1e-3) -> bool:
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol * 10)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def grid_text(self) -> str:
        return (
            f"size {self.shape_xyz}, spacing {np.round(self.spacing, 3).tolist()} mm, "
            f"origin {np.round(self.origin, 2).tolist()}"
        )

    def with_array(self, array: np.ndarray) -> "Volume":
        if array.shape != self.array.shape:
            raise ValueError("with_array: shape differs")
        return Volume(array, self.spacing.copy(), self.origin.copy(), self.direction.copy(), self.path)

    # --------------------------------------------------------------- SimpleITK bridge
    @classmethod
    def from_sitk(cls, img, path=None) -> "Volume":
        import SimpleITK as sitk

        return cls(
            sitk.GetArrayFromImage(img),
            img.GetSpacing(),
            img.GetOrigin(),
            np.array(img.GetDirection()).reshape(3, 3),
            None if path is None else str(path),
        )

    def to_sitk(self):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing.tolist())
        img.SetOrigin(self.origin.tolist())
        img.SetDirection(self.direction.reshape(-1).tolist())
        return img


#: Plausible CT voxel spacing (mm): finer is a micro-CT or a header error, coarser is not a CT grid.
SPACING_RANGE_MM = (0.1, 10.0)


def _check_regular(path: Path, what: str) -> None:
    """A file must be a regular file (or, for DICOM, a folder): never read a device or a FIFO."""
    if not path.exists():
        raise X2ReconInputError(path, f"{what} file not found")
    if not (path.is_dir() or stat.S_ISREG(path.stat().st_mode)):
        raise X2ReconInputError(path, f"not a regular file (a device, FIFO or socket); give a {what} file")


@contextmanager
def locale_kept():
    """Undo a locale change made inside the block.  GDCM (SimpleITK's DICOM writer) can switch the
    process to the C locale and leave it so (seen writing tagged CT slices): Python's default text
    encoding then becomes ASCII for the rest of the process (a Slicer session, a test run)."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


def _read_image(path: Path, what: str):
    import SimpleITK as sitk

    _check_regular(path, what)
    try:
        if path.is_dir():
            return _read_dicom_series(path, what)
        _check_nifti_complete(path)
        return sitk.ReadImage(str(path))
    except X2ReconInputError:
        raise
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "Unable" in ln), first[-1] if first else "")
        raise X2ReconInputError(path, f"cannot read as a {what} image ({detail.strip()[:200]})") from None


def _check_nifti_complete(path: Path) -> None:
    """A NIfTI file holds all the voxels its header announces (and a ``.gz`` is a complete, intact
    gzip stream): SimpleITK reads the missing part of a truncated file as zeros without a word."""
    import gzip
    import zlib

    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"  # by content: ITK reads a plain file named .gz as well
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as f:
            hdr = f.read(348)
            need = _nifti_data_end(hdr)
            if need is None:
                return  # not a NIfTI-1 header: SimpleITK decides (and says it cannot read it)
            size = len(hdr)
            while chunk := f.read(1 << 24):  # reading to the end checks the gzip CRC and length
                size += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise X2ReconInputError(path, f"truncated or corrupt gzip stream ({e}); the file is incomplete") from None
    if size < need:
        raise X2ReconInputError(path, f"truncated NIfTI file: the header announces {need:,} bytes of image, "
                                f"the file holds {size:,}")


def _nifti_data_end(hdr: bytes) -> int | None:
    """Bytes a NIfTI-1 file must hold (voxel offset + voxel data), or None for another format."""
    import struct

    if len(hdr) < 348 or hdr[344:348] != b"n+1\0":  # single-file NIfTI-1
        return None
    for order in "<>":
        if struct.unpack(order + "i", hdr[:4])[0] == 348:
            break
    else:
        return None
    dim = struct.unpack(order + "8h", hdr[40:56])
    bitpix = struct.unpack(order + "h", hdr[72:74])[0]
    offset = struct.unpack(order + "f", hdr[108:112])[0]
    n = int(np.prod([max(int(d), 1) for d in dim[1 : 1 + max(0, min(int(dim[0]), 7))]], dtype=np.int64))
    return int(offset) + n * max(int(bitpix), 0) // 8


def _read_dicom_series(path: Path, what: str):
    """One DICOM series from a folder, refusing unreadable files, several series, and missing or
    uneven slices (ITK would drop a corrupt slice and stretch the spacing with a mere warning)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(path))
    if not ids:
        raise X2ReconInputError(path, f"folder holds no DICOM series (expected a {what})")
    if len(ids) > 1:
        raise X2ReconInputError(path, f"folder holds {len(ids)} DICOM series; put each series in its own folder")
    files = list(reader.GetGDCMSeriesFileNames(str(path), ids[0]))
    listed = {Path(f).name for f in files}
    for q in sorted(path.iterdir()):
        if q.is_file() and q.name not in listed and not q.name.startswith(".") and q.suffix.lower() in (".dcm", ""):
            raise X2ReconInputError(q, "DICOM slice cannot be read as part of the series (corrupt or truncated?)")
    _check_slice_positions(path, files)
    reader.SetFileNames(files)
    return reader.Execute()


def _check_slice_positions(path: Path, files: list[str]) -> None:
    """Slices evenly spaced along their normal, none missing or duplicated."""
    import SimpleITK as sitk

    pos = []
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        try:
            r.ReadImageInformation()
            ipp = [float(x) for x in r.GetMetaData("0020|0032").split("\\")]
            iop = [float(x) for x in r.GetMetaData("0020|0037").split("\\")]
        except (RuntimeError, ValueError):
            raise X2ReconInputError(f, "DICOM slice without a readable position/orientation (corrupt?)") from None
        pos.append(np.dot(ipp, np.cross(iop[:3], iop[3:])))
    if len(pos) < 3:
        return
    order = np.argsort(pos)
    gaps = np.diff(np.asarray(pos)[order])
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > 0.1 * max(step, 1e-6))
    if step <= 1e-6 or bad.size:
        i = int(bad[0]) if bad.size else 0
        a, b = Path(files[order[i]]).name, Path(files[order[i + 1]]).name
        raise X2ReconInputError(path, f"DICOM slices are not evenly spaced: {gaps[i]:.2f} mm between {a} and {b} "
                                f"where the series steps {step:.2f} mm (a missing or duplicated slice?)")


def _check_grid(vol: "Volume", path: Path, spacing_range) -> None:
    """Finite, plausible spacing (``spacing_range`` mm, else > 0) and an invertible direction matrix."""
    sp = vol.spacing
    lo, hi = spacing_range or (1e-6, np.inf)
    if not np.all(np.isfinite(sp)) or np.any(sp < lo) or np.any(sp > hi):
        raise X2ReconInputError(path, f"implausible voxel spacing {np.round(sp, 4).tolist()} mm "
                                f"(a CT has {lo}–{hi} mm); check the file's header")
    if not np.all(np.isfinite(vol.origin)) or not np.all(np.isfinite(vol.direction)) or \
            abs(np.linalg.det(vol.direction)) < 1e-6:
        raise X2ReconInputError(path, "invalid origin or direction matrix in the header")


def read_ct(path: str | Path, *, spacing_range: tuple[float, float] | None = SPACING_RANGE_MM) -> Volume:
    """Read a CT (NIfTI, NRRD, MHA or a DICOM folder) in Hounsfield units.

    Rejects files that are not regular files, truncated NIfTI, DICOM series with a corrupt,
    missing or uneven slice, volumes that are not 3D scalar, non-finite values, values that
    cannot be HU (a CT has air near −1000 and no values far outside [−3000, 40000]), and voxel
    spacing outside ``spacing_range`` mm (``None``: only finite and positive, for x2recon's own
    coarse box grids such as SPIDER targets).
    """
    path = Path(path)
    img = _read_image(path, "CT")
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise X2ReconInputError(
            path, f"not a CT: expected a 3D scalar volume, got {img.GetDimension()}D with "
            f"{img.GetNumberOfComponentsPerPixel()} component(s)"
        )
    vol = Volume.from_sitk(img, path)
    if min(vol.shape_xyz) < 2:
        raise X2ReconInputError(path, f"not a CT: volume is {vol.shape_xyz} voxels")
    _check_grid(vol, path, spacing_range)
    a = vol.array
    if np.issubdtype(a.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise X2ReconInputError(path, f"not a CT: {bad:,} of {a.size:,} voxels are NaN or infinite")
    lo, hi = float(np.percentile(a, 0.1)), float(a.max())
    if lo > -100 or float(a.min()) < -10000 or hi > 40000:
        raise X2ReconInputError(
            path,
            f"not a CT in Hounsfield units: intensities span {float(a.min()):.0f}…{hi:.0f} "
            "(expected fat or air below −100 HU and no values beyond −10000…40000)",
        )
    vol.array = a.astype(np.int16) if a.dtype != np.int16 and a.min() >= -32768 and a.max() <= 32767 else a
    return vol


def read_labelmap(path: str | Path) -> Volume:
    """Read an integer labelmap (NIfTI/NRRD/MHA)."""
    path = Path(path)
    img = _read_image(path, "labelmap")
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise X2ReconInputError(path, "not a labelmap: expected a 3D single-component volume")
    vol = Volume.from_sitk(img, path)
    a = vol.array
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        raise X2ReconInputError(path, "not a labelmap: NaN or infinite values")
    if not np.issubdtype(a.dtype, np.integer):
        if not np.allclose(a, np.round(a)):
            raise X2ReconInputError(path, "not a labelmap: values are not integers")
        a = np.round(a)
    if a.min() < 0:
        raise X2ReconInputError(path, "not a labelmap: negative labels")
    vol.array = a.astype(np.uint16 if a.max() > 255 else np.uint8)
    return vol


def write_volume(vol: Volume, path: str | Path, compress: bool = True) -> None:
    """Write atomically (NIfTI/NRRD/MHA by suffix)."""
    import SimpleITK as sitk

    from .atomic import atomic_path

    with atomic_path(path) as tmp:
        sitk.WriteImage(vol.to_sitk(), str(tmp), compress)
