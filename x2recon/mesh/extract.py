"""Watertight surface meshes from labelmaps, in LPS millimetres.

Marching cubes at 0.5 on a binary mask cuts every voxel corner, so thin bones (ribs are 2–3
voxels across) lose 5–15 % of their volume.  We extract from the mask lightly smoothed (Gaussian,
σ = 0.5 voxel) and choose the iso-level per structure by bisection so that the enclosed volume
equals the labelmap's voxel volume: the mesh keeps the segmentation's volume (tested within 2 %)
and its surface is smooth instead of stair-cased.  Each mask is cropped to its bounding box and
padded, so every surface is closed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import trimesh

from ..errors import X2ReconInputError

#: Structures smaller than this many voxels give no mesh (recorded as skipped, not failed).
MIN_VOXELS = 10


class MeshError(X2ReconInputError):
    """A structure's surface could not be made watertight."""


def _marching_cubes(field: np.ndarray, level: float):
    from skimage.measure import marching_cubes

    verts, faces, _, _ = marching_cubes(field, level=level, allow_degenerate=False)
    return verts, faces


def _signed_volume_index(verts_kji: np.ndarray, faces: np.ndarray, scale: np.ndarray) -> float:
    v = verts_kji[:, ::-1] * scale  # (i, j, k) × voxel size, axis-aligned
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def mask_to_mesh(mask: np.ndarray, affine: np.ndarray, *, smoothing_iterations: int = 0,
                 name: str = "", match_volume: bool = True, sigma: float = 0.5) -> trimesh.Trimesh:
    """Closed surface of a binary mask ``[k, j, i]`` in world coordinates (``affine``: index → mm).

    ``match_volume`` picks the iso-level so that the mesh volume equals the voxel volume
    (within 0.3 %); ``smoothing_iterations`` adds volume-preserving Taubin smoothing.
    """
    from scipy.ndimage import gaussian_filter

    mask = np.asarray(mask, bool)
    n = int(mask.sum())
    if n < MIN_VOXELS:
        raise MeshError(None, f"structure {name!r} has only {n} voxels")
    idx = np.argwhere(mask)
    lo = idx.min(0) - 3
    hi = idx.max(0) + 4
    crop = np.zeros(tuple(hi - lo), np.float32)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(hi, mask.shape)
    crop[tuple(slice(a - b, c - b) for a, b, c in zip(src_lo, lo, src_hi))] = mask[
        tuple(slice(a, c) for a, c in zip(src_lo, src_hi))
    ]
    field = gaussian_filter(crop, sigma) if sigma > 0 else crop
    A = np.asarray(affine, np.float64)
    vox = abs(np.linalg.det(A[:3, :3]))
    target = n * vox
    scale = np.linalg.norm(A[:3, :3], axis=0)  # voxel edge lengths (i, j, k)
    cell = abs(np.linalg.det(A[:3, :3])) / np.prod(scale)  # 1 for orthogonal grids

    def extract(level):
        v, f = _marching_cubes(field, level)
        return v, f, abs(_signed_volume_index(v, f, scale)) * cell

    level = 0.5
    verts, faces, vol = extract(level)
    if match_volume and sigma > 0:
        level, verts, faces, vol = _match_level(extract, level, verts, faces, vol, target)
    ijk = verts[:, ::-1] + lo[::-1]
    world = ijk @ A[:3, :3].T + A[:3, 3]
    mesh = trimesh.Trimesh(world, faces, process=True)
    mesh = simplify_lossless(mesh)
    if smoothing_iterations > 0:
        trimesh.smoothing.filter_taubin(mesh, iterations=smoothing_iterations)
    mesh = ensure_watertight(mesh, name)
    mesh.metadata["iso_level"] = float(level)
    mesh.metadata["voxel_volume_mm3"] = float(target)
    return mesh


def _match_level(extract, level, verts, faces, vol, target, rtol=0.003, max_iter=25):
    """Iso-level whose surface encloses ``target`` volume: secant steps kept inside a bracket.

    The enclosed volume falls monotonically as the level rises; secant steps converge in
    3–5 marching-cubes runs, bisection of the bracket guards against bad steps.
    """
    lo, hi = 0.02, 0.98  # bracket of levels: vol(lo) > target > vol(hi) once established
    prev = None
    for _ in range(max_iter):
        err = vol - target
        if abs(err) <= rtol * target:
            break
        if err > 0:
            lo = max(lo, level)
        else:
            hi = min(hi, level)
        if prev is not None and prev[1] != vol:
            nxt = level - err * (level - prev[0]) / (vol - prev[1])
        else:
            nxt = level + (0.1 if err > 0 else -0.1)
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        prev = (level, vol)
        level = nxt
        verts, faces, vol = extract(level)
    return level, verts, faces, vol


def simplify_lossless(mesh: trimesh.Trimesh, epsilon: float = 1e-3) -> trimesh.Trimesh:
    """Drop vertices that change the surface by less than ``epsilon`` (pyfqmr's lossless mode).

    Marching cubes over-tessellates flat parts; this removes about a third of the triangles
    with no measurable change of volume or shape.
    """
    import pyfqmr

    s = pyfqmr.Simplify()
    s.setMesh(np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int32))
    s.simplify_mesh_lossless(epsilon=epsilon, verbose=False)
    v, f, _ = s.getMesh()
    out = trimesh.Trimesh(v, f, process=True)
    return out if out.is_watertight else mesh


def ensure_watertight(mesh: trimesh.Trimesh, name: str = "") -> trimesh.Trimesh:
    """Outward, consistently wound and closed, or :class:`MeshError` saying why not.

    Small defects are repaired (duplicate vertices merged, winding and normals fixed, small holes
    filled); a surface that is still open after that fails with the structure's name.
    """
    mesh.merge_vertices()
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    if not mesh.is_watertight:
        trimesh.repair.fill_holes(mesh)
    if not mesh.is_winding_consistent:
        trimesh.repair.fix_winding(mesh)
    if not mesh.is_watertight:
        broken = trimesh.grouping.group_rows(mesh.edges_sorted, require_count=1)
        raise MeshError(None, f"surface of {name or 'mesh'} is not watertight ({len(broken)} open edges after repair)")
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def labelmap_to_meshes(seg, names: dict[int, str], *, smoothing_iterations: int = 0,
                       progress: Callable[[float, str], None] | None = None):
    """One watertight mesh per structure of ``seg`` (a Volume with values 1..K).

    Returns ``(meshes: {name: Trimesh}, skipped: {name: reason})``; a structure too small for a
    surface is skipped with its reason, a surface that cannot be closed raises :class:`MeshError`.
    """
    from scipy import ndimage

    arr = seg.array
    objs = ndimage.find_objects(arr.astype(np.int32))
    meshes, skipped = {}, {}
    for i, (k, name) in enumerate(sorted(names.items())):
        if progress:
            progress(i / max(1, len(names)), name)
        sl = objs[k - 1] if k - 1 < len(objs) else None
        if sl is None:
            skipped[name] = "absent"
            continue
        sub = arr[sl] == k
        if sub.sum() < MIN_VOXELS:
            skipped[name] = f"only {int(sub.sum())} voxels"
            continue
        A = seg.affine.copy()
        off = np.array([s.start for s in sl][::-1], float)  # (i, j, k) offset of the slice
        A[:3, 3] = A[:3, 3] + A[:3, :3] @ off
        try:
            meshes[name] = mask_to_mesh(sub, A, smoothing_iterations=smoothing_iterations, name=name)
        except MeshError as e:
            raise MeshError(seg.path, e.problem) from None
    return meshes, skipped


def merge_meshes(meshes: dict[str, trimesh.Trimesh]) -> trimesh.Trimesh:
    """All structures in one mesh (each part closed, so the union of parts is closed too).

    Parts that touch or overlap stay separate shells; inside tests use the winding number,
    which counts overlaps as inside, so occupancy is the union of the structures.
    """
    return trimesh.util.concatenate([meshes[k] for k in sorted(meshes)])


def to_box_coords(mesh: trimesh.Trimesh, geometry) -> trimesh.Trimesh:
    """The mesh in normalised reconstruction-box coordinates (``geometry.to_box``)."""
    return trimesh.Trimesh(geometry.to_box(mesh.vertices), mesh.faces.copy(), process=False)
