"""MISE against dense extraction and the analytic surface (sphere, torus)."""

import numpy as np
import pytest

from x2recon.mesh.extract import flying_edges
from x2recon.mesh.mise import mise


def sphere_prob(p, r=0.3):
    return 1 / (1 + np.exp(-(r - np.linalg.norm(p, axis=1)) * 200))  # a sharp but smooth occupancy


def torus_prob(p, R=0.28, r=0.08):
    d = np.hypot(np.hypot(p[:, 0], p[:, 1]) - R, p[:, 2])
    return (d < r).astype(np.float64)  # binary, as a thresholded network would look


def dense(fn, res, threshold, lo=-0.5, hi=0.5):
    ax = lo + np.arange(res + 1) * (hi - lo) / res
    pts = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    vals = fn(pts).reshape((res + 1,) * 3)
    v, f = flying_edges(vals.transpose(2, 1, 0), threshold)
    return vals, lo + v * (hi - lo) / res, f


@pytest.mark.parametrize("fn,threshold", [(sphere_prob, 0.2), (torus_prob, 0.5)], ids=["sphere", "torus"])
def test_mise_equals_dense_extraction_with_far_fewer_evaluations(fn, threshold):
    res = mise(fn, resolution0=16, upsampling_steps=3, threshold=threshold)
    vals, dv, df = dense(fn, 128, threshold)
    # same side of the threshold everywhere, and identical values wherever the surface passes
    assert np.array_equal(res.values >= threshold, vals >= threshold)
    near = np.zeros_like(vals, bool)
    inside = vals >= threshold
    for ax in range(3):
        edge = np.diff(inside.astype(np.int8), axis=ax) != 0
        sl = [slice(None)] * 3
        sl[ax] = slice(0, -1)
        near[tuple(sl)] |= edge
        sl[ax] = slice(1, None)
        near[tuple(sl)] |= edge
    np.testing.assert_allclose(res.values[near], vals[near])
    # hence the same mesh
    assert len(res.mesh.vertices) == len(dv)
    np.testing.assert_allclose(np.sort(res.mesh.vertices, axis=0), np.sort(dv, axis=0), atol=1e-9)
    assert res.evaluations < 0.25 * res.dense_evaluations


def test_mise_surface_matches_the_analytic_sphere_and_torus():
    s = mise(sphere_prob, resolution0=32, upsampling_steps=2, threshold=0.5)
    assert s.mesh.is_watertight
    rad = np.linalg.norm(s.mesh.vertices, axis=1)
    assert np.abs(rad - 0.3).max() < 1 / 128
    assert s.mesh.volume == pytest.approx(4 / 3 * np.pi * 0.3**3, rel=0.01)
    t = mise(torus_prob, resolution0=32, upsampling_steps=2, threshold=0.5)
    d = np.hypot(np.hypot(t.mesh.vertices[:, 0], t.mesh.vertices[:, 1]) - 0.28, t.mesh.vertices[:, 2])
    assert np.abs(d - 0.08).max() < 1 / 128 + 1e-9  # within one final cell of the analytic torus
    assert t.mesh.is_watertight and t.mesh.euler_number == 0  # genus one


def test_empty_and_batched_evaluation():
    calls = []

    def empty(p):
        calls.append(len(p))
        return np.zeros(len(p))

    r = mise(empty, resolution0=8, upsampling_steps=2, batch=100)
    assert len(r.mesh.faces) == 0 and max(calls) <= 100 and r.evaluations == 9**3


def test_fine_points_are_exactly_those_of_the_active_cells():
    """The whole-array marking of the fine points of active cells equals marking each cell's 3×3×3 points."""
    from x2recon.mesh.mise import _fine_points_of

    rng = np.random.default_rng(1)
    for r in (1, 5, 12):
        active = rng.random((r, r, r)) < 0.2
        active[-1, -1, -1] = True  # a cell at the far corner reaches the last fine point
        want = np.zeros((2 * r + 1,) * 3, bool)
        for i, j, k in np.argwhere(active):
            want[2 * i:2 * i + 3, 2 * j:2 * j + 3, 2 * k:2 * k + 3] = True
        assert np.array_equal(_fine_points_of(active), want)
