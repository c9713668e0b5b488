"""The two protocols every mesh figure of this project is reported in, always labelled.

``paper`` — X2BR §4.3, Occupancy Networks' convention: the ground-truth mesh is centred (its bounding
box's centre) and scaled so that its longest bounding-box edge is 1; the prediction is moved by the
same transform.  In those units:

* IoU on ``n`` points uniform in the unit box padded 1.1× (``[-0.55, 0.55]³``, ONet's ``points_iou``);
* voxel IoU on a 32³ grid over the same padded box, a voxel occupied when its centre is inside the
  mesh *or* the surface crosses it (ONet's voxelisation, §4.3's 32³ grids);
* Chamfer-L1, F-score@0.02 and normal consistency on ``n`` area-uniform surface samples.

``world`` — ours: millimetres where the bones are (the networks predict in the imaging geometry's box).
Both IoUs on one region: the joint bounding box of prediction and ground truth, cut to the
reconstruction box when one is given (points: ``n`` uniform; voxels: centres of a 64³ grid);
Chamfer-L1 in mm; F-score at ``tau_mm`` (``evaluate`` uses 0.02 × the box edge, 7.68 mm for the
default 384 mm box); the volume ratio (predicted over true bone volume in that region, from the same
points: a blob is > 1, missing bone < 1).

Per-axis errors after ICP (maxe, maye, maze) are in mm in both protocols (the paper's Table 2).  The
same surface samples serve both protocols (uniform by area stays uniform under a similarity), so a
case's paper Chamfer-L1 is its world Chamfer-L1 divided by the ground truth's longest edge, and normal
consistency is the same number in both.

Both meshes are checked and oriented first (``metrics.mesh.scorable``): inward-wound shells are scored
turned outward (a note says so), and a mesh that cannot be scored is an error naming it — no
triangles, collapsed to a point or a line, no enclosed volume, an open ground truth, a ground truth
with none of the IoU points inside (an IoU of two empty sets is never reported as 1).

A ground truth may be *cut to a box* (:meth:`Solid.clipped`): its solid is the mesh ∩ box and its
surface that solid's, capped on the box's faces as a reconstruction is capped where bone leaves the
box, so a structure partly outside the reconstruction box is scored on what the network could predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh

from ..errors import X2ReconInputError
from .mesh import (axis_errors_after_icp, chamfer_from_distances, fscore_from_distances, iou_occupancy,
                   normal_consistency_of_pairs, sample_surface, scorable)

PROTOCOLS = ("paper", "world")
#: ONet: IoU points uniform in the unit box grown by this fraction (edge 1.1).
PAPER_PADDING = 0.1
#: X2BR §4.3 / ONet: voxel grids of 32³.
PAPER_VOXELS = 32
#: F-score threshold in the paper's units.
PAPER_TAU = 0.02
#: World voxel IoU grid (cell centres; 64³ keeps a case's inside tests near 0.5 M points).
WORLD_VOXELS = 64
#: World F-score threshold as a fraction of the reconstruction box edge (7.68 mm for 384 mm).
WORLD_TAU_OF_BOX = 0.02
#: Box edge ``compare`` assumes for its world F-score threshold (the geometry's chest default).
DEFAULT_BOX_MM = 384.0
#: Metric columns of each protocol (prefixed ``paper_`` / ``world_`` in tables and CSVs).
PROTOCOL_COLUMNS = ("iou", "iou_vox", "chamfer_l1", "fscore", "normal_consistency")
#: Columns shared by both protocols (mm).
AXIS_COLUMNS = ("maxe", "maye", "maze")


@dataclass(frozen=True)
class Solid:
    """A mesh to score: ``surface`` is what gets sampled, the solid is ``mesh`` (closed) ∩ the box ``lo``–``hi``
    (no box: the whole mesh).  Made by :meth:`whole` / :meth:`clipped`, which check and orient the mesh
    (``metrics.mesh.scorable``); ``name`` is what errors call it, ``notes`` what was done to it."""

    mesh: trimesh.Trimesh
    surface: trimesh.Trimesh
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    name: str = "mesh"
    notes: tuple = ()

    @classmethod
    def whole(cls, mesh: trimesh.Trimesh, name: str = "prediction", *, closed: bool = False,
              scale: float | None = None) -> "Solid":
        """``mesh`` checked and oriented (``scorable``; ``closed``: refuse open edges, as a ground truth)."""
        mesh, notes = scorable(mesh, name, closed=closed, scale=scale)
        return cls(mesh, mesh, name=name, notes=tuple(notes))

    @classmethod
    def clipped(cls, mesh: trimesh.Trimesh, lo, hi, name: str = "ground truth") -> "Solid":
        """A closed ground truth ``mesh``, checked and oriented, cut to the axis-aligned box ``lo``–``hi``
        (the mesh itself when it lies inside)."""
        from ..dataset.box_coverage import clip_solid

        lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
        mesh, notes = scorable(mesh, name, closed=True)
        if np.all(mesh.bounds[0] >= lo) and np.all(mesh.bounds[1] <= hi):
            return cls(mesh, mesh, name=name, notes=tuple(notes))
        surface = clip_solid(mesh, lo, hi)
        if len(surface.faces) == 0:
            raise X2ReconInputError(name, "the mesh lies entirely outside the reconstruction box: nothing to score")
        return cls(mesh, surface, lo, hi, name, tuple(notes))

    @property
    def is_clipped(self) -> bool:
        return self.lo is not None

    @property
    def bounds(self) -> np.ndarray:
        return np.asarray(self.surface.bounds, np.float64)

    def inside(self, points: np.ndarray) -> np.ndarray:
        from ..dataset.occupancy import inside

        occ = inside(self.mesh, points)
        if self.is_clipped:
            occ &= np.all((points >= self.lo) & (points <= self.hi), axis=1)
        return occ

    def moved(self, unit: "UnitBox") -> "Solid":
        """The same solid in ``unit``'s normalised coordinates."""
        mesh = unit.apply_mesh(self.mesh)
        surface = mesh if self.surface is self.mesh else unit.apply_mesh(self.surface)
        if not self.is_clipped:
            return Solid(mesh, surface, name=self.name, notes=self.notes)
        return Solid(mesh, surface, unit.apply(self.lo), unit.apply(self.hi), self.name, self.notes)


@dataclass(frozen=True)
class UnitBox:
    """The paper's per-case normalisation: ``(p − centre) / scale`` with the ground truth's bounding-box
    centre and longest edge."""

    centre: np.ndarray
    scale: float

    @classmethod
    def of(cls, bounds) -> "UnitBox":
        b = np.asarray(bounds, np.float64)
        scale = float(np.max(b[1] - b[0]))
        if not scale > 0:
            raise ValueError("the ground-truth mesh has no extent")
        return cls(0.5 * (b[0] + b[1]), scale)

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, np.float64) - self.centre) / self.scale

    def apply_mesh(self, mesh: trimesh.Trimesh) -> trimesh.Trimesh:
        return trimesh.Trimesh(self.apply(mesh.vertices), mesh.faces, process=False)


def surface_voxels(mesh: trimesh.Trimesh, lo, hi, resolution: int, chunk: int = 1 << 20) -> np.ndarray:
    """Boolean ``resolution³`` grid (``[x, y, z]``) over the box ``lo``–``hi``: the voxels a triangle of
    ``mesh`` touches (exact triangle–box overlap, the separating-axis test of Akenine-Möller)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    h = (hi - lo) / resolution
    tri = (np.asarray(mesh.vertices, np.float64)[np.asarray(mesh.faces)] - lo) / h  # grid units
    first = np.clip(np.floor(tri.min(1)).astype(np.int64), 0, resolution - 1)
    last = np.clip(np.floor(tri.max(1)).astype(np.int64), 0, resolution - 1)
    keep = np.all(tri.max(1) >= 0, 1) & np.all(tri.min(1) <= resolution, 1)
    tri, first, last = tri[keep], first[keep], last[keep]
    out = np.zeros((resolution,) * 3, bool)
    span = last - first + 1
    count = span.prod(1)
    start = 0
    while start < len(tri):  # triangles in chunks of about ``chunk`` (triangle, voxel) pairs
        stop = start + max(1, int(np.searchsorted(np.cumsum(count[start:]), chunk)))
        t = np.repeat(np.arange(start, stop), count[start:stop])
        k = np.arange(len(t)) - np.repeat(np.cumsum(count[start:stop]) - count[start:stop], count[start:stop])
        sy, sz = span[t, 1], span[t, 2]
        idx = first[t] + np.stack([k // (sy * sz), (k // sz) % sy, k % sz], 1)
        hit = _triangle_box_overlap(tri[t] - (idx + 0.5)[:, None, :], 0.5)
        out[tuple(idx[hit].T)] = True
        start = stop
    return out


def _triangle_box_overlap(v: np.ndarray, half: float) -> np.ndarray:
    """Triangles ``v`` (P, 3, 3), relative to a box centre, that overlap the cube of half-edge ``half``."""
    sep = np.any(v.min(1) > half, 1) | np.any(v.max(1) < -half, 1)  # the box's face normals
    e = v[:, [1, 2, 0]] - v  # edges
    n = np.cross(e[:, 0], e[:, 1])
    sep |= np.abs(np.einsum("pi,pi->p", n, v[:, 0])) > half * np.abs(n).sum(1)  # the triangle's plane
    for axis in np.eye(3):
        a = np.cross(axis, e)  # (P, 3 edges, 3): the nine edge × box-axis directions
        p = np.einsum("pej,pvj->pev", a, v)
        r = half * np.abs(a).sum(2)
        sep |= np.any((p.min(2) > r) | (p.max(2) < -r), 1)
    return ~sep


def grid_centres(lo, hi, resolution: int) -> np.ndarray:
    """Centres of a ``resolution³`` grid over ``lo``–``hi``, ``[x, y, z]`` order, as (resolution³, 3)."""
    axes = [a + (np.arange(resolution) + 0.5) * (b - a) / resolution for a, b in zip(lo, hi)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def voxel_occupancy(solid: Solid, lo, hi, resolution: int, surface: bool) -> np.ndarray:
    """Voxels whose centre is inside ``solid`` (and, with ``surface``, those its surface crosses)."""
    occ = solid.inside(grid_centres(lo, hi, resolution)).reshape((resolution,) * 3)
    if surface:
        occ |= surface_voxels(solid.surface, lo, hi, resolution)
    return occ


@dataclass(frozen=True)
class Samples:
    """Surface samples of prediction and ground truth (world units), their normals, and each sample's
    nearest neighbour on the other surface (distances ``d_pg``/``d_gp`` in world units, indices)."""

    pred: np.ndarray
    pred_n: np.ndarray
    gt: np.ndarray
    gt_n: np.ndarray
    d_pg: np.ndarray
    i_pg: np.ndarray
    d_gp: np.ndarray
    i_gp: np.ndarray

    @classmethod
    def draw(cls, pred: Solid, gt: Solid, n: int, seed: int) -> "Samples":
        from scipy.spatial import cKDTree

        p, pn = sample_surface(pred.surface, n, seed)
        g, gn = sample_surface(gt.surface, n, seed + 1)
        d_pg, i_pg = cKDTree(g).query(p, workers=-1)
        d_gp, i_gp = cKDTree(p).query(g, workers=-1)
        return cls(p, pn, g, gn, d_pg, i_pg, d_gp, i_gp)

    def surface_scores(self, scale: float, tau: float) -> dict:
        """Chamfer-L1 (accuracy, completeness), F-score@``tau`` (precision, recall) and normal consistency,
        distances divided by ``scale``."""
        d_pg, d_gp = self.d_pg / scale, self.d_gp / scale
        cd, acc, comp = chamfer_from_distances(d_pg, d_gp)
        f, prec, rec = fscore_from_distances(d_pg, d_gp, tau)
        nc = normal_consistency_of_pairs(self.pred_n, self.gt_n, self.i_pg, self.i_gp)
        return {"chamfer_l1": cd, "accuracy": acc, "completeness": comp, "fscore": f, "precision": prec,
                "recall": rec, "normal_consistency": nc, "fscore_tau": tau}


def score_paper(pred: Solid, gt: Solid, samples: Samples, *, n_points: int = 100_000, seed: int = 0,
                tau: float = PAPER_TAU) -> dict:
    """The paper protocol's metrics (see the module doc); ``scale_mm``: the ground truth's longest edge."""
    unit = UnitBox.of(gt.bounds)
    p, g = pred.moved(unit), gt.moved(unit)
    lo, hi = np.full(3, -0.5 - PAPER_PADDING / 2), np.full(3, 0.5 + PAPER_PADDING / 2)
    pts = np.random.default_rng(seed + 2).uniform(lo, hi, size=(n_points, 3))
    out = {"iou": iou_occupancy(p.inside(pts), _nonempty(g, g.inside(pts), "paper")),
           "iou_vox": iou_occupancy(voxel_occupancy(p, lo, hi, PAPER_VOXELS, True),
                                    voxel_occupancy(g, lo, hi, PAPER_VOXELS, True))}
    out.update(samples.surface_scores(unit.scale, tau))
    out["scale_mm"] = unit.scale
    return out


def _nonempty(gt: Solid, occ: np.ndarray, protocol: str) -> np.ndarray:
    """``occ``, the ground truth's occupancy of the IoU points — an error naming it when none is inside."""
    if not occ.any():
        raise X2ReconInputError(gt.name, f"none of the {occ.size:,} IoU points of the {protocol} protocol is inside "
                                         "the ground truth: its IoU would mean nothing")
    return occ


def world_region(pred: Solid, gt: Solid, box=None) -> np.ndarray:
    """Where the world IoUs are scored: the joint bounding box, cut to ``box`` ((lo, hi)) when given."""
    lo = np.minimum(pred.bounds[0], gt.bounds[0])
    hi = np.maximum(pred.bounds[1], gt.bounds[1])
    if box is not None:
        lo, hi = np.maximum(lo, box[0]), np.minimum(hi, box[1])
    return np.array([lo, hi])


def score_world(pred: Solid, gt: Solid, samples: Samples, *, tau_mm: float, n_points: int = 100_000, seed: int = 0,
                box=None, voxels: int = WORLD_VOXELS) -> dict:
    """The world protocol's metrics in mm (see the module doc)."""
    lo, hi = world_region(pred, gt, box)
    pts = np.random.default_rng(seed + 2).uniform(lo, hi, size=(n_points, 3))
    inside_pred, inside_gt = pred.inside(pts), _nonempty(gt, gt.inside(pts), "world")
    out = {"iou": iou_occupancy(inside_pred, inside_gt),
           "iou_vox": iou_occupancy(voxel_occupancy(pred, lo, hi, voxels, False),
                                    voxel_occupancy(gt, lo, hi, voxels, False)),
           # predicted over true bone volume in the scored region (a blob is > 1, missing bone < 1)
           "volume_ratio": float(np.count_nonzero(inside_pred)) / float(np.count_nonzero(inside_gt))}
    out.update(samples.surface_scores(1.0, tau_mm))
    return out


def score(pred: trimesh.Trimesh | Solid, gt: trimesh.Trimesh | Solid, protocols=PROTOCOLS, *,
          n_points: int = 100_000, seed: int = 0, tau: float = PAPER_TAU, tau_mm: float | None = None,
          box=None, world_voxels: int = WORLD_VOXELS, names: tuple[str, str] = ("prediction", "ground truth")
          ) -> dict:
    """Metrics of ``pred`` against ``gt`` in each of ``protocols``: ``{"paper": {...}, "world": {...},
    "maxe": …, "maye": …, "maze": …, "gt_clipped": …, "notes": [...]}`` (axis errors in mm).  ``box``
    ((lo, hi), mm): the reconstruction box — the ground truth is cut to it and the world IoUs are scored
    inside it; ``tau_mm``: the world F-score threshold (default 0.02 × the box edge, or × 384 mm without
    a box).  Meshes are checked and oriented as the module doc says (errors name ``names``); ``notes``:
    what was done to them (inward shells turned, an open prediction)."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; use {', '.join(PROTOCOLS)}")
    if not isinstance(gt, Solid):
        gt = Solid.whole(gt, names[1], closed=True) if box is None else Solid.clipped(gt, *box, name=names[1])
    if not isinstance(pred, Solid):
        pred = Solid.whole(pred, names[0], scale=float(np.max(gt.bounds[1] - gt.bounds[0])))
    samples = Samples.draw(pred, gt, n_points, seed)
    out: dict = {}
    if "paper" in protocols:
        out["paper"] = score_paper(pred, gt, samples, n_points=n_points, seed=seed, tau=tau)
    if "world" in protocols:
        if tau_mm is None:
            edge = DEFAULT_BOX_MM if box is None else float(np.max(np.asarray(box[1]) - np.asarray(box[0])))
            tau_mm = WORLD_TAU_OF_BOX * edge
        out["world"] = score_world(pred, gt, samples, tau_mm=tau_mm, n_points=n_points, seed=seed, box=box,
                                   voxels=world_voxels)
    out.update(zip(AXIS_COLUMNS, axis_errors_after_icp(samples.pred, samples.gt)))
    out["gt_clipped"] = gt.is_clipped
    out["notes"] = [*gt.notes, *pred.notes]
    return out


def flat_row(result: dict) -> dict:
    """``score``'s result as one flat row: ``paper_iou`` … ``world_fscore_tau``, ``maxe`` …, ``gt_clipped``."""
    row = {f"{proto}_{k}": v for proto in PROTOCOLS if proto in result for k, v in result[proto].items()}
    row.update({k: result[k] for k in AXIS_COLUMNS})
    row["gt_clipped"] = result["gt_clipped"]
    return row
