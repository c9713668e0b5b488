"""Outward winding for meshes x2recon did not make itself, so that inside tests never depend on it.

A mesh file's winding is the writer's choice: some tools write every triangle the other way round
(negative signed volume), some concatenate parts of either winding.  The inside test
(``dataset.occupancy.inside``, the generalised winding number) reads "inside" from the winding, so
an inward-wound ground truth has nothing inside and every IoU against it is meaningless.

:func:`orient_outward` rewinds each closed *shell* (vertex-connected component whose every edge lies
in two faces) by where it sits: a shell inside an even number of other shells bounds a solid and
winds outward (signed volume > 0); one inside an odd number bounds a cavity and winds inward.  That
is the winding a closed iso-surface has anyway, so x2recon's own meshes come back unchanged; only
the writer's choice is undone.  A shell counts as inside another when all of up to
:data:`NEST_SAMPLES` of its vertices have winding number |w| > ½ with respect to that other shell
and its bounding box lies in the other's (parts that merely touch or interpenetrate by a fraction of
a voxel, like neighbouring bones of a merged mesh, are not nested).  Shells wound inconsistently
within themselves are first made consistent (``trimesh.repair.fix_winding``).  An open shell (a
surface with holes) has no inside; it is turned so that its signed volume, which is near the enclosed
one when the holes are small, is positive, and takes no part in the nesting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh

#: Vertices of a shell tested against another shell to decide that one lies inside the other.
NEST_SAMPLES = 16


@dataclass(frozen=True)
class Shells:
    """Vertex-connected components of a mesh: ``labels`` per face, and per shell its signed volume,
    whether it is closed (every edge in two faces) and its bounding box."""

    labels: np.ndarray
    volume: np.ndarray
    closed: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    open_edges: int
    consistent: bool

    def __len__(self) -> int:
        return len(self.volume)


def shells(mesh: trimesh.Trimesh) -> Shells:
    """The shells of ``mesh`` (see :class:`Shells`); O(faces), no face-adjacency graph."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    V = np.asarray(mesh.vertices, np.float64)
    F = np.asarray(mesh.faces, np.int64)
    nv = len(V)
    a, b = F[:, [0, 1, 2]].ravel(), F[:, [1, 2, 0]].ravel()  # directed edges as the faces wind them
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(nv, nv))
    _, vlabel = connected_components(graph, directed=False)
    used, flabel = np.unique(vlabel[F[:, 0]], return_inverse=True)
    n = len(used)
    tri = V[F]
    signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) / 6.0
    volume = np.bincount(flabel, weights=signed, minlength=n)
    und = np.minimum(a, b) * nv + np.maximum(a, b)
    _, inv, counts = np.unique(und, return_inverse=True, return_counts=True)
    per_edge = counts[inv]
    closed = np.ones(n, bool)
    closed[np.unique(flabel[np.repeat(np.arange(len(F)), 3)[per_edge != 2]])] = False
    twice = per_edge == 2  # a consistently wound surface crosses each such edge once in each direction
    directed = np.sort(a[twice] * nv + b[twice])
    consistent = not np.any(directed[1:] == directed[:-1])
    shell_of_vertex = np.full(nv, -1)
    shell_of_vertex[F.ravel()] = np.repeat(flabel, 3)
    on = np.flatnonzero(shell_of_vertex >= 0)
    order = on[np.argsort(shell_of_vertex[on], kind="stable")]
    starts = np.searchsorted(shell_of_vertex[order], np.arange(n))
    lo, hi = np.minimum.reduceat(V[order], starts), np.maximum.reduceat(V[order], starts)
    return Shells(flabel, volume, closed, lo, hi, int((counts == 1).sum()), bool(consistent))


def _depths(mesh: trimesh.Trimesh, s: Shells, candidates: np.ndarray) -> np.ndarray:
    """How many other closed shells contain each shell of ``candidates`` (indices); 0 for the rest."""
    import igl

    V = np.asarray(mesh.vertices, np.float64)
    F = np.asarray(mesh.faces, np.int64)
    depth = np.zeros(len(s), np.int64)
    size = np.abs(s.volume)
    for b in candidates:
        inner = candidates[(candidates != b) & (size[candidates] < size[b])
                           & np.all(s.lo[candidates] >= s.lo[b], 1) & np.all(s.hi[candidates] <= s.hi[b], 1)]
        if not len(inner):
            continue
        fb = F[s.labels == b]
        samples, owner = [], []
        for c in inner:
            verts = np.unique(F[s.labels == c])
            take = verts[np.linspace(0, len(verts) - 1, min(NEST_SAMPLES, len(verts))).astype(np.int64)]
            samples.append(V[take])
            owner.append(np.full(len(take), c))
        pts, owner = np.concatenate(samples), np.concatenate(owner)
        w = np.abs(igl.fast_winding_number(V, fb, np.ascontiguousarray(pts)))
        outside = np.bincount(owner, weights=(w <= 0.5), minlength=len(s))
        depth[inner[outside[inner] == 0]] += 1
    return depth


def orient_outward(mesh: trimesh.Trimesh) -> tuple[trimesh.Trimesh, int]:
    """``mesh`` with every shell wound as the module doc says (solids outward, cavities inward), and how
    many shells were turned round.  ``mesh`` itself is never modified; when nothing needs
    turning it is returned as it is."""
    if len(mesh.faces) == 0:
        return mesh, 0
    s = shells(mesh)
    if not s.consistent:
        mesh = mesh.copy()
        trimesh.repair.fix_winding(mesh)
        s = shells(mesh)
    solid = np.abs(s.volume) > 0
    if np.all(s.volume[solid] > 0):
        return mesh, 0
    closed = np.flatnonzero(s.closed & solid)
    depth = _depths(mesh, s, closed) if len(closed) > 1 else np.zeros(len(s), np.int64)
    want = np.where(depth % 2 == 0, 1.0, -1.0)
    turn = solid & (np.sign(s.volume) != want)
    if not turn.any():
        return mesh, 0
    faces = np.array(mesh.faces)
    flip = turn[s.labels]
    faces[flip] = faces[flip][:, ::-1]
    return trimesh.Trimesh(np.asarray(mesh.vertices), faces, process=False), int(turn.sum())
