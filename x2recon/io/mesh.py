"""Mesh files (STL, PLY, OBJ, OFF, VTK): atomic writes and reads with clear errors.

``read_mesh`` needs triangles; ``read_points`` also takes point clouds (PLY/OBJ/OFF vertices without
faces, VTK polydata of vertices), as registration targets are.

Coordinates in files are LPS mm.  Writers put Slicer's ``SPACE=LPS`` declaration in the header
(Slicer also assumes LPS when a file has none); a file that declares ``SPACE=RAS`` (a Slicer
export in RAS) is turned into LPS on reading.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import trimesh

from ..errors import X2ReconInputError
from . import native_path
from .atomic import atomic_path

MESH_SUFFIXES = (".stl", ".ply", ".obj", ".off", ".vtk")
_SPACE = re.compile(rb"SPACE\s*=\s*(RAS|LPS)", re.IGNORECASE)


def _suffix(path: Path) -> str:
    s = path.suffix.lower()
    if s not in MESH_SUFFIXES:
        raise ValueError(f"{path}: unsupported mesh format {s!r} (use one of {', '.join(MESH_SUFFIXES)})")
    return s


def _encode(mesh: trimesh.Trimesh, suffix: str) -> bytes:
    if suffix == ".stl":  # binary STL: 80-byte header, then the triangles
        data = trimesh.exchange.stl.export_stl(mesh)
        return b"x2recon SPACE=LPS".ljust(80, b" ") + data[80:]
    if suffix == ".ply":  # binary PLY, declaration as a header comment
        data = trimesh.exchange.ply.export_ply(mesh, encoding="binary")
        head, sep, body = data.partition(b"\n")  # "ply"
        fmt, sep2, rest = body.partition(b"\n")  # "format binary_little_endian 1.0"
        return head + sep + fmt + sep2 + b"comment SPACE=LPS\n" + rest
    if suffix == ".obj":
        return trimesh.exchange.obj.export_obj(mesh, include_normals=False, header="SPACE=LPS").encode()
    if suffix == ".off":
        return trimesh.exchange.off.export_off(mesh).encode()
    raise AssertionError(suffix)


def to_polydata(mesh: trimesh.Trimesh):
    """A triangle mesh as vtkPolyData (points and triangles copied, no other arrays)."""
    from vtkmodules.util import numpy_support as ns
    from vtkmodules.vtkCommonCore import vtkPoints
    from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData

    pd = vtkPolyData()
    pts = vtkPoints()
    pts.SetData(ns.numpy_to_vtk(np.ascontiguousarray(mesh.vertices, np.float64), deep=1))
    pd.SetPoints(pts)
    f = np.asarray(mesh.faces, np.int64)
    cells = vtkCellArray()
    cells.SetData(ns.numpy_to_vtkIdTypeArray(np.arange(0, 3 * len(f) + 1, 3, dtype=np.int64), deep=1),
                  ns.numpy_to_vtkIdTypeArray(f.ravel(), deep=1))
    pd.SetPolys(cells)
    return pd


def _write_vtk(mesh: trimesh.Trimesh, path: Path) -> None:
    from vtkmodules.vtkIOLegacy import vtkPolyDataWriter

    pd = to_polydata(mesh)
    for name, values in getattr(mesh, "vertex_attributes", {}).items():  # per-vertex scalars (confidence)
        values = np.asarray(values)
        if values.ndim == 1 and len(values) == len(mesh.vertices) and values.dtype.kind == "f":
            from vtkmodules.util import numpy_support as ns

            arr = ns.numpy_to_vtk(np.ascontiguousarray(values, np.float32), deep=1)
            arr.SetName(str(name))
            pd.GetPointData().AddArray(arr)
    w = vtkPolyDataWriter()
    w.SetInputData(pd)
    w.SetFileName(native_path(path))
    w.SetHeader("x2recon SPACE=LPS")
    w.SetFileTypeToBinary()
    if not w.Write():
        raise OSError(f"{path}: VTK writer failed")


def _read_vtk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from vtkmodules.util import numpy_support as ns
    from vtkmodules.vtkFiltersCore import vtkTriangleFilter
    from vtkmodules.vtkIOLegacy import vtkPolyDataReader

    r = vtkPolyDataReader()
    r.SetFileName(native_path(path))
    r.Update()
    if r.GetErrorCode() or not r.IsFilePolyData():
        raise ValueError("not a legacy VTK polydata file")
    tri = vtkTriangleFilter()
    tri.SetInputConnection(r.GetOutputPort())
    tri.Update()
    pd = tri.GetOutput()
    if pd.GetNumberOfPoints() == 0 or pd.GetPolys().GetNumberOfCells() == 0:  # no surface: its points, if any
        pts = r.GetOutput().GetPoints()
        v = ns.vtk_to_numpy(pts.GetData()).astype(np.float64) if pts is not None else np.zeros((0, 3))
        return v.reshape(-1, 3), np.zeros((0, 3), np.int64)
    v = ns.vtk_to_numpy(pd.GetPoints().GetData()).astype(np.float64)
    f = ns.vtk_to_numpy(pd.GetPolys().GetConnectivityArray()).astype(np.int64).reshape(-1, 3)
    return v, f


def write_mesh(mesh: trimesh.Trimesh, path: str | Path) -> None:
    """Write ``mesh`` (LPS mm) atomically; the format follows the suffix (STL and PLY binary)."""
    path = Path(path)
    suffix = _suffix(path)
    if len(mesh.faces) == 0:
        raise ValueError(f"{path}: refusing to write an empty mesh")
    with atomic_path(path) as tmp:
        if suffix == ".vtk":
            _write_vtk(mesh, tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(_encode(mesh, suffix))


def _stl_triangles(path: Path) -> int | None:
    """Triangles a binary STL holds, from its header checked against the file's size (84 + 50 per
    triangle); None for an ASCII STL.  A binary header whose count the size contradicts is an error that
    says so (trimesh then read nothing, and the file was called "empty")."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(84)
    n = struct.unpack("<I", head[80:84])[0] if len(head) == 84 else None
    if n is not None and size == 84 + 50 * n:
        return n
    if head.lstrip().lower().startswith(b"solid"):
        return None  # ASCII STL
    if n is None:
        raise X2ReconInputError(path, f"too short for an STL file ({size} bytes; a binary STL has an 84-byte header)")
    raise X2ReconInputError(path, f"binary STL header announces {n:,} triangles ({84 + 50 * n:,} bytes), but the file "
                                  f"holds {size:,} bytes: truncated or corrupt")


def header_counts(path: str | Path) -> tuple[int | None, int | None]:
    """(vertices, faces) a mesh file announces in its header, without reading its data: binary STL
    (faces; vertices unknown before merging), PLY and OFF; ``None`` where the header does not say (OBJ,
    VTK, ASCII STL).  For refusing a mesh too large for a job before it is loaded."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".stl":
        return None, _stl_triangles(path)
    if suffix not in (".ply", ".off"):
        return None, None
    with open(path, "rb") as f:
        head = f.read(4096)
    if suffix == ".ply":
        if not head.startswith(b"ply") or b"end_header" not in head:
            return None, None
        count = {m.group(1): int(m.group(2)) for m in re.finditer(rb"element\s+(\w+)\s+(\d+)", head)}
        return count.get(b"vertex"), count.get(b"face")
    words = [w for ln in head.splitlines() if not ln.lstrip().startswith(b"#") for w in ln.split()]
    if words[:1] != [b"OFF"] or len(words) < 3 or not (words[1].isdigit() and words[2].isdigit()):
        return None, None
    return int(words[1]), int(words[2])


def _load(path: Path) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(vertices, faces (F, 3), first 1 KiB) of a mesh or point-cloud file; X2ReconInputError naming it."""
    if not path.is_file():
        raise X2ReconInputError(path, "mesh file not found")
    try:
        suffix = _suffix(path)
    except ValueError as e:
        raise X2ReconInputError(path, str(e).split(": ", 1)[1]) from None
    if suffix == ".stl":
        _stl_triangles(path)  # a binary header that contradicts the file's size: said, not "empty"
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
        if suffix == ".vtk":
            v, f = _read_vtk(path)
        else:
            m = trimesh.load(str(path), file_type=suffix[1:], force="mesh", process=False)
            v, f = np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64).reshape(-1, 3)
            if len(f) == 0 and suffix != ".stl":  # force="mesh" empties a vertex-only PLY/OBJ: read its points
                pc = trimesh.load(str(path), file_type=suffix[1:], process=False)
                v = np.asarray(getattr(pc, "vertices", v), np.float64).reshape(-1, 3)
    except Exception as e:  # trimesh and VTK raise many kinds for corrupt files
        raise X2ReconInputError(path, f"cannot read as a mesh ({type(e).__name__}: {e})") from None
    if not np.all(np.isfinite(v)):
        raise X2ReconInputError(path, "mesh has non-finite vertex coordinates")
    space = _SPACE.search(head)
    if space and space.group(1).upper() == b"RAS":
        v = v * [-1.0, -1.0, 1.0]  # RAS → LPS
    return v, f, head


#: formats that carry per-vertex scalars (``mesh.vertex_attributes``) when written
SCALAR_SUFFIXES = (".ply", ".vtk")


def read_vertex_scalar(path: str | Path, name: str) -> np.ndarray | None:
    """The per-vertex scalar ``name`` of a PLY (vertex property) or legacy VTK (point-data array) file, in the
    order ``read_mesh`` gives the vertices; None when the file does not carry it (STL, OBJ and OFF never do)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".ply":
        m = trimesh.load(str(path), file_type="ply", force="mesh", process=False)
        data = ((m.metadata.get("_ply_raw") or {}).get("vertex") or {}).get("data")
        if data is None or name not in (data.dtype.names or ()):
            return None
        return np.asarray(data[name], np.float32).reshape(-1)
    if suffix == ".vtk":
        from vtkmodules.util import numpy_support as ns
        from vtkmodules.vtkIOLegacy import vtkPolyDataReader

        r = vtkPolyDataReader()
        r.SetFileName(native_path(path))
        r.ReadAllScalarsOn()
        r.ReadAllFieldsOn()
        r.Update()
        arr = r.GetOutput().GetPointData().GetArray(name)
        return None if arr is None else ns.vtk_to_numpy(arr).astype(np.float32).reshape(-1)
    return None


def read_mesh(path: str | Path) -> trimesh.Trimesh:
    """Read a triangle mesh in LPS mm; fails naming the file if it is missing, unreadable or empty.

    Vertices are merged only for STL (a triangle soup); indexed formats keep their vertices, so
    separate shells that touch (a merged bone mesh) stay separate.
    """
    path = Path(path)
    v, f, _ = _load(path)
    if len(f) == 0:
        raise X2ReconInputError(path, "mesh is empty (no triangles)" + (
            f"; it holds {len(v)} points (a point cloud), and a triangle mesh is needed here" if len(v) else ""))
    m = trimesh.Trimesh(v, f, process=False)
    if path.suffix.lower() == ".stl":
        m.merge_vertices()
    return m


def read_points(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Vertices (LPS mm) and triangles of a mesh file, or the points of a point cloud without faces
    (PLY/OBJ/OFF vertices only, VTK polydata of vertices): ``(points (N, 3), faces (F, 3) or None)``.
    For inputs that may be either, such as registration targets; no points at all is an error."""
    path = Path(path)
    v, f, _ = _load(path)
    if len(v) == 0:
        raise X2ReconInputError(path, "file is empty (no points)")
    if len(f) == 0:
        return v, None
    if path.suffix.lower() == ".stl":
        m = trimesh.Trimesh(v, f, process=False)
        m.merge_vertices()
        v, f = np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int64)
    return v, f
