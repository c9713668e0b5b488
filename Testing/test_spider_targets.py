"""SPIDER targets: the box grid's convention, and CT/labels resampled into it.

References: analytic phantoms (a linear HU ramp, which trilinear interpolation reproduces
exactly; a cube at a known world position), ``ProjectionGeometry.to_box/from_box``, and an
independent numpy nearest-neighbour lookup through ``Volume.world_to_index``.
"""

import numpy as np
import pytest

from x2recon.dataset.spider_targets import AIR_HU, box_centres, box_grid, resample_to_box
from x2recon.geometry import ProjectionGeometry
from x2recon.io.volume import Volume

from _helpers import rotation




def voxel_centres(vol: Volume) -> np.ndarray:
    """World centres of every voxel, ``(nk, nj, ni, 3)``."""
    nk, nj, ni = vol.array.shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    return vol.index_to_world(np.stack([i, j, k], -1).astype(float))


def test_grid_convention_matches_the_geometry_box():
    iso = np.array([12.5, -40.0, 310.0])
    g = ProjectionGeometry.from_view("LAT", iso, box_size=200.0)
    n = 16
    grid = box_grid(g, n=n)  # box_size from the geometry
    assert grid.array.shape == (n, n, n) and np.allclose(grid.direction, np.eye(3))
    assert np.allclose(grid.spacing, 200.0 / n)
    w = voxel_centres(grid)
    q = g.to_box(w)  # normalised box coordinates of the voxel centres
    c = box_centres(n)
    np.testing.assert_allclose(q[..., 0], np.broadcast_to(c[None, None, :], (n, n, n)), atol=1e-12)
    np.testing.assert_allclose(q[..., 1], np.broadcast_to(c[None, :, None], (n, n, n)), atol=1e-12)
    np.testing.assert_allclose(q[..., 2], np.broadcast_to(c[:, None, None], (n, n, n)), atol=1e-12)
    np.testing.assert_allclose(g.from_box(q), w, atol=1e-9)
    # voxel edges tile the box exactly: the outer corners are the box bounds
    lo, hi = g.box_bounds()
    np.testing.assert_allclose(grid.corners_world().min(0), lo, atol=1e-9)
    np.testing.assert_allclose(grid.corners_world().max(0), hi, atol=1e-9)
    # an isocenter and an explicit size give the same grid
    other = box_grid(iso, 200.0, n)
    assert other.same_grid(grid) and np.allclose(other.origin, grid.origin)
    with pytest.raises(ValueError, match="box_size is needed"):
        box_grid(iso, None, n)
    with pytest.raises(ValueError, match="positive"):
        box_grid(iso, -1.0, n)


def test_hu_ramp_lands_on_the_right_voxels():
    # oblique CT grid holding HU = a·p + b (linear in world mm): trilinear resampling is exact for it
    R = rotation(0.3, -0.2, 0.5)
    sp = np.array([1.1, 0.9, 1.7])
    shape_kji = (40, 56, 50)
    origin = np.array([-20.0, 5.0, -30.0])
    a, b = np.array([3.0, -2.0, 1.5]), 100.0
    vol = Volume(np.zeros(shape_kji, np.float32), sp, origin, R)
    vol.array = (voxel_centres(vol) @ a + b).astype(np.float32)
    centre = vol.corners_world().mean(0)
    ct_box, seg_box = resample_to_box(vol, None, centre, 40.0, 20)
    assert seg_box is None and ct_box.array.dtype == np.int16
    w = voxel_centres(ct_box)
    src = vol.world_to_index(w)
    inside = np.all((src >= 0) & (src <= np.array(vol.shape_xyz) - 1), axis=-1)
    assert inside.mean() > 0.9
    expect = w @ a + b
    assert np.abs(ct_box.array[inside] - expect[inside]).max() <= 0.5 + 1e-3  # rounding to integer HU
    # a box far from the scan: air everywhere
    far, _ = resample_to_box(vol, None, centre + [500, 0, 0], 40.0, 8)
    assert (far.array == AIR_HU).all()


def test_bright_cube_and_its_label_land_at_the_known_world_position():
    # a 1000 HU cube (label 300, uint16) at world [10, 30] × [−20, 0] × [40, 60] mm in an oblique CT
    R = rotation(0.1, 0.4, -0.3)
    n = 96
    vol = Volume(np.full((n, n, n), -1000, np.int16), (0.8, 0.8, 0.8), (0, 0, 0), R)
    vol.origin = np.array([20.0, -10.0, 50.0]) - vol.index_to_world(np.full(3, (n - 1) / 2)) + vol.origin
    w = voxel_centres(vol)
    lo, hi = np.array([10.0, -20.0, 40.0]), np.array([30.0, 0.0, 60.0])
    cube = np.all((w > lo) & (w < hi), axis=-1)
    vol.array[cube] = 1000
    seg = vol.with_array((cube * 300).astype(np.uint16))
    seg.array[0, 0, 0] = 7  # a second id, far from the box
    iso, size, m = np.array([20.0, -10.0, 50.0]), 40.0, 32
    ct_box, seg_box = resample_to_box(vol, seg, iso, size, m)
    assert seg_box.array.dtype == np.uint16 and set(np.unique(seg_box.array)) == {0, 300}
    wb = voxel_centres(ct_box)
    # distance of each box voxel centre from the cube's surface (negative inside)
    d = np.max(np.maximum(lo - wb, wb - hi), axis=-1)
    half_diag = 0.8 * np.sqrt(3) / 2  # nearest/trilinear read voxels within this of the point
    deep_in, far_out = d < -2 * half_diag, d > 2 * half_diag
    assert deep_in.sum() > 1000 and far_out.sum() > 10000
    assert (seg_box.array[deep_in] == 300).all() and (seg_box.array[far_out] == 0).all()
    assert (ct_box.array[deep_in] == 1000).all() and (ct_box.array[far_out] == -1000).all()
    # the labelled volume matches the cube's 8000 mm³ (twice sampled: CT grid, then box grid)
    vol_box = (seg_box.array == 300).sum() * (size / m) ** 3
    tol = np.hypot(sampling_tolerance(2400.0, size / m), sampling_tolerance(2400.0, 0.8))
    assert abs(vol_box - 8000.0) < tol


@pytest.fixture(scope="module")
def chest_box(chest_half_seg):
    ct, seg, names, iso = chest_half_seg
    ct_box, seg_box = resample_to_box(ct, seg, iso, 384.0, 128)
    return ct, seg, names, ct_box, seg_box


def test_labels_are_the_nearest_source_voxel(chest_box):
    ct, seg, names, ct_box, seg_box = chest_box
    src = seg.world_to_index(voxel_centres(seg_box))  # independent nearest-neighbour reference

    def lookup(r):
        ins = np.all((r >= 0) & (r < np.array(seg.shape_xyz)), axis=-1)
        out = np.zeros(seg_box.array.shape, seg.array.dtype)
        out[ins] = seg.array[r[ins][:, 2], r[ins][:, 1], r[ins][:, 0]]
        return out

    # exact halves (the grids are commensurate here) may round either way
    up, down = lookup(np.floor(src + 0.5).astype(int)), lookup(np.ceil(src - 0.5).astype(int))
    assert ((seg_box.array == up) | (seg_box.array == down)).all()
    assert (up != down).mean() < 1e-3
    assert seg_box.array.dtype == seg.array.dtype
    assert set(np.unique(seg_box.array)) - {0} <= set(names)  # ids kept, none invented
    # CT outside the scan is air; bone labels sit on bone
    assert ct_box.array.dtype == np.int16 and ct_box.array.min() >= AIR_HU
    assert np.median(ct_box.array[seg_box.array > 0]) > 150


def sampling_tolerance(area: float, h: float) -> float:
    """4σ error of a volume measured by counting grid points (spacing h) inside a shape of surface area A.

    Only the ~√3·A/h² cells straddling the surface can be miscounted, each by at most h³ with
    errors of either sign (the surface is not aligned with the grid): σ ≤ h³·√N/2.
    """
    return 4 * h**3 * np.sqrt(np.sqrt(3) * area / h**2) / 2


def face_areas(mask: np.ndarray, spacing_xyz) -> tuple[float, float]:
    """(area of the mask's surface inside the volume, area where it is cut by the volume's faces), mm²."""
    sp = np.asarray(spacing_xyz)[::-1]  # per array axis (k, j, i)
    inner = cut = 0.0
    for ax in range(3):
        face = np.prod([sp[i] for i in range(3) if i != ax])
        d = np.abs(np.diff(mask.astype(np.int8), axis=ax)).sum()
        ends = np.take(mask, 0, axis=ax).sum() + np.take(mask, -1, axis=ax).sum()
        inner += d * face
        cut += ends * face
    return inner, cut


def test_structure_volumes_are_preserved(chest_box):
    """Nearest-neighbour resampling counts the box-grid points inside each structure.

    Tolerance: ``sampling_tolerance`` (4σ of grid-point counting) for the surface inside the
    scan; a face cut flat by the CT's edge is grid-aligned, so its error does not average out:
    up to h/2 × its area is added.  (Tiny structures below the grid, like an 18-voxel sliver
    of C5, may vanish: allowed by the same bound.)
    """
    ct, seg, names, ct_box, seg_box = chest_box
    h = 384.0 / 128
    vs = float(np.prod(seg.spacing))
    checked = 0
    for k, name in names.items():
        m = seg.array == k
        v0 = m.sum() * vs
        v1 = (seg_box.array == k).sum() * h**3
        a_in, a_cut = face_areas(m, seg.spacing)
        tol = sampling_tolerance(a_in, h) + h / 2 * a_cut
        assert abs(v1 - v0) <= tol, (name, v0, v1, tol)
        if v0 > 20 * h**3:
            assert v1 > 0, name  # every structure larger than a few box voxels survives
            checked += 1
    assert checked >= 40
