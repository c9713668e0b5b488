"""Occupancy samples in the reconstruction box (Occupancy Networks' training data).

Inside/outside by the generalised winding number (libigl's fast winding number): exact for
watertight meshes and robust where structures touch.  Points are stored packed as Occupancy
Networks do: float16 coordinates and bit-packed occupancies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from ..errors import X2ReconInputError
from ..io.atomic import atomic_path


def inside(mesh: trimesh.Trimesh, points: np.ndarray, chunk: int = 200_000) -> np.ndarray:
    """Boolean inside test for ``points`` (N, 3) in the mesh's coordinates."""
    import igl

    V = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
    F = np.ascontiguousarray(mesh.faces, dtype=np.int64)
    pts = np.ascontiguousarray(points, dtype=np.float64)
    out = np.empty(len(pts), bool)
    for s in range(0, len(pts), chunk):
        out[s : s + chunk] = igl.fast_winding_number(V, F, pts[s : s + chunk]) > 0.5
    return out


def sample_occupancy(mesh_world: trimesh.Trimesh, geometry, n: int = 100_000, near_surface_fraction: float = 0.5,
                     sigma: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points in normalised box coordinates and their occupancy.

    ``1 − near_surface_fraction`` of them uniform in the box [-½, ½]³ (as Occupancy Networks),
    the rest on the surface plus Gaussian noise of ``sigma`` box units, for detail where it matters.
    """
    rng = np.random.default_rng(seed)
    n_near = int(round(n * near_surface_fraction))
    uni = rng.uniform(-0.5, 0.5, size=(n - n_near, 3))
    mesh_box = trimesh.Trimesh(geometry.to_box(mesh_world.vertices), mesh_world.faces, process=False)
    if n_near:
        surf, _ = trimesh.sample.sample_surface(mesh_box, n_near, seed=int(rng.integers(2**31)))
        near = np.clip(surf + rng.normal(0, sigma, size=surf.shape), -0.5, 0.5)
        pts = np.concatenate([uni, near])
    else:
        pts = uni
    perm = rng.permutation(len(pts))
    pts = pts[perm].astype(np.float32)
    # the stored points are float16: decide occupancy for exactly those coordinates
    pts16 = pts.astype(np.float16).astype(np.float64)
    occ = inside(mesh_box, pts16)
    return pts16.astype(np.float32), occ


def save_points(path: str | Path, points: np.ndarray, occupancies: np.ndarray, **meta) -> None:
    """Atomic ``.npz``: ``points`` float16 (N, 3), ``occupancies`` packed bits, plus metadata."""
    with atomic_path(path) as tmp:
        np.savez(
            tmp,
            points=np.asarray(points, np.float16),
            occupancies=np.packbits(np.asarray(occupancies, bool)),
            n=np.int64(len(points)),
            **{k: np.asarray(v) for k, v in meta.items()},
        )


def load_points(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(points float32 (N, 3) in box coordinates, occupancies bool (N,))."""
    path = Path(path)
    try:
        with np.load(path) as d:
            pts = d["points"].astype(np.float32)
            occ = np.unpackbits(d["occupancies"])[: len(pts)].astype(bool)
    except FileNotFoundError:
        raise X2ReconInputError(path, "points file not found") from None
    except (KeyError, ValueError, OSError) as e:
        raise X2ReconInputError(path, f"not an occupancy points file ({e})") from None
    return pts, occ
