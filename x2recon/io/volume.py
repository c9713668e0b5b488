"""CT and labelmap volumes: reading with clear errors, and the voxel ↔ LPS-mm affine."""

from __future__ import annotations

import math
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import X2ReconInputError
from . import native_path

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

    def grid_text(self, other: "Volume | None" = None) -> str:
        """Size, spacing and origin; with ``other``, also the direction when the two differ there (two grids
        that differ only in direction printed identically)."""
        text = (f"size {self.shape_xyz}, spacing {np.round(self.spacing, 3).tolist()} mm, "
                f"origin {np.round(self.origin, 2).tolist()}")
        if other is not None and not np.allclose(self.direction, other.direction, atol=1e-3):
            text += f", direction {np.round(self.direction, 3).tolist()}"
        return text

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

#: Largest CT or labelmap x2recon reads: 2^28 voxels (512×512×1024; 512 MiB as int16).  Checked from the
#: file's header before any voxel is read: rendering holds the int16 CT and several float32 copies
#: (attenuation, its padded copy), about 8 GB at this size — within a 16–32 GB machine.  A 1024×1024×800
#: CT at 0.5 mm reached 10 GB and a traceback; resample such scans to ~1 mm first (a 512² DRR of a 43 cm
#: detector has 0.84 mm pixels, so finer voxels add nothing).
MAX_VOLUME_VOXELS = 1 << 28


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
        info = _image_information(path)
        if info is not None:  # None: ITK cannot read the header; ReadImage below says why
            _check_voxel_count(path, info.GetSize(), info.GetSpacing(), info.GetNumberOfComponents(), what)
        _check_nifti_complete(path)
        img = sitk.ReadImage(native_path(path))
        _check_nifti_frames(path, img)
        return img
    except X2ReconInputError:
        raise
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "Unable" in ln), first[-1] if first else "")
        raise X2ReconInputError(path, f"cannot read as a {what} image ({detail.strip()[:200]})") from None


def _image_information(path: Path):
    """The file's header (size, spacing, pixel type) without its voxels, or None when ITK cannot read it."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(native_path(path))
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return None
    return r


def _check_voxel_count(path, size, spacing, components: int, what: str) -> None:
    """Refuse a volume over :data:`MAX_VOLUME_VOXELS` from its header, before its voxels are read, with the
    limit and an isotropic spacing that brings it under the limit."""
    n = int(np.prod([int(x) for x in size], dtype=np.int64)) * max(1, int(components))
    if n <= MAX_VOLUME_VOXELS:
        return
    extent = np.asarray(size, np.float64) * np.abs(np.asarray(spacing, np.float64))
    iso = math.ceil(10 * (float(np.prod(extent)) / MAX_VOLUME_VOXELS) ** (1 / 3)) / 10  # mm, rounded up
    dims = "×".join(str(int(x)) for x in size)
    raise X2ReconInputError(path, f"{what} of {dims} voxels ({n / 1e6:,.0f} M) is over x2recon's limit of "
                            f"{MAX_VOLUME_VOXELS / 1e6:,.0f} M voxels (x2recon.io.volume.MAX_VOLUME_VOXELS, "
                            f"512×512×1024; rendering holds several float copies of a CT); resample it to "
                            f"coarser voxels first, e.g. {iso:g} mm")


def _nifti_header(path: Path) -> bytes:
    """The first 348 bytes of a NIfTI file (``.nii`` or gzipped, by content)."""
    import gzip

    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as f:
        return f.read(348)


def nifti_frames(hdr: bytes) -> dict | None:
    """The qform and sform of a NIfTI-1 header (``struct``, no nibabel needed) as 4×4 voxel → LPS mm
    matrices with their codes, or None for another format.  Fields as in nifti1.h: pixdim at 76
    (pixdim[0] = qfac), qform_code/sform_code at 252/254, quatern_b…d and qoffset at 256–279, srow_x…z at
    280–327; both frames are RAS in the file."""
    import struct

    if len(hdr) < 348 or hdr[344:347] not in (b"n+1", b"ni1"):
        return None
    order = next((o for o in "<>" if struct.unpack(o + "i", hdr[:4])[0] == 348), None)
    if order is None:
        return None
    pixdim = struct.unpack(order + "8f", hdr[76:108])
    qcode, scode = struct.unpack(order + "2h", hdr[252:256])
    b, c, d = struct.unpack(order + "3f", hdr[256:268])
    qoffset = struct.unpack(order + "3f", hdr[268:280])
    srow = np.array(struct.unpack(order + "12f", hdr[280:328]), np.float64).reshape(3, 4)
    a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rot = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                    [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                    [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c]])
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    q = np.eye(4)
    q[:3, :3] = rot @ np.diag([pixdim[1], pixdim[2], qfac * pixdim[3]])
    q[:3, 3] = qoffset
    sf = np.eye(4)
    sf[:3] = srow
    return {"qform_code": int(qcode), "sform_code": int(scode), "qform": ras_to_lps @ q, "sform": ras_to_lps @ sf}


def _check_nifti_frames(path: Path, img) -> None:
    """Say which frame a NIfTI file was placed by when its header is ambiguous, and refuse one whose qform
    and sform are mirror images of each other (left and right cannot be told).  SimpleITK uses the sform
    when its code is set (and it is a rotation with spacing), else the qform; with neither code, an
    identity orientation at the origin.  Warnings (``UserWarning``) name the file and the frame used."""
    import warnings

    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    try:
        fr = nifti_frames(_nifti_header(path))
    except OSError:
        return
    if fr is None:
        return
    qc, sc = fr["qform_code"], fr["sform_code"]
    if qc <= 0 and sc <= 0:
        warnings.warn(f"{path}: NIfTI header has neither a qform nor an sform code, so it does not say where the "
                      "volume lies or which side is left; read with an identity orientation at the origin "
                      "(SimpleITK's default): check left/right", stacklevel=3)
        return
    if qc <= 0 or sc <= 0:
        return  # one frame: the one used
    q, s = fr["qform"], fr["sform"]
    dq, ds = np.linalg.det(q[:3, :3]), np.linalg.det(s[:3, :3])
    if np.sign(dq) != np.sign(ds):
        raise X2ReconInputError(path, "NIfTI qform and sform are mirror images of each other (determinants "
                                f"{dq:+.3g} and {ds:+.3g}): the header does not say which side is left; fix "
                                "the header so that both describe the same frame")
    shift = float(np.linalg.norm(q[:3, 3] - s[:3, 3]))
    axes = float(np.abs(q[:3, :3] - s[:3, :3]).max())
    if shift <= 0.1 and axes <= 1e-3 * max(1.0, float(np.abs(s[:3, :3]).max())):
        return
    a = np.eye(4)
    a[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    a[:3, 3] = img.GetOrigin()
    used = min(("sform", s), ("qform", q), key=lambda f: float(np.abs(f[1] - a).max()))[0]
    apart = [f"origins {shift:.1f} mm apart"] if shift > 0.1 else []
    apart += [f"axes up to {axes:.3g} mm per voxel apart"] if axes > 1e-3 * max(1.0, float(np.abs(s[:3, :3]).max())) else []
    warnings.warn(f"{path}: NIfTI qform and sform disagree ({', '.join(apart)}); placed by the {used}, as SimpleITK "
                  "does (the sform when it is set and rigid): check that this is the frame you meant", stacklevel=3)


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
    ids = reader.GetGDCMSeriesIDs(native_path(path))
    if not ids:
        raise X2ReconInputError(path, f"folder holds no DICOM series (expected a {what})")
    if len(ids) > 1:
        raise X2ReconInputError(path, f"folder holds {len(ids)} DICOM series; put each series in its own folder")
    files = list(reader.GetGDCMSeriesFileNames(native_path(path), ids[0]))
    listed = {Path(f).name for f in files}
    for q in sorted(path.iterdir()):
        if q.is_file() and q.name not in listed and not q.name.startswith(".") and q.suffix.lower() in (".dcm", ""):
            raise X2ReconInputError(q, "DICOM slice cannot be read as part of the series (corrupt or truncated?)")
    first = _image_information(Path(files[0]))
    if first is not None:
        rows_cols = first.GetSize()[:2]
        _check_voxel_count(path, (*rows_cols, len(files)), first.GetSpacing(), first.GetNumberOfComponents(), what)
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


#: HU windows of the histogram check (``check_hounsfield``): bone, fat and soft tissue, and the lung-like
#: values between air and soft tissue.  On the 8 shared CTs (chest, abdomen, head, whole body, crops) the
#: soft-tissue window holds ≥ 6.9× the lung-like one; shifted by −1024 (a rescale applied twice) ≤ 0.71×.
BONE_HU = 300.0
SOFT_TISSUE_HU = (-200.0, 150.0)
LUNG_LIKE_HU = (-700.0, -300.0)


def check_hounsfield(a: np.ndarray, path: str | Path | None) -> None:
    """Refuse a CT whose histogram cannot be air, soft tissue and bone in Hounsfield units, saying what looks
    wrong: no voxel above :data:`BONE_HU` (an 8-bit copy clipped to −128…127, or not HU at all), or fat and
    soft tissue outnumbered by lung-like values (soft tissue moved down; with air below −1500 HU, the
    rescale intercept applied twice).  A strided sample of ≤ 4 M voxels keeps it cheap."""
    hi = float(a.max())
    if hi <= BONE_HU:
        lo = float(a.min())
        hint = ("an 8-bit copy of the CT, clipped to that range?" if lo >= -128 and hi <= 127
                else "not a CT in Hounsfield units?")
        raise X2ReconInputError(path, f"no voxels above {BONE_HU:g} HU, so no bone: values span {lo:.0f}…{hi:.0f}, "
                                + hint)
    s = a.reshape(-1)[:: max(1, a.size // 4_000_000)]
    soft = int(np.count_nonzero((s >= SOFT_TISSUE_HU[0]) & (s <= SOFT_TISSUE_HU[1])))
    lung = int(np.count_nonzero((s > LUNG_LIKE_HU[0]) & (s < LUNG_LIKE_HU[1])))
    if soft < 1.5 * lung:
        h, edges = np.histogram(s, bins=np.arange(-1500.0, 510.0, 10.0))
        peak = float(edges[h.argmax()] + 5)  # where the body's bulk sits (air and padding lie below −1500)
        air = float(np.percentile(s, 1))
        if -1200 <= peak <= -800:
            hint = (f"and the soft-tissue peak sits at {peak:.0f} HU instead of near 0"
                    + (f" (air at {air:.0f} HU)" if air < -1500 else "") + ": a rescale intercept of -1024 applied twice?")
        else:
            hint = "not a CT in Hounsfield units?"
        raise X2ReconInputError(path, f"fat and soft tissue ({SOFT_TISSUE_HU[0]:g}…{SOFT_TISSUE_HU[1]:g} HU) hold "
                                f"{soft / s.size:.1%} of the voxels, fewer than the values between air and soft "
                                f"tissue ({LUNG_LIKE_HU[0]:g}…{LUNG_LIKE_HU[1]:g} HU: {lung / s.size:.1%}), {hint}")


def read_ct(path: str | Path, *, spacing_range: tuple[float, float] | None = SPACING_RANGE_MM,
            check_hu: bool = True) -> Volume:
    """Read a CT (NIfTI, NRRD, MHA or a DICOM folder) in Hounsfield units.

    Rejects files that are not regular files, truncated NIfTI, DICOM series with a corrupt,
    missing or uneven slice, volumes that are not 3D scalar, non-finite values, values that
    cannot be HU (a CT has air near −1000 and no values far outside [−3000, 40000]), and voxel
    spacing outside ``spacing_range`` mm (``None``: only finite and positive, for x2recon's own
    coarse box grids such as SPIDER targets), and (``check_hu``) a histogram that cannot be air, soft
    tissue and bone (``check_hounsfield``).
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
    if check_hu:
        check_hounsfield(a, path)
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


#: Formats ``write_volume`` writes: one file each (a two-file .mhd/.nhdr header would name the temporary
#: data file of its atomic write).
WRITABLE_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def write_volume(vol: Volume, path: str | Path, compress: bool = True) -> None:
    """Write atomically (NIfTI/NRRD/MHA by suffix, ``WRITABLE_VOLUME_SUFFIXES``)."""
    import SimpleITK as sitk

    from .atomic import atomic_path

    if not str(path).lower().endswith(WRITABLE_VOLUME_SUFFIXES):
        raise X2ReconInputError(path, f"cannot write a volume in this format; use one of "
                                      f"{', '.join(WRITABLE_VOLUME_SUFFIXES)}")
    with atomic_path(path) as tmp:
        sitk.WriteImage(vol.to_sitk(), native_path(tmp), compress)
