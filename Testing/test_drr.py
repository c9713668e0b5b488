"""DRR renderer against analytic phantoms and independent formulas: exact Siddon on CPU (torch, the
reference, and the numba kernel, each against the analytic phantoms and numba against torch), the Triton kernel (interpreter on CPU, compiled for sm_90, and on CUDA when present), display
mapping, file round trip, and a real chest CT."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from x2recon.drr.display import to_display, to_uint16
from x2recon.drr.render import DRRImage, area_matrix, attenuation, read_drr, render_drr, write_drr
from x2recon.drr.siddon import line_integrals
from x2recon.errors import CancelledError, X2ReconInputError
from x2recon.geometry import ProjectionGeometry
from x2recon.io.volume import Volume

# --------------------------------------------------------------------------- analytic box phantom
SPACING = np.array([1.5, 2.0, 2.5])  # anisotropic on purpose
SHAPE_KJI = (40, 48, 56)
ORIGIN = -(np.array(SHAPE_KJI[::-1]) - 1) / 2 * SPACING  # grid centred on 0
# axis-aligned boxes as voxel index ranges (i, j, k; end exclusive) and their μ: the voxel volume
# is exactly the continuous phantom, so the exact line integral is Σ μ × chord.
BOXES = [((5, 30), (8, 40), (4, 20), 0.02), ((20, 50), (15, 30), (10, 36), 0.05), ((35, 45), (30, 44), (25, 38), 0.1)]


def rotation(axis, degrees) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * K + (1 - np.cos(t)) * K @ K


def box_phantom(direction=np.eye(3), origin=ORIGIN):
    vol = np.zeros(SHAPE_KJI, np.float32)
    for (i0, i1), (j0, j1), (k0, k1), mu in BOXES:
        vol[k0:k1, j0:j1, i0:i1] += mu
    aff = np.eye(4)
    aff[:3, :3] = direction @ np.diag(SPACING)
    aff[:3, 3] = origin
    return vol, aff


def chord(o, d, lo, hi, t_max):
    """Independent slab method: length of each ray o + t d, t ∈ [0, t_max], inside [lo, hi]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t0, t1 = (lo - o) / d, (hi - o) / d
    inside = (o > lo) & (o < hi)
    tmin = np.where(d == 0, np.where(inside, -np.inf, np.inf), np.minimum(t0, t1)).max(-1)
    tmax = np.where(d == 0, np.where(inside, np.inf, -np.inf), np.maximum(t0, t1)).min(-1)
    return np.clip(np.minimum(tmax, t_max) - np.maximum(tmin, 0), 0, None)


def analytic_boxes(geom: ProjectionGeometry, direction=np.eye(3), origin=ORIGIN) -> np.ndarray:
    """Σ μ × chord through each (possibly rotated) box, in the boxes' own frame."""
    o, d, L = geom.rays()
    o = (o.reshape(-1, 3) - origin) @ direction  # R^T (x - origin): the unrotated, scaled index frame
    d = d.reshape(-1, 3) @ direction
    total = np.zeros(len(o))
    for (i0, i1), (j0, j1), (k0, k1), mu in BOXES:
        lo = (np.array([i0, j0, k0]) - 0.5) * SPACING
        hi = (np.array([i1, j1, k1]) - 0.5) * SPACING
        total += mu * chord(o, d, lo, hi, L.reshape(-1))
    return total.reshape(geom.height, geom.width)


# offsets are generic so that no ray runs exactly inside a voxel face (ill-posed for both sides)
GEOMS = {
    "cone23": ProjectionGeometry.from_view(23.0, (3.1, -4.3, 5.7), sdd=500, sod=300, size=(64, 48), detector_mm=260),
    "coneLAT": ProjectionGeometry.from_view("LAT", (0.7, 1.3, -0.9), sdd=400, sod=250, size=(40, 40), detector_mm=250),
    "cone_tilted": ProjectionGeometry(
        source=(-180, -260, 90), detector_center=(60, 180, -40), u=(0.8, -0.6, 0.0),
        v=rotation((0.8, -0.6, 0.0), -25) @ np.array([0.0, 0.0, -1.0]), spacing=(3.0, 3.5), size=(45, 35)),
    "parallel": ProjectionGeometry.from_view(-61.0, (2.2, 1.1, -3.3), size=(50, 30), detector_mm=160, kind="parallel"),
}


def render(vol, aff, g, **kw) -> np.ndarray:
    return line_integrals(torch.from_numpy(vol), aff, g, **kw).numpy()


#: The CPU tracers: torch (the reference) and the compiled numba kernel (skipped where numba is missing).
CPU_BACKENDS = ["torch", pytest.param("numba", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("numba") is None, reason="numba is not installed"))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(GEOMS))
def test_box_phantom_matches_analytic_chords(name, backend):
    """Every pixel equals the analytic Σ μ × chord (brief: < 0.5 % of the maximum; exact up to float32)."""
    g = GEOMS[name]
    vol, aff = box_phantom()
    img, ref = render(vol, aff, g, backend=backend), analytic_boxes(g)
    assert ref.max() > 1.0 and (ref > 0).mean() > 0.2  # rays really cross the phantom
    err = np.abs(img - ref).max() / ref.max()
    assert err < 1e-4, err  # measured ~1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rays_that_start_or_end_inside_the_volume(backend):
    """Source inside the grid, and a detector inside the grid: the path is clipped to [0, length]."""
    vol, aff = box_phantom()
    inside_src = ProjectionGeometry(source=(4.1, -3.2, 6.3), detector_center=(30.3, 260.1, -12.2), u=(1, 0, 0),
                                    v=(0, 0.043, -0.999075), spacing=(4.0, 4.0), size=(40, 36))
    inside_det = ProjectionGeometry.from_view(37.0, (1.3, 2.9, -4.1), sdd=230, sod=200, size=(40, 30), detector_mm=120)
    for g in (inside_src, inside_det):
        ref = analytic_boxes(g)
        assert ref.max() > 0.5
        assert np.abs(render(vol, aff, g, backend=backend) - ref).max() < 1e-4 * ref.max()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_oblique_direction_volume(backend):
    """A rotated (and mirrored) direction matrix: equal to the axis-aligned volume seen by the equally
    moved set-up, and equal to the analytic chords of the rotated boxes."""
    R = rotation((1.0, 2.0, 3.0), 35.0) @ np.diag([1.0, -1.0, 1.0])
    shift = np.array([12.5, -7.25, 3.0])
    vol, aff = box_phantom()
    vol_r, aff_r = box_phantom(R, R @ ORIGIN + shift)
    g = GEOMS["cone23"]
    moved = lambda p: R @ p + shift
    g_r = ProjectionGeometry(moved(g.source), moved(g.detector_center), R @ g.u, R @ g.v, g.spacing, g.size)
    a, b = render(vol, aff, g, backend=backend), render(vol_r, aff_r, g_r, backend=backend)
    assert np.abs(a - b).max() < 1e-4 * a.max()
    ref = analytic_boxes(g_r, R, R @ ORIGIN + shift)
    assert np.abs(b - ref).max() < 1e-4 * ref.max()
    # and a geometry that is not aligned with anything
    g2 = GEOMS["cone_tilted"]
    ref2 = analytic_boxes(g2, R, R @ ORIGIN + shift)
    assert ref2.max() > 1.0 and np.abs(render(vol_r, aff_r, g2, backend=backend) - ref2).max() < 1e-4 * ref2.max()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sphere_with_partial_volume_voxels(backend):
    """A ball voxelised with supersampled partial volumes vs the analytic chord 2√(r²−d²).

    Tolerance, per ray and rigorous: voxels wholly inside the ball hold 1, wholly outside 0, so the
    voxel model differs from the ball only inside voxels cut by the sphere; their points lie within
    a voxel diagonal 2h of the sphere, and there both functions are in [0, 1].  Hence
    |DRR − μ·2√(r²−d²)| ≤ μ·[chord(r + 2h) − chord(r − 2h)] for every ray (measured: at most 27 %
    of it; mean error 0.8 % of the peak path, 11 % on grazing rays).  Overall, for a parallel beam,
    Σ pixels × pixel area = ∫ voxel model dV = μ·(4/3)πr³ up to the 5³ supersampling of the cut
    voxels and the pixel quadrature: 0.5 % (measured 0.07 %; a wrong segment-length scale fails it).
    """
    n, s, r, mu, c0 = 64, np.array([1.5, 2.0, 2.5]), 45.0, 0.02, np.array([3.3, -2.1, 4.4])
    shape = (n, n, n)
    origin = c0 - (n - 1) / 2 * s
    k, j, i = np.indices(shape)
    pts = origin + np.stack([i, j, k], -1) * s - c0
    rho = np.linalg.norm(pts, axis=-1)
    h = 0.5 * np.linalg.norm(s)
    frac = (rho <= r - h).astype(np.float32)
    cut = np.abs(rho - r) < h
    sub = (np.arange(5) + 0.5) / 5 - 0.5
    offs = np.stack(np.meshgrid(sub, sub, sub, indexing="ij"), -1).reshape(-1, 3) * s
    frac[cut] = (np.linalg.norm(pts[cut][:, None, :] + offs[None], axis=-1) <= r).mean(1)
    aff = np.eye(4)
    aff[:3, :3] = np.diag(s)
    aff[:3, 3] = origin
    vol = torch.from_numpy(frac * mu)

    def dist_from_centre(g):
        o, d, _ = g.rays()
        return np.linalg.norm(np.cross(c0 - o, d), axis=-1)

    ch = lambda rr, dd: 2 * np.sqrt(np.clip(rr * rr - dd * dd, 0, None))
    g = ProjectionGeometry.from_view(17.0, c0 + [0.4, -0.3, 0.2], sdd=600, sod=400, size=(72, 72), detector_mm=220)
    img = line_integrals(vol, aff, g, backend=backend).numpy()
    dist = dist_from_centre(g)
    ref = mu * ch(r, dist)
    bound = mu * (ch(r + 2 * h, dist) - ch(r - 2 * h, dist))
    assert (dist < r).sum() > 1500
    assert np.all(np.abs(img - ref) <= bound + 1e-6)

    gp = ProjectionGeometry.from_view(17.0, c0, size=(80, 80), detector_mm=120, kind="parallel")
    imgp = line_integrals(vol, aff, gp, backend=backend).numpy()
    mass = imgp.sum() * gp.spacing[0] * gp.spacing[1]
    assert mass == pytest.approx(mu * 4 / 3 * np.pi * r**3, rel=5e-3)
    refp = mu * ch(r, dist_from_centre(gp))
    dp = dist_from_centre(gp)
    assert np.all(np.abs(imgp - refp) <= mu * (ch(r + 2 * h, dp) - ch(r - 2 * h, dp)) + 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bright_blob_appears_at_its_projection(backend):
    """A 3×3×3 bright blob around a known world point (oblique volume) peaks at geometry.project(point)."""
    R = rotation((0.3, -1.0, 0.5), 20.0)
    spacing = np.array([1.2, 1.2, 2.0])
    vol = np.zeros((50, 60, 60), np.float32)
    ijk = np.array([37, 21, 26])
    vol[ijk[2] - 1:ijk[2] + 2, ijk[1] - 1:ijk[1] + 2, ijk[0] - 1:ijk[0] + 2] = 50.0
    ct = Volume(vol, spacing, (-30.0, 20.0, -45.0), R)
    point = ct.index_to_world(ijk)
    g = ProjectionGeometry.from_view(40.0, ct.index_to_world([30, 30, 25]), sdd=700, sod=450, size=(160, 160),
                                     detector_mm=160)
    img = line_integrals(torch.from_numpy(vol), ct.affine, g, backend=backend).numpy()
    col, row = g.project(point)
    r, c = np.unravel_index(np.argmax(img), img.shape)
    assert abs(c - col) <= 1 and abs(r - row) <= 1
    w = np.clip(img - 0.02 * img.max(), 0, None)
    rows, cols = np.indices(img.shape)
    assert abs((w * cols).sum() / w.sum() - col) < 0.25 and abs((w * rows).sum() / w.sum() - row) < 0.25


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_progress_cancel_and_input_checks(backend):
    vol, aff = box_phantom()
    seen = []
    g = GEOMS["cone23"]
    line_integrals(torch.from_numpy(vol), aff, g, chunk=512, progress=lambda f, m: seen.append(f), backend=backend)
    assert seen and seen[-1] == pytest.approx(1.0) and all(np.diff(seen) >= 0)
    with pytest.raises(CancelledError):
        line_integrals(torch.from_numpy(vol), aff, g, chunk=256, cancel=lambda: True, backend=backend)
    with pytest.raises(ValueError, match="'numba'"):
        line_integrals(torch.from_numpy(vol), aff, g, backend="cuda")
    with pytest.raises(ValueError, match="3D"):
        line_integrals(torch.zeros(4, 4), aff, g)
    with pytest.raises(ValueError, match="singular"):
        line_integrals(torch.from_numpy(vol), np.diag([1.0, 0.0, 1.0, 1.0]), g)
    if "TRITON_INTERPRET" not in os.environ:
        with pytest.raises(RuntimeError, match="CUDA"):
            line_integrals(torch.from_numpy(vol), aff, g, backend="triton")


# --------------------------------------------------------------------------- numba kernel vs the torch path
@pytest.mark.skipif(__import__("importlib").util.find_spec("numba") is None, reason="numba is not installed")
def test_numba_kernel_sums_equal_the_torch_path_on_a_real_ct(chest_half):
    """The compiled kernel gives the torch reference's sums to 1e-6 relative on the chest CT, every pixel
    (float32 rounding of the same operations), for a cone and a parallel beam, with the int32 and
    int64 index paths of the reference; and the CPU default ("auto") is the numba kernel."""
    from x2recon.drr import siddon
    from x2recon.drr.attenuation import hu_to_mu
    from x2recon.io.volume import read_ct

    ct = read_ct(chest_half[0])
    mu = hu_to_mu(torch.from_numpy(ct.array).float())
    centre = ct.corners_world().mean(0)
    for g in (ProjectionGeometry.from_view(20.0, centre + [1.3, -2.1, 0.7], size=(96, 80)),
              ProjectionGeometry.from_view("LAT", centre, size=(64, 64), kind="parallel")):
        ref = line_integrals(mu, ct.affine, g, backend="torch").numpy()
        fast = line_integrals(mu, ct.affine, g, backend="numba").numpy()
        assert ref.max() > 1.0 and (ref > 0).mean() > 0.3
        np.testing.assert_allclose(fast, ref, rtol=1e-6, atol=1e-6 * ref.max())
        assert siddon.auto_backend(mu) == "numba"
        rays = siddon.rays_in_grid(ct.affine, tuple(mu.shape), g)
        n = min(4096, len(rays.pixel))  # the reference's int64 index path on some of them
        st = [torch.from_numpy(a) for a in siddon.chunk_arrays(rays, slice(0, n), tuple(mu.shape), index64=True)]
        out = torch.zeros(n)
        siddon._trace_chunk(siddon.padded_flat(mu), st, out, slice(0, n), __import__("threading").Event())
        np.testing.assert_allclose(fast.reshape(-1)[rays.pixel[:n]], out.numpy(), rtol=1e-6, atol=1e-6 * ref.max())


def test_cpu_default_says_when_numba_is_missing(monkeypatch, caplog):
    """Without numba, "auto" on CPU is the torch tracer and says so in one log line, once per process."""
    from x2recon.drr import siddon

    monkeypatch.setattr(siddon, "numba_available", lambda: False)
    monkeypatch.setattr(siddon, "_WARNED_NO_NUMBA", False)
    vol, aff = box_phantom()
    with caplog.at_level("WARNING", logger="x2recon.drr.siddon"):
        a = render(vol, aff, GEOMS["coneLAT"])
        render(vol, aff, GEOMS["coneLAT"])
    said = [r.getMessage() for r in caplog.records if "numba" in r.getMessage()]
    assert said == ["DRR: numba is not installed, so CPU DRRs use the slower torch tracer (pip install numba)"]
    np.testing.assert_array_equal(a, render(vol, aff, GEOMS["coneLAT"], backend="torch"))


# --------------------------------------------------------------------------- Triton kernel
def test_pixel_ray_model_reproduces_geometry_rays():
    pytest.importorskip("triton")
    from x2recon.drr.siddon_triton import pixel_ray_model

    for g in GEOMS.values():
        O, T = pixel_ray_model(g)
        o, d, L = g.rays()
        rows, cols = np.indices((g.height, g.width))
        basis = np.stack([np.ones_like(cols), cols, rows], -1).astype(float)
        np.testing.assert_allclose(basis @ O.T, o, atol=1e-9)
        np.testing.assert_allclose(basis @ T.T, o + d * L[..., None], atol=1e-9)


TRITON_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    sys.path.insert(0, {testdir!r})
    import test_drr as T
    from x2recon.drr.siddon import line_integrals
    R = T.rotation((1.0, 2.0, 3.0), 35.0) @ np.diag([1.0, -1.0, 1.0])
    cases = [(T.box_phantom(), g.resized(22, 14)) for g in T.GEOMS.values()]
    cases.append((T.box_phantom(R, R @ T.ORIGIN), T.GEOMS["cone23"].resized(20, 12)))
    for (vol, aff), g in cases:
        v = torch.from_numpy(vol)
        a = line_integrals(v, aff, g, backend="torch").numpy()
        b = line_integrals(v, aff, g, backend="triton").numpy()
        print(float(np.abs(a - b).max() / a.max()), float(a.max()))
    """
)


@pytest.mark.slow
def test_triton_kernel_equals_torch_path_in_the_interpreter():
    """triton 3.8 reads TRITON_INTERPRET when a kernel is decorated (module import): use a fresh process."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT.format(testdir=os.path.dirname(__file__))],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [[float(x) for x in line.split()] for line in r.stdout.split("\n") if line.strip()]
    assert len(rows) == len(GEOMS) + 1
    for rel, peak in rows:
        assert peak > 0.5 and rel < 1e-4, rows


def test_triton_kernel_compiles_for_h100():
    """The CUDA kernel lowers to a cubin for sm_90 (ptxas ships with triton); no GPU needed."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from x2recon.drr import siddon_triton as st

    sig = {"vol_ptr": "*fp32", "prm_ptr": "*fp64", "out_ptr": "*fp32", "W": "i32", "H": "i32", "NI": "i32",
           "NJ": "i32", "NK": "i32", "TILE_H": "constexpr", "TILE_W": "constexpr", "INDEX64": "constexpr"}
    for index64 in (False, True):
        src = triton.compiler.ASTSource(fn=st._siddon_kernel, signature=sig,
                                        constexprs={"TILE_H": st.TILE_H, "TILE_W": st.TILE_W, "INDEX64": index64})
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": st.NUM_WARPS})
        except (FileNotFoundError, PermissionError) as e:  # no ptxas in this triton build
            pytest.skip(f"cannot run ptxas: {e}")
        assert len(k.asm["cubin"]) > 1000
        assert re.search(r"@%p\d+ ld\.global\.b32", k.asm["ptx"])  # the masked voxel gather


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_matches_analytic_and_cpu(chest_half):
    from x2recon.drr.attenuation import hu_to_mu
    from x2recon.io.volume import read_ct

    vol, aff = box_phantom()
    for g in GEOMS.values():
        gpu = line_integrals(torch.from_numpy(vol).cuda(), aff, g).cpu().numpy()
        ref = analytic_boxes(g)
        assert np.abs(gpu - ref).max() < 1e-4 * ref.max()
    ct = read_ct(chest_half[0])
    mu = hu_to_mu(torch.from_numpy(ct.array).float())
    g = ProjectionGeometry.from_view("LAT", ct.corners_world().mean(0), size=(256, 256))
    cpu = line_integrals(mu, ct.affine, g).numpy()
    gpu = line_integrals(mu.cuda(), ct.affine, g).cpu().numpy()
    assert np.abs(gpu - cpu).max() < 1e-4 * cpu.max()


# --------------------------------------------------------------------------- attenuation, display, files
def test_hu_to_mu_follows_the_hounsfield_definition():
    from x2recon.drr.attenuation import MU_AIR, MU_WATER, hu_to_mu, mu_to_hu

    hu = np.array([-3024, -1000, 0, 1000, 3000], np.int16)
    mu = hu_to_mu(hu)
    assert mu.dtype == np.float32 and mu[0] == 0  # below air: clipped
    np.testing.assert_allclose(mu[1:3], [MU_AIR, MU_WATER], rtol=1e-6, atol=1e-8)  # float32
    # HU = 1000 (μ − μ_w)/(μ_w − μ_a), inverted exactly above the clipping point
    np.testing.assert_allclose(1000 * (mu[1:] - MU_WATER) / (MU_WATER - MU_AIR), hu[1:], atol=1e-2)
    np.testing.assert_allclose(mu_to_hu(mu[1:].astype(np.float64)), hu[1:], atol=1e-2)
    np.testing.assert_allclose(hu_to_mu(torch.from_numpy(hu)).numpy(), mu, rtol=1e-6)
    assert hu_to_mu(0.0, mu_water=0.02) == pytest.approx(0.02)
    with pytest.raises(ValueError):
        hu_to_mu(hu, mu_water=0.01, mu_air=0.02)


def test_display_mapping_is_monotone_then_clahe_uint16():
    rng = np.random.default_rng(0)
    li = np.cumsum(rng.uniform(0, 1, (48, 64)), axis=1).astype(np.float32)
    li[0, 0] = 1e4  # one extreme pixel must not set the scale (robust maximum)
    plain, m = to_display(li, clahe=False)
    order = np.argsort(li, axis=None)
    assert np.all(np.diff(plain.ravel()[order]) >= 0)  # monotone
    assert m["reference"] < 100 and m["clahe"] is False
    assert np.allclose(plain[1:], np.clip(li[1:] / m["reference"], 0, 1))  # the recorded map is the map
    eq, m2 = to_display(li, clahe=True, clahe_clip=0.02)
    assert m2["clahe_clip"] == 0.02 and m2["clahe_kernel"] == 6 and 0 <= eq.min() and eq.max() <= 1
    assert not np.allclose(eq, plain)
    u = to_uint16(eq)
    assert u.dtype == np.uint16 and u.max() == 65535
    assert to_uint16(np.array([[0.0, 0.5, 1.0, 2.0]])).tolist() == [[0, 32768, 65535, 65535]]


def test_area_resampling_and_file_round_trip(tmp_path):
    np.testing.assert_allclose(area_matrix(512, 224).sum(1), 1.0)
    np.testing.assert_allclose(area_matrix(6, 3), np.kron(np.eye(3), [[0.5, 0.5]]))
    g = ProjectionGeometry.from_view("AP", (0, 0, 0), size=(70, 50))
    rng = np.random.default_rng(3)
    li = rng.uniform(0, 5, (50, 70)).astype(np.float32)
    img = DRRImage(li, to_uint16(li / 5), g, {"reference": 5.0})
    small = img.resized((35, 20))
    assert small.display.shape == (20, 35) and small.geometry.size == (35, 20)
    assert small.geometry.spacing[0] * 35 == pytest.approx(g.spacing[0] * 70)
    # area resampling keeps the integral over the detector
    assert small.line_integral.sum() * np.prod(small.geometry.spacing) == pytest.approx(
        li.sum() * np.prod(g.spacing), rel=1e-5)
    half = img.resized((35, 25))  # integer factors: exactly the 2×2 block means
    np.testing.assert_allclose(half.line_integral, li.reshape(25, 2, 35, 2).mean((1, 3)), rtol=1e-5)
    files = write_drr(img, tmp_path, "AP")
    assert [f.name for f in files] == ["AP.png", "AP.json", "AP_mu.npy"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    back = read_drr(tmp_path, "AP")
    assert back.display.dtype == np.uint16 and np.array_equal(back.display, img.display)
    assert back.geometry == g and np.array_equal(back.line_integral, li)
    assert json.loads((tmp_path / "AP.json").read_text())["size"] == [70, 50]
    # clear errors for broken files
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    (tmp_path / "bad.json").write_text(g.to_json())
    with pytest.raises(X2ReconInputError, match="not a PNG"):
        read_drr(tmp_path, "bad")
    with pytest.raises(X2ReconInputError, match="not found"):
        read_drr(tmp_path, "missing")
    write_drr(img.resized(35), tmp_path, "wrong")
    (tmp_path / "wrong.json").write_text(g.to_json())
    with pytest.raises(X2ReconInputError, match="35×35"):
        read_drr(tmp_path, "wrong")


# --------------------------------------------------------------------------- real CT
def test_real_ct_radiograph_spine_brighter_than_lungs(chest_half, tmp_path):
    """On the chest CT, pixels where the thoracic spine projects are brighter than where the lungs do
    (regions from the label map, projected with the same geometry)."""
    from x2recon.io.volume import read_ct, read_labelmap

    ct = read_ct(chest_half[0])
    lab = read_labelmap(chest_half[1])
    g = ProjectionGeometry.from_view("PA", ct.corners_world().mean(0), size=(128, 128))
    img = render_drr(ct, g, device="cpu")
    assert img.line_integral.dtype == np.float32 and img.display.dtype == np.uint16
    assert img.mapping["clahe"] and img.mapping["reference"] > 0 and img.mapping["device"] == "cpu"

    def footprint(ids):
        kji = np.argwhere(np.isin(lab.array, ids))
        cr = np.round(g.project(lab.index_to_world(kji[:, ::-1]))).astype(int)
        mask = np.zeros((g.height, g.width), bool)
        ok = (cr[:, 0] >= 0) & (cr[:, 0] < g.width) & (cr[:, 1] >= 0) & (cr[:, 1] < g.height)
        mask[cr[ok, 1], cr[ok, 0]] = True
        return mask

    spine = footprint(list(range(32, 44)))  # T12 … T1
    lungs = footprint([10, 11, 12, 13, 14]) & ~spine
    assert spine.sum() > 100 and lungs.sum() > 1000
    li, disp = img.line_integral, img.display.astype(float)
    assert np.median(li[spine]) > 1.5 * np.median(li[lungs])
    assert np.median(disp[spine]) > np.median(disp[lungs]) + 10000  # also after CLAHE
    # the thoracic spine footprint is a vertical band in the middle of a PA image
    cols = np.nonzero(spine.any(0))[0]
    assert abs(cols.mean() - g.principal_point[0]) < 0.15 * g.width
    small = img.resized(32)
    assert small.display.shape == (32, 32) and small.mapping["resized_from"] == [128, 128]
    write_drr(small, tmp_path, "PA_32")
    assert read_drr(tmp_path, "PA_32").geometry == g.resized(32)


def test_attenuation_shared_by_views_gives_the_same_drrs():
    """μ computed once (``attenuation``) and reused for several views renders what a fresh render does;
    one computed for another CT or other references is refused."""
    rng = np.random.default_rng(3)
    ct = Volume(rng.integers(-1100, 1500, (12, 10, 8)).astype(np.int16), (4.0, 3.0, 2.5), (-14.0, -18.0, -22.0),
                rotation([1, 2, 3], 20))
    att = attenuation(ct, "cpu")
    for view in ("AP", "LAT", 30.0):
        g = ProjectionGeometry.from_view(view, (0.0, 0.0, 0.0), size=(24, 20))
        a, b = render_drr(ct, g, device="cpu"), render_drr(ct, g, device="cpu", attenuation=att)
        np.testing.assert_array_equal(a.line_integral, b.line_integral)
        assert (a.display == b.display).all() and a.line_integral.max() > 0
    other = Volume(np.zeros((12, 10, 9), np.int16), (4.0, 3.0, 2.5), (-14.0, -18.0, -22.0), np.eye(3))
    with pytest.raises(ValueError, match="attenuation was computed"):
        render_drr(other, g, device="cpu", attenuation=att)
    with pytest.raises(ValueError, match="mu_water"):
        render_drr(ct, g, device="cpu", attenuation=att, mu_water=0.02)


# --------------------------------------------------------------------------- metadata names the path taken
RENDERER_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from x2recon.drr.render import render_drr
    from x2recon.geometry import ProjectionGeometry
    from x2recon.io.volume import Volume
    ct = Volume(np.full((12, 10, 8), 300, np.int16), (4.0, 4.0, 4.0), (-14.0, -18.0, -22.0), np.eye(3))
    g = ProjectionGeometry.from_view("AP", (0.0, 0.0, 0.0), size=(16, 16))
    a = render_drr(ct, g, device="cpu", backend="torch")
    b = render_drr(ct, g, device="cpu", backend="triton")
    print(a.mapping["renderer"], b.mapping["renderer"], float(np.abs(a.line_integral - b.line_integral).max()))
    """
)


def test_drr_metadata_names_the_renderer_that_ran(monkeypatch):
    """``renderer`` is the path that traced the rays: numba on CPU under 'auto' (torch where numba is
    missing), torch when asked, Triton when it ran (interpreter on CPU here), and torch on CUDA when
    triton does not import (was: 'triton' by device)."""
    from x2recon.drr import siddon

    ct = Volume(np.full((12, 10, 8), 300, np.int16), (4.0, 4.0, 4.0), (-14.0, -18.0, -22.0), np.eye(3))
    g = ProjectionGeometry.from_view("AP", (0.0, 0.0, 0.0), size=(16, 16))
    auto = "numba" if siddon.numba_available() else "torch"
    assert render_drr(ct, g, device="cpu").mapping["renderer"] == f"siddon-exact/{auto}"
    assert render_drr(ct, g, device="cpu", backend="torch").mapping["renderer"] == "siddon-exact/torch"
    if torch.cuda.is_available():
        from x2recon.drr import siddon

        monkeypatch.setattr(siddon, "triton_available", lambda: False)
        assert render_drr(ct, g, device="cuda").mapping["renderer"] == "siddon-exact/torch"
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-c", RENDERER_SCRIPT], capture_output=True, text=True,
                       env=dict(os.environ, TRITON_INTERPRET="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    torch_name, triton_name, diff = r.stdout.split()
    assert (torch_name, triton_name) == ("siddon-exact/torch", "siddon-exact/triton") and float(diff) < 1e-3
