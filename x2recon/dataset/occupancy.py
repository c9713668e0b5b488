"""Occupancy samples in the reconstruction box (Occupancy Networks' training data).

Inside/outside by the generalised winding number (libigl's fast winding number, ``igl.fast_winding_number``
in libigl 2.6): on a closed, outward-wound mesh it is 1 inside and 0 outside (≈ 0.3 M points/s here;
trimesh's ray-based ``contains`` is far slower without embree), and where structures of the merged
bone mesh overlap it is 2, so ``|w| > ½`` gives their union.  The absolute value makes the test
independent of the winding a mesh file was written with (inward-wound: −1 inside); a file that mixes
windings is oriented first where it enters (``mesh.orient.orient_outward``, the metrics).  Points are
stored as Occupancy Networks store them: float16 coordinates and bit-packed occupancies in an ``.npz``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import trimesh

from ..errors import X2ReconInputError
from ..io.atomic import atomic_path


def winding_number(mesh: trimesh.Trimesh, points: np.ndarray, chunk: int = 4_000_000) -> np.ndarray:
    """Generalised winding number of ``mesh`` at ``points`` (N, 3), in the mesh's coordinates."""
    import igl

    pts = np.ascontiguousarray(np.asarray(points, dtype=np.float64).reshape(-1, 3))
    if len(mesh.faces) == 0:
        raise ValueError("winding_number: mesh has no triangles")
    V = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
    F = np.ascontiguousarray(mesh.faces, dtype=np.int64)
    out = np.empty(len(pts), np.float64)
    for s in range(0, len(pts), chunk):
        out[s : s + chunk] = igl.fast_winding_number(V, F, pts[s : s + chunk])
    return out


def inside(mesh: trimesh.Trimesh, points: np.ndarray, chunk: int = 4_000_000) -> np.ndarray:
    """Boolean occupancy of ``points`` (N, 3): |winding number| > ½ (union of overlapping parts, either
    winding)."""
    return np.abs(winding_number(mesh, points, chunk)) > 0.5


def sample_occupancy(mesh_world: trimesh.Trimesh, geometry, n: int = 100_000, near_surface_fraction: float = 0.5,
                     sigma: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points in normalised box coordinates ([-½, ½]³, ``geometry.to_box``) and their occupancy.

    ``1 − near_surface_fraction`` of the points are uniform in the box (as Occupancy Networks);
    the rest are surface points (area-weighted) plus isotropic Gaussian noise of ``sigma`` box
    units, clipped to the box, for detail where it matters.  Points are shuffled and rounded to
    float16 before the inside test, so the occupancies hold for the coordinates as stored.
    Returns ``(points float32 (n, 3), occupancies bool (n,))``.
    """
    if n <= 0 or not 0.0 <= near_surface_fraction <= 1.0 or sigma < 0:
        raise ValueError("sample_occupancy: need n > 0, near_surface_fraction in [0, 1], sigma >= 0")
    if len(mesh_world.faces) == 0:
        raise ValueError("sample_occupancy: mesh has no triangles")
    rng = np.random.default_rng(seed)
    mesh_box = trimesh.Trimesh(geometry.to_box(np.asarray(mesh_world.vertices, np.float64)), mesh_world.faces,
                               process=False)
    n_near = int(round(n * near_surface_fraction))
    parts = [rng.uniform(-0.5, 0.5, size=(n - n_near, 3))]
    if n_near:
        surf, _ = trimesh.sample.sample_surface(mesh_box, n_near, seed=int(rng.integers(2**31)))
        parts.append(np.clip(surf + rng.normal(0.0, sigma, size=surf.shape), -0.5, 0.5))
    pts = np.concatenate(parts)[rng.permutation(n)]
    pts = pts.astype(np.float16).astype(np.float32)  # exactly what save_points stores
    return pts, inside(mesh_box, pts)


def save_points(path: str | Path, points: np.ndarray, occupancies: np.ndarray, **meta) -> None:
    """Atomic ``.npz`` as Occupancy Networks: ``points`` float16 (N, 3), ``occupancies`` packed bits.

    Also stores ``n`` (N) and every ``meta`` item (e.g. ``box_size``, ``isocenter``) as arrays.
    """
    points = np.asarray(points)
    occupancies = np.asarray(occupancies, bool).reshape(-1)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) != len(occupancies):
        raise ValueError(f"save_points: need points (N, 3) and N occupancies, got {points.shape} and {occupancies.shape}")
    reserved = {"points", "occupancies", "n"} & set(meta)
    if reserved:
        raise ValueError(f"save_points: meta may not use the reserved keys {sorted(reserved)}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez must not append its own suffix
            np.savez(
                f,
                points=points.astype(np.float16),
                occupancies=np.packbits(occupancies),
                n=np.int64(len(points)),
                **{k: np.asarray(v) for k, v in meta.items()},
            )


def load_points(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(points float32 (N, 3) in box coordinates, occupancies bool (N,)) from :func:`save_points`."""
    path = Path(path)
    if not path.is_file():
        raise X2ReconInputError(path, "points file not found")
    try:
        with np.load(path, allow_pickle=False) as d:
            if not hasattr(d, "files"):
                raise X2ReconInputError(path, "not an occupancy points file (expected an .npz archive)")
            missing = {"points", "occupancies"} - set(d.files)
            if missing:
                raise X2ReconInputError(path, f"not an occupancy points file (missing {sorted(missing)})")
            pts = d["points"].astype(np.float32)
            bits = d["occupancies"]
            n = int(d["n"]) if "n" in d.files else len(pts)
    except X2ReconInputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise X2ReconInputError(path, f"not an occupancy points file ({type(e).__name__}: {e})") from None
    if pts.ndim != 2 or pts.shape[1] != 3 or n != len(pts) or bits.dtype != np.uint8 or bits.size * 8 < n:
        raise X2ReconInputError(path, f"corrupt occupancy points file (points {pts.shape}, {bits.size} bytes of "
                                      f"occupancies, n = {n})")
    return pts, np.unpackbits(bits)[:n].astype(bool)
