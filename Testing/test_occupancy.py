"""Occupancy samples: winding-number inside test vs exact/ray-based/analytic references, sample
distribution in the reconstruction box, agreement with the chest labelmap, ONet packing."""

import numpy as np
import pytest
import trimesh

from x2recon.dataset.occupancy import inside, load_points, sample_occupancy, save_points, winding_number
from x2recon.errors import X2ReconInputError
from x2recon.geometry import ProjectionGeometry
from x2recon.mesh.extract import merge_meshes


def ray_parity_inside(mesh, q, direction=(0.5773, 0.5774, 0.5775)):
    """Reference inside test by ray casting: odd number of triangle crossings (Möller–Trumbore).

    (trimesh's ``contains`` does the same but needs rtree/embree, not installed here.)
    """
    d = np.asarray(direction) / np.linalg.norm(direction)
    a, b, c = (mesh.triangles[:, i] for i in range(3))
    e1, e2 = b - a, c - a
    h = np.cross(d, e2)
    det = np.einsum("ij,ij->i", e1, h)
    ok = np.abs(det) > 1e-12
    a, e1, e2, h, det = a[ok], e1[ok], e2[ok], h[ok], det[ok]
    out = np.empty(len(q), bool)
    for s in range(0, len(q), 200):
        t0 = q[s : s + 200, None, :] - a  # (P, F, 3)
        u = np.einsum("pfj,fj->pf", t0, h) / det
        qv = np.cross(t0, e1)
        v = (qv @ d) / det
        t = np.einsum("pfj,fj->pf", qv, e2) / det
        hit = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
        out[s : s + 200] = hit.sum(1) % 2 == 1
    return out


def test_inside_agrees_with_ray_casting_exact_winding_number_and_the_analytic_torus():
    import igl

    m = trimesh.creation.torus(30, 10, major_sections=64, minor_sections=32)
    m.apply_translation([5, -3, 40])
    q = np.random.default_rng(0).uniform(-45, 45, (3000, 3)) + [5, -3, 40]
    occ = inside(m, q)
    assert (occ == ray_parity_inside(m, q)).mean() >= 0.999
    exact = igl.winding_number(np.asarray(m.vertices), np.asarray(m.faces, np.int64), q[:500])
    np.testing.assert_allclose(winding_number(m, q[:500]), exact, atol=0.01)  # Barnes–Hut error ≪ ½
    assert np.array_equal(occ[:500], exact > 0.5)
    p = q - [5, -3, 40]
    analytic = (np.hypot(p[:, 0], p[:, 1]) - 30) ** 2 + p[:, 2] ** 2 < 10**2
    assert (occ == analytic).mean() > 0.99  # the tessellation lies slightly inside the torus
    assert 0.05 < occ.mean() < 0.5  # torus volume 2π²·30·10² ≈ 8 % of the 90 mm cube


def test_inside_of_overlapping_parts_is_their_union():
    a = trimesh.creation.icosphere(4, radius=10.0)
    b = a.copy()
    b.apply_translation([12, 0, 0])
    both = trimesh.util.concatenate([a, b])  # as merge_meshes: two closed shells, overlapping
    q = np.random.default_rng(1).uniform([-12, -12, -12], [24, 12, 12], (5000, 3))
    union = (np.linalg.norm(q, axis=1) < 10) | (np.linalg.norm(q - [12, 0, 0], axis=1) < 10)
    assert (inside(both, q) == union).mean() > 0.995
    assert winding_number(both, [[6.0, 0, 0]])[0] == pytest.approx(2.0, abs=1e-3)  # counted twice


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_samples_are_uniform_or_near_the_surface_in_box_coordinates(fraction):
    R, centre, box = 40.0, np.array([20.0, -35.0, 110.0]), 200.0
    m = trimesh.creation.icosphere(5, radius=R)
    m.apply_translation(centre)
    g = ProjectionGeometry.from_view("AP", centre + [10, 0, -5], box_size=box)
    pts, occ = sample_occupancy(m, g, n=20_000, near_surface_fraction=fraction, sigma=0.01, seed=4)
    assert pts.dtype == np.float32 and occ.dtype == bool and pts.shape == (20_000, 3)
    assert np.abs(pts).max() <= 0.5
    assert np.array_equal(pts, pts.astype(np.float16).astype(np.float32))  # exactly storable
    r = np.linalg.norm(g.from_box(pts.astype(np.float64)) - centre, axis=1)  # mm from the sphere centre
    far = np.abs(r - R) > 0.2  # beyond the tessellation error of the icosphere
    assert (occ[far] == (r[far] < R)).all()
    if fraction == 0:  # uniform: inside fraction = sphere volume / box volume (binomial 4σ)
        p = 4 / 3 * np.pi * R**3 / box**3
        assert abs(occ.mean() - p) < 4 * np.sqrt(p * (1 - p) / len(occ))
        np.testing.assert_allclose(pts.mean(0), 0, atol=0.01)
        np.testing.assert_allclose(pts.var(0), 1 / 12, rtol=0.05)
    else:  # near the surface: signed distance ~ N(0, σ·box) (radial part of 3D noise)
        d = r - R
        assert abs(d.mean()) < 0.1 and np.std(d) == pytest.approx(0.01 * box, rel=0.05)
        assert 0.45 < occ.mean() < 0.55
    again, occ2 = sample_occupancy(m, g, n=20_000, near_surface_fraction=fraction, seed=4)
    assert np.array_equal(again, pts) and np.array_equal(occ2, occ)  # seeded
    assert not np.array_equal(sample_occupancy(m, g, n=20_000, near_surface_fraction=fraction, seed=5)[0], pts)


def test_occupancy_agrees_with_the_labelmap_away_from_the_surface(chest_half_meshes):
    from scipy.ndimage import distance_transform_edt

    seg, names, meshes, _ = chest_half_meshes
    merged = merge_meshes(meshes)
    g = ProjectionGeometry.from_view("AP", merged.bounds.mean(0), box_size=float(np.ptp(merged.bounds, 0).max()))
    pts, occ = sample_occupancy(merged, g, n=40_000, seed=3)
    ijk = np.round(seg.world_to_index(g.from_box(pts.astype(np.float64)))).astype(int)[:, ::-1]  # nearest voxel (k, j, i)
    fg = np.isin(seg.array, list(names))
    diag = np.linalg.norm(seg.spacing)
    # crop around the structures with a margin wider than a voxel diagonal: outside it, far and background
    idx = np.argwhere(fg)
    lo, hi = np.maximum(idx.min(0) - 4, 0), np.minimum(idx.max(0) + 5, fg.shape)
    crop = fg[tuple(slice(a, b) for a, b in zip(lo, hi))]
    rel = ijk - lo
    valid = ((rel >= 0) & (rel < crop.shape)).all(1)
    lab = np.zeros(len(pts), bool)
    lab[valid] = crop[tuple(rel[valid].T)]
    # distance (mm) of each point's voxel to the other side of the labelmap boundary
    sampling = seg.spacing[::-1]
    d_both = np.maximum(distance_transform_edt(crop, sampling=sampling), distance_transform_edt(~crop, sampling=sampling))
    dist = np.full(len(pts), np.inf)
    dist[valid] = d_both[tuple(rel[valid].T)]
    far = dist > diag  # farther than one voxel diagonal from the surface
    assert (far & lab).sum() > 300 and (far & ~lab).sum() > 10_000  # both sides represented
    assert (occ[far & lab]).mean() >= 0.99, "inside points of the labelmap outside the mesh"
    assert (~occ[far & ~lab]).mean() >= 0.99, "outside points of the labelmap inside the mesh"
    assert (occ[far] == lab[far]).mean() >= 0.99


def test_points_file_packs_like_occupancy_networks_and_round_trips(tmp_path):
    rng = np.random.default_rng(7)
    n = 1003  # not a multiple of 8
    pts = rng.uniform(-0.5, 0.5, (n, 3)).astype(np.float32)
    occ = rng.random(n) < 0.3
    path = tmp_path / "points.npz"
    save_points(path, pts, occ, box_size=384.0, isocenter=np.array([1.0, 2.0, 3.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["points.npz"]
    with np.load(path) as d:  # as Occupancy Networks reads it
        assert d["points"].dtype == np.float16 and d["occupancies"].dtype == np.uint8
        assert np.array_equal(np.unpackbits(d["occupancies"])[:n].astype(bool), occ)
        assert int(d["n"]) == n and float(d["box_size"]) == 384.0 and d["isocenter"].tolist() == [1, 2, 3]
    p2, o2 = load_points(path)
    assert p2.dtype == np.float32 and o2.dtype == bool and np.array_equal(o2, occ)
    assert np.abs(p2 - pts).max() <= 2.0**-12  # float16 spacing is 2^-12 on [¼, ½)
    assert path.stat().st_size < n * 6 + n // 8 + 1500
    # points drawn by sample_occupancy are float16 values already: lossless
    m = trimesh.creation.icosphere(2, radius=30.0)
    sp, so = sample_occupancy(m, ProjectionGeometry.from_view("AP", [0, 0, 0], box_size=100.0), n=500, seed=1)
    save_points(path, sp, so)
    p3, o3 = load_points(path)
    assert np.array_equal(p3, sp) and np.array_equal(o3, so)


def test_bad_points_files_are_named(tmp_path):
    with pytest.raises(X2ReconInputError, match="none.npz: points file not found"):
        load_points(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(X2ReconInputError, match="text.npz: not an occupancy points file"):
        load_points(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(X2ReconInputError, match=r"other.npz: .*missing \['occupancies', 'points'\]"):
        load_points(tmp_path / "other.npz")
    np.savez(tmp_path / "short.npz", points=np.zeros((20, 3), np.float16), occupancies=np.zeros(2, np.uint8), n=20)
    with pytest.raises(X2ReconInputError, match="short.npz: corrupt"):
        load_points(tmp_path / "short.npz")
    with pytest.raises(ValueError, match="reserved"):
        save_points(tmp_path / "p.npz", np.zeros((2, 3)), np.zeros(2, bool), n=5)
