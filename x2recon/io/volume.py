"""CT and labelmap volumes: reading with clear errors, and the voxel ↔ LPS-mm affine."""

from __future__ import annotations

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


def _read_image(path: Path, what: str):
    import SimpleITK as sitk

    if not path.exists():
        raise X2ReconInputError(path, f"{what} file not found")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            ids = reader.GetGDCMSeriesIDs(str(path))
            if not ids:
                raise X2ReconInputError(path, f"folder holds no DICOM series (expected a {what})")
            files = reader.GetGDCMSeriesFileNames(str(path), ids[0])
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except X2ReconInputError:
        raise
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "Unable" in ln), first[-1] if first else "")
        raise X2ReconInputError(path, f"cannot read as a {what} image ({detail.strip()[:200]})") from None


def read_ct(path: str | Path) -> Volume:
    """Read a CT (NIfTI, NRRD, MHA or a DICOM folder) in Hounsfield units.

    Rejects files that are not 3D scalar volumes or whose values cannot be HU (a CT has air
    near −1000 and no values far outside [−3000, 40000]).
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
    a = vol.array
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
