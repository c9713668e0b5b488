"""How much of each structure lies outside the reconstruction box, and meshes cut to that box.

A network predicts occupancy only inside the imaging geometry's box, and its training samples come only
from there; a bone that sticks out is cut silently.  A case records, per structure, the fraction of
its volume outside the box (``meta.json`` → ``meshes.outside_box_fraction``), the build warns above 1 %, and
the evaluation scores against the ground truth cut to the same box (``metrics.protocol.Solid.clipped``).
"""

from __future__ import annotations

import warnings
import numpy as np
import trimesh

#: Above this fraction outside the box, building a case warns.
WARN_FRACTION = 0.01


def _box_planes(lo, hi):
    from vtkmodules.vtkCommonDataModel import vtkPlane, vtkPlaneCollection

    planes = vtkPlaneCollection()
    for axis in range(3):
        for sign, value in ((1.0, lo[axis]), (-1.0, hi[axis])):  # normals point into the box (the kept side)
            p = vtkPlane()
            origin, normal = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
            origin[axis], normal[axis] = float(value), sign
            p.SetOrigin(origin)
            p.SetNormal(normal)
            planes.AddItem(p)
    return planes


def _to_trimesh(polydata) -> trimesh.Trimesh:
    from vtkmodules.util import numpy_support as ns
    from vtkmodules.vtkFiltersCore import vtkTriangleFilter

    tri = vtkTriangleFilter()
    tri.SetInputData(polydata)
    tri.Update()
    pd = tri.GetOutput()
    if pd.GetNumberOfPoints() == 0 or pd.GetPolys().GetNumberOfCells() == 0:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), process=False)
    v = ns.vtk_to_numpy(pd.GetPoints().GetData()).astype(np.float64)
    f = ns.vtk_to_numpy(pd.GetPolys().GetConnectivityArray()).astype(np.int64).reshape(-1, 3)
    return trimesh.Trimesh(v, f, process=False)


def clip_solid(mesh: trimesh.Trimesh, lo, hi) -> trimesh.Trimesh:
    """The closed ``mesh`` ∩ the box ``lo``–``hi``, closed again by caps on the box's faces (VTK's
    ``vtkClipClosedSurface``), as reconstructions are capped where bone leaves the box."""
    from vtkmodules.vtkFiltersGeneral import vtkClipClosedSurface

    from ..io.mesh import to_polydata

    clip = vtkClipClosedSurface()
    clip.SetInputData(to_polydata(mesh))
    clip.SetClippingPlanes(_box_planes(lo, hi))
    clip.SetGenerateFaces(1)
    clip.Update()
    return _to_trimesh(clip.GetOutput())


def outside_fraction(mesh: trimesh.Trimesh, lo, hi) -> float:
    """Fraction of the closed ``mesh``'s volume outside the box ``lo``–``hi`` (0 when it lies inside)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if np.all(mesh.bounds[0] >= lo) and np.all(mesh.bounds[1] <= hi):
        return 0.0
    total = abs(float(mesh.volume))
    if not total > 0:
        raise ValueError("outside_fraction: the mesh encloses no volume")
    inside = clip_solid(mesh, lo, hi)
    kept = abs(float(inside.volume)) if len(inside.faces) else 0.0
    return float(np.clip(1.0 - kept / total, 0.0, 1.0))


def outside_box_fractions(meshes: dict, geometry, warn_case: str | None = None) -> dict:
    """``{structure: fraction of its volume outside geometry's box}`` for ``meshes`` (name → closed mesh);
    warns (``UserWarning``, naming ``warn_case``) for each structure above :data:`WARN_FRACTION`."""
    lo, hi = geometry.box_bounds()
    out = {s: outside_fraction(m, lo, hi) for s, m in meshes.items()}
    big = {s: f for s, f in out.items() if f > WARN_FRACTION}
    if big:
        listed = ", ".join(f"{s} {100 * f:.1f} %" for s, f in sorted(big.items(), key=lambda x: -x[1]))
        warnings.warn(f"{warn_case or 'case'}: structures partly outside the {geometry.box_size:g} mm reconstruction "
                      f"box (volume outside: {listed}); the networks see and are scored on the part inside only",
                      stacklevel=2)
    return out
