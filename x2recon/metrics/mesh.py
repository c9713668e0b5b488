"""Mesh reconstruction metrics as Occupancy Networks (Mescheder et al. 2019) and X2BR §5.2 define them.

* IoU: on points sampled uniformly in the bounding volume, |pred ∩ gt| / |pred ∪ gt| (or on voxels).
* Chamfer-L1: ½ (accuracy + completeness), the mean Euclidean (not squared) distance from points
  sampled on one surface to the nearest point sampled on the other, in both directions.
* Normal consistency: ½ of the mean |n·n'| between each sampled point's normal and that of its
  nearest neighbour on the other surface, both directions.
* F-score@τ: harmonic mean of precision (pred points within τ of gt) and recall (gt within τ of pred).
* Per-axis errors after ICP (maxe, maye, maze): the reconstruction is rigidly aligned to the ground
  truth by ICP, then the mean absolute x, y, z differences to the nearest ground-truth points.

Inside tests do not depend on the winding a mesh was written with: :func:`scorable` turns inward-wound
shells outward (``mesh.orient``) and names what cannot be scored — no triangles, a mesh collapsed to a
point or a line, no enclosed volume, an open ground truth — and an IoU with nothing inside either mesh
is an error, never 1.

Distances are in the units of the meshes given.  The papers report Chamfer-L1 and F-score with each
ground truth normalised into the unit box, per-axis errors in mm: ``metrics.protocol`` scores both
that protocol and ours (mm) — use it for figures to compare with the papers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from ..errors import X2ReconInputError


def scorable(mesh: trimesh.Trimesh, name: str, *, closed: bool, scale: float | None = None
             ) -> tuple[trimesh.Trimesh, list[str]]:
    """``mesh`` made ready for inside tests (closed shells wound outward, ``mesh.orient.orient_outward``;
    an indexed file whose shells do not share vertices is merged first) and notes on what was done.

    ``X2ReconInputError`` naming ``name`` when it cannot be scored: no triangles; collapsed (longest
    bounding-box edge ≤ 1e-6 ``scale``, or area ≤ 1e-12 ``scale``²; ``scale``: the other mesh's size, by
    default its own); encloses no volume; or, with ``closed``, open edges (a ground truth: inside and
    outside of an open surface are not defined).  An open mesh without ``closed`` is scored with a note:
    the winding number is only approximately 0/1 near its holes."""
    from ..mesh.extract import signed_volume
    from ..mesh.orient import orient_outward, shells

    if len(mesh.faces) == 0:
        raise X2ReconInputError(name, "mesh is empty (no triangles): nothing to score")
    extent = float(np.max(np.ptp(np.asarray(mesh.vertices, np.float64), axis=0)))
    ref = extent if scale is None else float(scale)
    if not (extent > 1e-6 * ref and float(mesh.area) > 1e-12 * ref ** 2):
        raise X2ReconInputError(name, f"mesh is degenerate: its {len(mesh.faces):,} triangles span {extent:.3g} mm "
                                      f"and cover {float(mesh.area):.3g} mm² (collapsed to a point or a line); "
                                      "its scores would mean nothing")
    notes = []
    s = shells(mesh)
    if s.open_edges:
        merged = mesh.copy()
        merged.merge_vertices()
        s_merged = shells(merged)
        if s_merged.open_edges == 0:
            mesh, s = merged, s_merged
    flat = not abs(float(s.volume.sum())) > 1e-9 * ref ** 3
    if s.open_edges:
        edges = f"{s.open_edges:,} open edges, {int((~s.closed).sum())} of {len(s)} pieces open"
        if flat:
            raise X2ReconInputError(name, f"mesh encloses no volume (not closed: {edges}): IoU needs a solid")
        what = f"mesh is not closed ({edges})"
        if closed:
            raise X2ReconInputError(name, f"{what}: IoU needs a closed ground truth to tell inside from outside; "
                                          "close its holes first")
        notes.append(f"{name}: {what}: its inside test is approximate near the holes")
    mesh, turned = orient_outward(mesh)
    if turned:
        notes.append(f"{name}: {turned} of {len(s)} shells were wound inward (negative volume) and were scored "
                     "turned outward")
    if not signed_volume(mesh) > 1e-9 * ref ** 3:
        raise X2ReconInputError(name, "mesh encloses no volume (flat or open): IoU needs a solid")
    return mesh, notes


def sample_surface(mesh: trimesh.Trimesh, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniformly on the surface (area-weighted) and their face normals."""
    if len(mesh.faces) == 0:
        raise ValueError("cannot sample an empty mesh")
    pts, face = trimesh.sample.sample_surface(mesh, n, seed=seed)
    return np.asarray(pts, np.float64), np.asarray(mesh.face_normals[face], np.float64)


def _nearest(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d, i = cKDTree(dst).query(src, workers=-1)
    return d, i


def chamfer_l1(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """``(chamfer_l1, accuracy, completeness)`` between two point samples."""
    return chamfer_from_distances(_nearest(pred, gt)[0], _nearest(gt, pred)[0])


def chamfer_from_distances(d_pg: np.ndarray, d_gp: np.ndarray) -> tuple[float, float, float]:
    """Chamfer-L1 from the nearest-neighbour distances pred → gt (accuracy) and gt → pred (completeness)."""
    acc, comp = float(np.mean(d_pg)), float(np.mean(d_gp))
    return 0.5 * (acc + comp), acc, comp


def normal_consistency(pred: np.ndarray, pred_n: np.ndarray, gt: np.ndarray, gt_n: np.ndarray) -> float:
    return normal_consistency_of_pairs(pred_n, gt_n, _nearest(pred, gt)[1], _nearest(gt, pred)[1])


def normal_consistency_of_pairs(pred_n: np.ndarray, gt_n: np.ndarray, i_pg: np.ndarray, i_gp: np.ndarray) -> float:
    """ONet's normal consistency from the nearest-neighbour indices pred → gt (``i_pg``) and gt → pred."""
    a = np.abs(np.einsum("ij,ij->i", pred_n, gt_n[i_pg])).mean()
    b = np.abs(np.einsum("ij,ij->i", gt_n, pred_n[i_gp])).mean()
    return float(0.5 * (a + b))


def fscore(pred: np.ndarray, gt: np.ndarray, tau: float) -> tuple[float, float, float]:
    """``(F, precision, recall)`` at distance threshold ``tau``."""
    return fscore_from_distances(_nearest(pred, gt)[0], _nearest(gt, pred)[0], tau)


def fscore_from_distances(d_pg: np.ndarray, d_gp: np.ndarray, tau: float) -> tuple[float, float, float]:
    """``(F, precision, recall)`` from the nearest-neighbour distances pred → gt and gt → pred."""
    precision = float((np.asarray(d_pg) < tau).mean())
    recall = float((np.asarray(d_gp) < tau).mean())
    f = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return f, precision, recall


def iou_occupancy(occ_pred: np.ndarray, occ_gt: np.ndarray) -> float:
    """IoU of two boolean occupancy arrays over the same points; ``ValueError`` when neither has a point
    inside (the IoU of two empty sets is undefined — scoring it 1 called inward-wound meshes perfect)."""
    a, b = np.asarray(occ_pred, bool), np.asarray(occ_gt, bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        raise ValueError(f"IoU undefined: none of the {a.size:,} points is inside either mesh")
    return float(np.logical_and(a, b).sum() / union)


def iou_points(pred: trimesh.Trimesh, gt: trimesh.Trimesh, n: int = 100_000, seed: int = 0,
               bounds: np.ndarray | None = None) -> float:
    """Volumetric IoU on ``n`` points uniform in ``bounds`` (default: both meshes' joint box)."""
    from ..dataset.occupancy import inside

    if bounds is None:
        bounds = np.array([np.minimum(pred.bounds[0], gt.bounds[0]), np.maximum(pred.bounds[1], gt.bounds[1])])
    pts = np.random.default_rng(seed).uniform(bounds[0], bounds[1], size=(n, 3))
    return iou_occupancy(inside(pred, pts), inside(gt, pts))


def iou_voxels(pred: trimesh.Trimesh, gt: trimesh.Trimesh, resolution: int = 128,
               bounds: np.ndarray | None = None) -> float:
    """Volumetric IoU on the centres of a ``resolution³`` grid over ``bounds``."""
    from ..dataset.occupancy import inside

    if bounds is None:
        bounds = np.array([np.minimum(pred.bounds[0], gt.bounds[0]), np.maximum(pred.bounds[1], gt.bounds[1])])
    axes = [lo + (np.arange(resolution) + 0.5) * (hi - lo) / resolution for lo, hi in zip(*bounds)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return iou_occupancy(inside(pred, pts), inside(gt, pts))


def kabsch(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation R and translation t minimising Σ‖R·src + t − dst‖² (paired points)."""
    cs, cd = src.mean(0), dst.mean(0)
    H = (src - cs).T @ (dst - cd)
    U, _, Vt = np.linalg.svd(H)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(Vt.T @ U.T))])
    R = Vt.T @ D @ U.T
    return R, cd - R @ cs


def icp(src: np.ndarray, dst: np.ndarray, iterations: int = 50, tol: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
    """Rigid point-to-point ICP of ``src`` onto ``dst``; returns (R, t) with aligned = src @ R.T + t."""
    tree = cKDTree(dst)
    R, t = np.eye(3), np.zeros(3)
    prev = np.inf
    for _ in range(iterations):
        moved = src @ R.T + t
        d, i = tree.query(moved, workers=-1)
        dR, dt = kabsch(moved, dst[i])
        R, t = dR @ R, dR @ t + dt
        err = float(d.mean())
        if abs(prev - err) < tol * max(1.0, err):
            break
        prev = err
    return R, t


def axis_errors_after_icp(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    """(maxe, maye, maze): mean |Δx|, |Δy|, |Δz| from ICP-aligned ``pred`` points to nearest ``gt`` points."""
    R, t = icp(pred, gt)
    aligned = pred @ R.T + t
    _, i = _nearest(aligned, gt)
    e = np.abs(aligned - gt[i]).mean(0)
    return float(e[0]), float(e[1]), float(e[2])


@dataclass
class MeshMetrics:
    iou: float
    chamfer_l1: float
    accuracy: float
    completeness: float
    fscore: float
    precision: float
    recall: float
    normal_consistency: float
    maxe: float
    maye: float
    maze: float

    def to_dict(self) -> dict:
        return asdict(self)


def mesh_metrics(pred: trimesh.Trimesh, gt: trimesh.Trimesh, *, n_points: int = 100_000, tau: float = 0.02,
                 scale: float = 1.0, seed: int = 0, names: tuple[str, str] = ("prediction", "ground truth")
                 ) -> MeshMetrics:
    """All mesh metrics of the papers' tables for one reconstruction.

    ``scale`` divides distances for Chamfer-L1 and F-score (e.g. the reconstruction box edge in mm:
    "box units", one fixed length for every case — not the papers' per-case normalisation, which
    ``metrics.protocol.score`` applies); per-axis errors stay in mesh units.  Both meshes go through
    :func:`scorable` (the ground truth must be closed; errors name ``names``); an IoU with nothing inside
    the ground truth is an error.
    """
    gt, _ = scorable(gt, names[1], closed=True)
    pred, _ = scorable(pred, names[0], closed=False, scale=float(np.max(np.ptp(gt.vertices, axis=0))))
    p, pn = sample_surface(pred, n_points, seed)
    g, gn = sample_surface(gt, n_points, seed + 1)
    cd, acc, comp = chamfer_l1(p / scale, g / scale)
    f, prec, rec = fscore(p / scale, g / scale, tau)
    nc = normal_consistency(p, pn, g, gn)
    ex, ey, ez = axis_errors_after_icp(p, g)
    iou = iou_points(pred, gt, n=n_points, seed=seed + 2)
    return MeshMetrics(iou, cd, acc, comp, f, prec, rec, nc, ex, ey, ez)


def vertex_distances(vertices: np.ndarray, gt: trimesh.Trimesh, *, signed: bool = False) -> np.ndarray:
    """Distance from each of ``vertices`` (N, 3) to the nearest point of ``gt``'s surface (exact
    point-to-triangle, VTK's ``vtkImplicitPolyDataDistance`` evaluated in C++ over the whole array),
    e.g. for a heat map on a reconstruction.  ``signed``: negative inside ``gt`` (needs a closed ``gt``)."""
    import vtk
    from vtk.util import numpy_support

    from ..io.mesh import to_polydata

    v = np.ascontiguousarray(vertices, dtype=np.float64).reshape(-1, 3)
    if len(gt.faces) == 0:
        raise ValueError("the reference mesh has no faces")
    if len(v) == 0:
        return np.zeros(0)
    f = vtk.vtkImplicitPolyDataDistance()
    f.SetInput(to_polydata(gt))
    out = vtk.vtkDoubleArray()
    f.FunctionValue(numpy_support.numpy_to_vtk(v, deep=True), out)
    d = numpy_support.vtk_to_numpy(out).astype(np.float64).copy()
    return d if signed else np.abs(d)
