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

#: Most points a source or target may have.  Memory and time grow with them: GBCPD's geodesic kernel takes
#: ~4 GB per million source points (300 Nyström columns of float64 plus a 64-column distance block), and
#: every iteration weighs each source point against each target point (~2·10⁷ pairs/s on 2 CPU cores).
#: A 10 M-face mesh (5 M points) ran GBCPD out of memory (11.7 GiB) and CPD printed nothing in 300 s.
MAX_POINTS = 1_000_000


def _too_many(path, role: str, what: str) -> X2ReconInputError:
    return X2ReconInputError(path, f"{role} has {what}, more than the {MAX_POINTS:,} points registration takes "
                                   "(x2recon.registration.inputs.MAX_POINTS: memory and time grow with the points); "
                                   "decimate or subsample it first (e.g. to 100 000 faces with 3D Slicer's Surface "
                                   "Toolbox), then --downsample N fits N of them (BCPD/GBCPD)")


@dataclass
class PointSet:
    points: np.ndarray  # (N, D) float64
    faces: np.ndarray | None  # (F, 3) int64 for meshes
    name: str  # the file, or "source"/"target", for messages


def _read_file(path: Path, role: str) -> tuple[np.ndarray, np.ndarray | None]:
    from ..io.mesh import MESH_SUFFIXES, header_counts, read_points

    suffix = path.suffix.lower()
    if suffix in MESH_SUFFIXES:  # a mesh, or a point cloud (PLY/OBJ/OFF/VTK without faces: faces None)
        if path.is_file():  # refused from the header before a too-large mesh is loaded
            nv, nf = header_counts(path)
            if nv is not None and nv > MAX_POINTS:
                raise _too_many(path, role, f"{nv:,} points")
            if nv is None and nf is not None and nf // 2 > MAX_POINTS:  # a closed STL: ~½ a point per triangle
                raise _too_many(path, role, f"{nf:,} triangles (about {nf // 2:,} points)")
        return read_points(path)
    if not path.is_file():
        raise X2ReconInputError(path, "file not found")
    if suffix not in POINT_SUFFIXES:
        raise X2ReconInputError(path, f"unsupported format {suffix!r} (meshes: {', '.join(MESH_SUFFIXES)}; "
                                      f"points: {', '.join(POINT_SUFFIXES)})")
    try:
        if suffix == ".npy":
            pts = np.load(path, allow_pickle=False, mmap_mode="r")  # the shape first, from the header
            if pts.ndim == 2 and len(pts) > MAX_POINTS:
                raise _too_many(path, role, f"{len(pts):,} points")
        else:
            text = path.read_text()
            pts = np.loadtxt(path, delimiter="," if ("," in text.split("\n", 1)[0]) else None, ndmin=2)
    except X2ReconInputError:
        raise
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
        pts, f = _read_file(Path(obj), role)
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
    if len(pts) > MAX_POINTS:
        raise _too_many(where, role, f"{len(pts):,} points")
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
