"""Registration inputs: numpy arrays, trimesh meshes/point clouds or files → checked point sets.

Mesh files go through ``x2recon.io.mesh.read_points`` (LPS mm, clear errors; a PLY/OBJ/OFF/VTK
file without faces is a point cloud); point files may also be ``.npy`` or text
(``.txt``/``.xyz``/``.csv``: one point a line, as Hirose's ``bcpd`` reads them).
Every problem is an ``X2ReconInputError`` that names the file (or "source"/"target").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import X2ReconInputError

POINT_SUFFIXES = (".npy", ".txt", ".xyz", ".csv")


@dataclass
class PointSet:
    points: np.ndarray  # (N, D) float64
    faces: np.ndarray | None  # (F, 3) int64 for meshes
    name: str  # the file, or "source"/"target", for messages


def _read_file(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    from ..io.mesh import MESH_SUFFIXES, read_points

    suffix = path.suffix.lower()
    if suffix in MESH_SUFFIXES:  # a mesh, or a point cloud (PLY/OBJ/OFF/VTK without faces: faces None)
        return read_points(path)
    if not path.is_file():
        raise X2ReconInputError(path, "file not found")
    if suffix not in POINT_SUFFIXES:
        raise X2ReconInputError(path, f"unsupported format {suffix!r} (meshes: {', '.join(MESH_SUFFIXES)}; "
                                      f"points: {', '.join(POINT_SUFFIXES)})")
    try:
        if suffix == ".npy":
            pts = np.load(path, allow_pickle=False)
        else:
            text = path.read_text()
            pts = np.loadtxt(path, delimiter="," if ("," in text.split("\n", 1)[0]) else None, ndmin=2)
    except Exception as e:  # numpy raises many kinds for malformed files
        raise X2ReconInputError(path, f"cannot read as a point set ({type(e).__name__}: {e})") from None
    return np.asarray(pts, np.float64), None


def load_points(obj, role: str, faces=None) -> PointSet:
    """``obj`` (array (N, D), trimesh mesh/point cloud, or a file path) → checked ``PointSet``.

    ``faces`` (F, 3) may be given with an array to make it a mesh (needed by the geodesic kernel).
    """
    name = role
    f = None
    if isinstance(obj, (str, Path)):
        name = str(obj)
        pts, f = _read_file(Path(obj))
    elif hasattr(obj, "vertices"):  # trimesh.Trimesh / PointCloud
        pts = np.asarray(obj.vertices, np.float64)
        f = np.asarray(obj.faces, np.int64) if getattr(obj, "faces", None) is not None else None
    else:
        if hasattr(obj, "detach"):  # torch tensor
            obj = obj.detach().cpu().numpy()
        try:
            pts = np.asarray(obj, np.float64)
        except (TypeError, ValueError) as e:
            raise X2ReconInputError(None, f"{role}: not an array of points ({e})") from None
    if faces is not None:
        f = np.asarray(faces)
    where = name if name != role else None
    if pts.ndim != 2 or pts.shape[1] < 1:
        raise X2ReconInputError(where, f"{role}: points must be an (N, D) array, got shape {pts.shape}")
    if len(pts) == 0:
        raise X2ReconInputError(where, f"{role} is empty (no points)")
    if len(pts) <= pts.shape[1]:
        raise X2ReconInputError(where, f"{role} has {len(pts)} points; registration needs more points than "
                                       f"dimensions ({pts.shape[1]})")
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        raise X2ReconInputError(where, f"{role} has {int(bad.sum())} point(s) with NaN/infinite coordinates "
                                       f"(first at index {int(np.flatnonzero(bad)[0])})")
    if np.ptp(pts, axis=0).max() == 0:
        raise X2ReconInputError(where, f"{role}'s points all coincide (zero extent)")
    if f is not None:
        f = np.asarray(f)
        if f.size == 0:
            f = None
        elif f.ndim != 2 or f.shape[1] != 3 or not np.issubdtype(f.dtype, np.integer):
            raise X2ReconInputError(where, f"{role}: faces must be an (F, 3) integer array, got {f.shape} {f.dtype}")
        elif f.min() < 0 or f.max() >= len(pts):
            raise X2ReconInputError(where, f"{role}: faces index vertices outside 0..{len(pts) - 1}")
        else:
            f = f.astype(np.int64)
    return PointSet(pts, f, name)


def load_pair(source, target, source_faces=None) -> tuple[PointSet, PointSet]:
    """Both point sets, checked, with the same dimension."""
    src = load_points(source, "source", source_faces)
    tgt = load_points(target, "target")
    if src.points.shape[1] != tgt.points.shape[1]:
        raise X2ReconInputError(None, f"dimension mismatch: source points are {src.points.shape[1]}-D, "
                                      f"target points {tgt.points.shape[1]}-D")
    return src, tgt
