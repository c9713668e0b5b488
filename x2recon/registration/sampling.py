"""Subsets of points: the "++" downsampling (Hirose 2021, BCPD++) and Nyström landmarks.

Hirose's voxel-grid scheme (``-D B,<n>,<r>``) draws points with probability inversely proportional
to the number of points in their voxel of width r, so dense regions do not dominate. We draw
*without* replacement (Efraimidis–Spirakis weighted keys), so the subset has no duplicates and the
kernel matrices built on it stay non-singular.
"""

from __future__ import annotations

import numpy as np


def voxel_sample(points: np.ndarray, n: int, voxel: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` distinct points, density-balanced on a grid of width ``voxel`` (0: uniform)."""
    N = len(points)
    if n >= N:
        return np.arange(N)
    if voxel > 0:
        cells = np.floor((points - points.min(0)) / voxel).astype(np.int64)
        _, inv, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
        w = 1.0 / counts[inv.ravel()]
    else:
        w = np.ones(N)
    keys = np.log(rng.random(N)) / w  # weighted sampling without replacement: the n largest keys
    return np.sort(np.argpartition(-keys, n - 1)[:n])


def component_landmarks(points: np.ndarray, k: int, labels: np.ndarray | None, voxel: float,
                        rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """``k`` landmark indices spread over the connected components ``labels`` (None: one component).

    Each component gets landmarks in proportion to its size, at least one while ``k`` allows (the
    largest components first); returns ``(indices, components_without_landmark)``. A component
    without a landmark has no geodesic kernel support: it moves with the global transform only.
    """
    if labels is None:
        return voxel_sample(points, k, voxel, rng), 0
    comps, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts)
    alloc = np.zeros(len(comps), np.int64)
    alloc[order[:min(k, len(comps))]] = 1
    rest = k - alloc.sum()
    if rest > 0:
        extra = np.floor(rest * counts / counts.sum()).astype(np.int64)
        alloc += extra
        left = rest - extra.sum()
        alloc[order[:left]] += 1
    alloc = np.minimum(alloc, counts)
    groups = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])  # members of comps[i]
    out = [g[voxel_sample(points[g], int(a), voxel, rng)] for g, a in zip(groups, alloc) if a]
    return np.sort(np.concatenate(out)), int((alloc == 0).sum())
