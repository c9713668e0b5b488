"""Meshes from labelmaps (watertight, volume-preserving, placed in LPS mm) and occupancy samples."""

import numpy as np
import pytest
import trimesh

from x2recon.dataset.config import BuildConfig
from x2recon.dataset.occupancy import inside, load_points, sample_occupancy, save_points
from x2recon.dataset.segmentation import segment
from x2recon.errors import X2ReconInputError
from x2recon.geometry import ProjectionGeometry
from x2recon.io.mesh import read_mesh, write_mesh
from x2recon.io.volume import read_ct
from x2recon.mesh.extract import MeshError, ensure_watertight, labelmap_to_meshes, mask_to_mesh, merge_meshes


def ball(n=40, r=12.0):
    c = (n - 1) / 2
    z, y, x = np.mgrid[:n, :n, :n]
    return (x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2 <= r * r


def affine(spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0), R=np.eye(3)):
    A = np.eye(4)
    A[:3, :3] = R @ np.diag(spacing)
    A[:3, 3] = origin
    return A


@pytest.mark.parametrize("flip", [False, True])
def test_sphere_mesh_volume_area_and_placement(flip):
    mask = ball()
    th = np.radians(25)
    R = np.array([[np.cos(th), 0, np.sin(th)], [0, 1, 0], [-np.sin(th), 0, np.cos(th)]])
    if flip:
        R = R @ np.diag([1, -1, 1])  # negative determinant (e.g. a RAS-stored volume)
    A = affine((0.8, 0.9, 1.1), (10, -20, 30), R)
    m = mask_to_mesh(mask, A)
    vox = mask.sum() * abs(np.linalg.det(A[:3, :3]))
    assert m.is_watertight and m.volume > 0  # outward normals
    assert abs(m.volume / vox - 1) < 0.005
    # the analytic ellipsoid (sphere of radius 12.?? voxels) has volume ≈ the voxel count
    centroid_world = A[:3, :3] @ np.argwhere(mask)[:, ::-1].mean(0) + A[:3, 3]
    np.testing.assert_allclose(m.center_mass, centroid_world, atol=0.05)
    # area of the smooth surface is close to the analytic ellipsoid's (a voxel staircase: +50 %)
    sph = trimesh.creation.icosphere(5, radius=12.0)
    sph.apply_transform(A @ np.r_[np.c_[np.eye(3), [19.5] * 3], [[0, 0, 0, 1]]])
    assert abs(m.area / sph.area - 1) < 0.05


def test_real_structures_are_watertight_and_keep_the_voxel_volume(chest_half):
    ct = read_ct(chest_half[0])
    cfg = BuildConfig(structures=["vertebrae_T8", "rib_left_4", "rib_right_11", "costal_cartilages", "sternum"])
    seg, names, _ = segment(ct, chest_half[1], cfg)
    meshes, skipped = labelmap_to_meshes(seg, names)
    assert set(meshes) == set(names.values()) and not skipped
    vox = np.prod(seg.spacing)
    for k, n in names.items():
        m = meshes[n]
        assert m.is_watertight and m.is_winding_consistent and m.volume > 0, n
        assert abs(m.volume / ((seg.array == k).sum() * vox) - 1) < 0.02, n
    merged = merge_meshes(meshes)
    assert merged.is_watertight and len(merged.faces) == sum(len(m.faces) for m in meshes.values())


def test_occupancy_agrees_with_the_labelmap_away_from_the_surface(chest_half):
    from scipy.ndimage import distance_transform_edt

    ct = read_ct(chest_half[0])
    cfg = BuildConfig(structures=["vertebrae_T6", "vertebrae_T7", "vertebrae_T8", "rib_left_5", "rib_right_5"])
    seg, names, _ = segment(ct, chest_half[1], cfg)
    meshes, _ = labelmap_to_meshes(seg, names)
    merged = merge_meshes(meshes)
    g = ProjectionGeometry.from_view("AP", merged.bounds.mean(0), box_size=200)
    pts, occ = sample_occupancy(merged, g, n=40_000, seed=3)
    assert 0.05 < occ.mean() < 0.6 and np.abs(pts).max() <= 0.5
    world = g.from_box(pts.astype(np.float64))
    ijk = np.round(seg.world_to_index(world)).astype(int)
    valid = ((ijk >= 0) & (ijk < np.array(seg.shape_xyz))).all(1)
    lab = np.zeros(len(pts), bool)
    lab[valid] = seg.array[ijk[valid, 2], ijk[valid, 1], ijk[valid, 0]] > 0
    # distance of each point to the labelmap boundary (mm), from both sides
    fg = seg.array > 0
    d_in = distance_transform_edt(fg, sampling=seg.spacing[::-1])
    d_out = distance_transform_edt(~fg, sampling=seg.spacing[::-1])
    dist = np.full(len(pts), np.inf)
    dist[valid] = np.maximum(d_in, d_out)[ijk[valid, 2], ijk[valid, 1], ijk[valid, 0]]
    far = dist > np.linalg.norm(seg.spacing)  # more than a voxel diagonal from the surface
    assert far.sum() > 20_000
    assert (occ[far] == lab[far]).mean() >= 0.99


def test_winding_number_agrees_with_the_analytic_torus_and_packing_round_trips(tmp_path):
    m = trimesh.creation.torus(30, 10, major_sections=128, minor_sections=64)
    q = np.random.default_rng(0).uniform(-45, 45, (3000, 3))
    ref = (np.hypot(q[:, 0], q[:, 1]) - 30) ** 2 + q[:, 2] ** 2 < 10**2  # the analytic torus
    assert (inside(m, q) == ref).mean() > 0.995  # the tessellation is a little inside the torus
    occ = inside(m, q)
    save_points(tmp_path / "p.npz", q / 100, occ, box_size=100.0)
    p2, o2 = load_points(tmp_path / "p.npz")
    assert p2.dtype == np.float32 and np.abs(p2 - q / 100).max() < 1e-3 and np.array_equal(o2, occ)
    assert (tmp_path / "p.npz").stat().st_size < 3000 * 6 + 3000 // 8 + 2000  # float16 + bits
    with pytest.raises(X2ReconInputError, match="not found"):
        load_points(tmp_path / "none.npz")


def test_repair_and_failure_of_open_surfaces():
    m = trimesh.creation.icosphere(3)
    holed = trimesh.Trimesh(m.vertices, m.faces[1:], process=True)
    fixed = ensure_watertight(holed, "small_hole")
    assert fixed.is_watertight and fixed.volume > 0
    half = trimesh.Trimesh(m.vertices, m.faces[m.triangles_center[:, 2] > 0], process=True)
    with pytest.raises(MeshError, match="surface of half_sphere is not watertight"):
        ensure_watertight(half, "half_sphere")
    with pytest.raises(MeshError, match="tiny.*only 3 voxels"):
        small = np.zeros((10, 10, 10), bool)
        small[5, 5, 4:7] = True
        mask_to_mesh(small, np.eye(4), name="tiny")


def test_mesh_files_round_trip_and_bad_files(tmp_path):
    m = trimesh.creation.box((10, 20, 30))
    for suffix in (".ply", ".stl", ".obj"):
        write_mesh(m, tmp_path / f"m{suffix}")
        back = read_mesh(tmp_path / f"m{suffix}")
        assert back.is_watertight and back.volume == pytest.approx(6000)
    (tmp_path / "bad.stl").write_bytes(b"solid nonsense\nfacet\n")
    with pytest.raises(X2ReconInputError, match="bad.stl"):
        read_mesh(tmp_path / "bad.stl")
    with pytest.raises(X2ReconInputError, match="mesh file not found"):
        read_mesh(tmp_path / "none.ply")
