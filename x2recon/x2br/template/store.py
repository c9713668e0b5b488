"""One template on disk: ``meshes/<name>.ply`` in LPS mm from the box centre, and the numbers
``library.json`` keeps for it.  Shared by the library builder (dataset templates) and the SKEL parts."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def mesh_record(mesh, rel_vertices: np.ndarray, box_size: float) -> dict:
    """Numbers library.json keeps for a template (mm relative to the box centre)."""
    lo, hi = rel_vertices.min(0), rel_vertices.max(0)
    vol = float(abs(mesh.volume)) if mesh.is_watertight else float("nan")
    try:
        c = np.asarray(mesh.center_mass) if mesh.is_watertight and vol > 0 else rel_vertices.mean(0)
    except Exception:
        c = rel_vertices.mean(0)
    return {
        "volume_mm3": round(vol, 3),
        "centroid_mm": [round(float(x), 4) for x in c],
        "bounds_mm": [[round(float(x), 4) for x in lo], [round(float(x), 4) for x in hi]],
        "extent_mm": [round(float(x), 4) for x in hi - lo],
        "n_vertices": int(len(mesh.vertices)),
        "n_faces": int(len(mesh.faces)),
        "watertight": bool(mesh.is_watertight),
        "inside_box": bool(np.all(np.abs(rel_vertices / box_size) <= 0.5 + 1e-9)),
    }


def write_template(out: Path, name: str, rel_vertices: np.ndarray, faces: np.ndarray, box_size: float) -> dict:
    """Write ``meshes/<name>.ply`` (mm from the box centre); its record."""
    import trimesh

    from ...io.mesh import read_mesh, write_mesh

    m_mm = trimesh.Trimesh(rel_vertices, faces, process=False)
    write_mesh(m_mm, out / "meshes" / f"{name}.ply")
    # the record describes the stored (float32) mesh exactly
    stored = read_mesh(out / "meshes" / f"{name}.ply")
    rec = mesh_record(stored, np.asarray(stored.vertices), box_size)
    rec.update(file=f"meshes/{name}.ply")
    return rec
