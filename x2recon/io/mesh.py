"""Mesh files (STL, PLY, OBJ, OFF): atomic writes and reads with clear errors."""

from __future__ import annotations

from pathlib import Path

import trimesh

from ..errors import X2ReconInputError
from .atomic import atomic_path

MESH_SUFFIXES = (".stl", ".ply", ".obj", ".off", ".glb")


def write_mesh(mesh: trimesh.Trimesh, path: str | Path) -> None:
    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise ValueError(f"{path}: unsupported mesh format (use one of {MESH_SUFFIXES})")
    with atomic_path(path) as tmp:
        mesh.export(str(tmp), file_type=path.suffix.lower().lstrip("."))


def read_mesh(path: str | Path) -> trimesh.Trimesh:
    """Read a triangle mesh; fails naming the file if it is missing, unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        raise X2ReconInputError(path, "mesh file not found")
    try:
        m = trimesh.load(str(path), force="mesh", process=False)
    except Exception as e:  # trimesh raises many kinds for corrupt files
        raise X2ReconInputError(path, f"cannot read as a mesh ({type(e).__name__}: {e})") from None
    if not isinstance(m, trimesh.Trimesh) or len(m.faces) == 0:
        raise X2ReconInputError(path, "mesh is empty (no triangles)")
    m.merge_vertices()
    return m
