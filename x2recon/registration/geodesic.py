"""GBCPD's geodesic kernel over the source mesh (Hirose, "Geodesic-based Bayesian coherent point
drift", TPAMI 2022; his ``-G geodesic,τ,<triangles>``).

    g(y_m, y_m') = τ·exp(−d_geo(m, m')²/2β²) + (1 − τ)·exp(−‖y_m − y_m'‖²/2β²)

d_geo is the shortest path along the mesh's edges (Dijkstra, ``scipy.sparse.csgraph``), the same
graph Hirose builds from the triangles. Parts that are close in space but far along the surface
(two fingers, neighbouring ribs) get a small kernel value, so their motions are not tied together.
A Gaussian of a geodesic distance is not positive semi-definite in general: as Hirose does, the
kernel is eigendecomposed (Nyström on K landmarks for large M, exactly for small M) and eigenvalues
≤ ε·max are dropped, which leaves a PSD low-rank G ≈ Q·diag(L)·Qᵀ.

Disconnected meshes (a bone mesh with one shell per bone): geodesic distance between components is
infinite, so the geodesic term is 0 across them and each component deforms on its own (the
Euclidean term, weight 1 − τ, still couples them). Landmarks are spread over the components (at
least one each while K allows); a component left without one moves only with the global
similarity transform, which ``info["components_without_landmark"]`` reports.
Dijkstra stops at 8β (the kernel is < 1e-13 beyond), which keeps it fast on large meshes.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components, dijkstra

from ..errors import X2ReconInputError
from .kernels import LowRank, check_full_rank, eig_lowrank, nystrom
from .sampling import component_landmarks

#: Dijkstra's search radius, in units of β.
GEODESIC_LIMIT = 8.0


def edge_graph(points: np.ndarray, faces: np.ndarray | None, name: str = "source") -> sp.csr_matrix:
    """Symmetric sparse graph of the mesh's edges weighted by their length (a tiny floor keeps
    zero-length edges, from duplicated vertices, connected)."""
    if faces is None or len(faces) == 0:
        raise X2ReconInputError(None if name == "source" else name,
                                "the geodesic kernel (GBCPD) needs the source mesh's triangles, and the source "
                                "has none (a point set); give a mesh file, or use --method bcpd (Euclidean "
                                "Gaussian kernel)")
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e = e[e[:, 0] != e[:, 1]]
    if len(e) == 0:
        raise X2ReconInputError(None if name == "source" else name,
                                "the source mesh is degenerate (every triangle repeats a vertex: no edges); "
                                "the geodesic kernel cannot be built, use --method bcpd")
    e = np.unique(np.sort(e, axis=1), axis=0)
    w = np.linalg.norm(points[e[:, 0]] - points[e[:, 1]], axis=1)
    w = np.maximum(w, 1e-12 * max(float(np.ptp(points, axis=0).max()), 1.0))
    M = len(points)
    g = sp.coo_matrix((np.concatenate([w, w]), (np.concatenate([e[:, 0], e[:, 1]]),
                                                np.concatenate([e[:, 1], e[:, 0]]))), shape=(M, M))
    return g.tocsr()


def _columns(graph, points: np.ndarray, sources: np.ndarray, beta: float, tau: float, dtype) -> np.ndarray:
    """Kernel columns g(·, y_s) for s in ``sources``: (M, len(sources))."""
    out = np.empty((len(points), len(sources)), dtype)
    step = 64
    for j in range(0, len(sources), step):
        idx = sources[j:j + step]
        d = dijkstra(graph, directed=False, indices=idx, limit=GEODESIC_LIMIT * beta)  # (k, M), inf beyond
        kg = np.exp(-0.5 * (d / beta) ** 2)  # exp(−inf) = 0 across components and beyond the limit
        if tau < 1.0:
            de2 = ((points[None, :, :] - points[idx][:, None, :]) ** 2).sum(-1)
            kg = tau * kg + (1.0 - tau) * np.exp(-0.5 * de2 / beta**2)
        out[:, j:j + step] = kg.T
    return out


def geodesic_kernel(points: np.ndarray, faces: np.ndarray | None, beta: float, tau: float, rank: int,
                    eps: float, rng: np.random.Generator, device, dtype, voxel: float = 0.05) -> tuple[LowRank, dict]:
    """PSD low-rank geodesic kernel of the (normalised) source mesh; ``rank`` 0 or ≥ M: exact."""
    graph = edge_graph(points, faces)
    ncomp, labels = connected_components(graph, directed=False)
    M = len(points)
    info = {"components": int(ncomp)}
    if rank <= 0 or rank >= M:
        check_full_rank(M)
        G = torch.as_tensor(_columns(graph, points, np.arange(M), beta, tau, np.float64), device=device)
        lr = eig_lowrank(G, eps)
        lr = LowRank(lr.Q.to(dtype), lr.L.to(dtype))
        info.update(kernel_rank=lr.rank, components_without_landmark=0)
        return lr, info
    lm, missing = component_landmarks(points, rank, labels if ncomp > 1 else None, voxel, rng)
    cols = torch.as_tensor(_columns(graph, points, lm, beta, tau, np.float64), device=device)
    lr = nystrom(cols, lm, eps)
    lr = LowRank(lr.Q.to(dtype), lr.L.to(dtype))
    info.update(kernel_rank=lr.rank, landmarks=int(len(lm)), components_without_landmark=missing)
    return lr, info
