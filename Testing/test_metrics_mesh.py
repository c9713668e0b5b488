"""Mesh metrics on shapes whose answers are known in closed form."""

import numpy as np
import pytest
import trimesh

from _helpers import rotation
from x2recon.metrics import (
    axis_errors_after_icp,
    chamfer_l1,
    fscore,
    icp,
    iou_points,
    iou_voxels,
    mesh_metrics,
    normal_consistency,
    sample_surface,
)


def sphere(r, center=(0, 0, 0)):
    m = trimesh.creation.icosphere(subdivisions=5, radius=r)
    m.apply_translation(center)
    return m


def test_concentric_spheres_chamfer_fscore_iou():
    a, b = sphere(1.0), sphere(1.1)
    pa, na = sample_surface(a, 60_000, 0)
    pb, nb = sample_surface(b, 60_000, 1)
    cd, acc, comp = chamfer_l1(pa, pb)
    # every point of one sphere is 0.1 from the other surface; sampling adds a little
    assert 0.1 <= acc < 0.104 and 0.1 <= comp < 0.104 and cd == pytest.approx(0.5 * (acc + comp))
    assert fscore(pa, pb, 0.12)[0] > 0.99
    assert fscore(pa, pb, 0.09)[0] == 0.0
    f, p, r = fscore(pa, pb, 0.105)
    assert 0 < f < 1 and f == pytest.approx(2 * p * r / (p + r))
    # concentric radial normals are parallel
    assert normal_consistency(pa, na, pb, nb) > 0.999
    # IoU of concentric balls = (r1/r2)³ (the icospheres' volumes replace the balls')
    expect = a.volume / b.volume
    assert iou_points(a, b, n=200_000) == pytest.approx(expect, abs=0.01)
    assert iou_voxels(a, b, resolution=64) == pytest.approx(expect, abs=0.02)


def test_offset_cubes_iou_is_the_analytic_overlap():
    a = trimesh.creation.box((2, 2, 2))
    b = trimesh.creation.box((2, 2, 2))
    b.apply_translation((0.5, 0, 0))
    expect = (1.5 * 4) / (2 * 8 - 1.5 * 4)  # 6 / 10
    assert iou_points(a, b, n=200_000) == pytest.approx(expect, abs=0.01)
    assert iou_voxels(a, b, resolution=80) == pytest.approx(expect, abs=0.01)


def test_normal_consistency_detects_orthogonal_normals():
    # a flat square and the same square folded to be perpendicular: normals orthogonal
    p = np.random.default_rng(0).uniform(-1, 1, (5000, 3)) * [1, 1, 0]
    n1 = np.tile([0, 0, 1.0], (5000, 1))
    n2 = np.tile([1.0, 0, 0], (5000, 1))
    assert normal_consistency(p, n1, p, n1) == pytest.approx(1.0)
    assert normal_consistency(p, n1, p, n2) == pytest.approx(0.0)
    assert normal_consistency(p, n1, p, -n1) == pytest.approx(1.0)  # orientation-free, as ONet


def test_icp_recovers_a_rigid_motion_and_axis_errors_vanish():
    gt = trimesh.util.concatenate([trimesh.creation.box((40, 25, 10)), sphere(8.0, (15, 5, 10))])  # no symmetry
    g, _ = sample_surface(gt, 20_000, 0)
    R = rotation(0.05, -0.04, 0.08)
    t = np.array([2.0, -1.5, 1.0])
    moved = g @ R.T + t
    R2, t2 = icp(moved, g)
    np.testing.assert_allclose(R2 @ R, np.eye(3), atol=1e-3)
    assert max(axis_errors_after_icp(moved, g)) < 0.05


def test_axis_errors_point_at_the_deformed_axis():
    gt = trimesh.creation.box((40, 40, 40))
    pred = trimesh.creation.box((40, 40, 46))  # 3 mm too long at each end along z only
    p, _ = sample_surface(pred, 40_000, 0)
    g, _ = sample_surface(gt, 40_000, 1)
    ex, ey, ez = axis_errors_after_icp(p, g)
    assert ez > 4 * max(ex, ey) and ez > 0.3


def test_mesh_metrics_of_identical_meshes_are_perfect():
    m = sphere(30.0)
    r = mesh_metrics(m, m, n_points=30_000, scale=384.0)
    assert r.iou > 0.999 and r.fscore == 1.0 and r.chamfer_l1 < 1e-3 and r.normal_consistency > 0.99
    assert max(r.maxe, r.maye, r.maze) < 0.5


def test_kdtree_distances_equal_brute_force():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(400, 3)), rng.normal(size=(300, 3)) + 0.3
    d = np.linalg.norm(a[:, None] - b[None], axis=-1)
    cd, acc, comp = chamfer_l1(a, b)
    assert acc == pytest.approx(d.min(1).mean()) and comp == pytest.approx(d.min(0).mean())
    f, p, r = fscore(a, b, 0.4)
    assert p == pytest.approx((d.min(1) < 0.4).mean()) and r == pytest.approx((d.min(0) < 0.4).mean())
