"""Radiograph-like variation of training DRRs (drr/realism.py): seeded, recorded, each effect as expected."""

import json
from dataclasses import replace

import numpy as np
import pytest

from x2recon.drr.realism import (GLYPHS, RealismParams, apply_realism, detected_intensity, perturb_geometry,
                                 realistic_drr, sample_params)
from x2recon.geometry import ProjectionGeometry

CLEAN = RealismParams()  # no variation at all


def phantom(n=128, seed=0):
    """Line integrals: a body (ellipse, ~2) with bright 'bones' and fine texture, air around."""
    rows, cols = np.mgrid[:n, :n] / n - 0.5
    body = ((rows / 0.45) ** 2 + (cols / 0.35) ** 2 < 1) * 2.0
    bones = ((np.abs(cols) < 0.04) & (np.abs(rows) < 0.4)) * 1.5 + ((np.abs(rows % 0.1 - 0.05) < 0.01) & (body > 0)) * 0.8
    tex = np.random.default_rng(seed).random((n, n)) * 0.2 * (body > 0)
    return (body + bones + tex).astype(np.float32)


def hf_energy(img):
    f = np.fft.fftshift(np.abs(np.fft.fft2(img - img.mean())) ** 2)
    n = img.shape[0]
    r = np.hypot(*np.mgrid[-n // 2:n // 2, -n // 2:n // 2])
    return f[r > n / 4].sum()


def test_seeded_parameters_and_images_are_identical_and_seeds_differ():
    a, b = sample_params(7, (128, 128)), sample_params(7, (128, 128))
    assert a == b
    assert sample_params(8, (128, 128)) != a
    li = phantom()
    assert np.array_equal(apply_realism(li, a), apply_realism(li, b))
    assert not np.array_equal(apply_realism(li, a), apply_realism(li, sample_params(8, (128, 128))))


def test_recorded_parameters_reproduce_the_image():
    """The metadata (JSON) alone rebuilds the image bit for bit, through realistic_drr's mapping too."""
    from x2recon.drr.render import DRRImage

    p = replace(sample_params(3, (128, 128)), marker="R", marker_px=3, dose=500.0)
    li = phantom()
    g = ProjectionGeometry.from_view("AP", (0, 0, 0), size=(128, 128))
    out = realistic_drr(DRRImage(li, np.zeros((128, 128), np.uint16), g, {}), p)
    recorded = json.loads(json.dumps(out.mapping))["realism"]
    again = realistic_drr(DRRImage(li, np.zeros((128, 128), np.uint16), g, {}), RealismParams.from_dict(recorded))
    assert RealismParams.from_dict(recorded) == p
    assert np.array_equal(out.display, again.display)
    assert out.mapping["kind"] == "radiograph-like"


def test_quantum_noise_variance_scales_inversely_with_dose():
    li = np.full((256, 256), 1.0, np.float32)  # flat: T = e^-1 everywhere
    var = {}
    for dose in (1000.0, 4000.0):
        _, I = detected_intensity(li, replace(CLEAN, dose=dose, noise_seed=1))
        var[dose] = I.var()
        assert abs(I.mean() - np.exp(-1)) < 0.01
    assert var[1000.0] / var[4000.0] == pytest.approx(4.0, rel=0.1)  # Poisson: var = T / dose
    assert var[4000.0] == pytest.approx(np.exp(-1) / 4000.0, rel=0.1)
    _, I0 = detected_intensity(li, CLEAN)
    assert I0.var() < 1e-12  # dose 0: noise-free


def test_detector_blur_lowers_high_frequency_energy():
    li = phantom()
    noisy = replace(CLEAN, dose=2000.0, noise_seed=4)
    sharp, blurred = (apply_realism(li, replace(noisy, blur_px=b)) for b in (0.0, 1.5))
    assert hf_energy(blurred) < 0.3 * hf_energy(sharp)


def test_scatter_haze_lowers_contrast_and_adds_low_frequency_signal():
    li = phantom()
    _, clean = detected_intensity(li, CLEAN)
    _, hazy = detected_intensity(li, replace(CLEAN, spr=0.5, scatter_sigma=0.15))
    body, air = li > 2.5, li == 0
    contrast = lambda I: (I[air].mean() - I[body].mean()) / I[air].mean()
    assert contrast(hazy) < 0.92 * contrast(clean)
    assert (hazy - clean)[body].min() > 0  # haze adds signal everywhere under the body


def test_attenuation_scale_window_and_gamma():
    li = phantom()
    T1, _ = detected_intensity(li, CLEAN)
    T2, _ = detected_intensity(li, replace(CLEAN, k=1.3))
    assert np.allclose(T2, T1**1.3, rtol=1e-5)
    base = apply_realism(li, CLEAN)
    assert apply_realism(li, replace(CLEAN, gamma=1.5)).mean() < base.mean() - 0.03  # midtones darker
    narrow = apply_realism(li, replace(CLEAN, window=(20.0, 80.0)))
    assert (narrow == 0).mean() > 0.15 and (narrow == 1).mean() > 0.15  # clipped at both ends
    lin = apply_realism(li, replace(CLEAN, log_mix=1.0))
    assert not np.allclose(lin, base, atol=0.02)


def test_collimation_edges_and_burnt_in_marker():
    li = phantom()
    p = replace(CLEAN, collimation=(0.1, 0.0, 0.05, 0.0), marker="L", marker_at=(0.5, 0.5), marker_px=4)
    img = apply_realism(li, p)
    assert (img[:13] == 1).all() and (img[:, :6] == 1).all()  # top 10 %, left 5 % unexposed (bright)
    assert not (apply_realism(li, CLEAN)[:13] == 1).all()
    glyph = img[64:64 + 20, 64:64 + 12]
    want = np.kron(np.array([[c == "X" for c in r] for r in GLYPHS["L"]]), np.ones((4, 4), bool))
    assert (glyph[want] == 1).all()
    assert (apply_realism(li, replace(p, marker=""))[64:84, 64:76][want] < 1).any()


def test_patient_position_moves_the_camera_so_labels_stay_exact():
    """A bead rendered in the perturbed geometry peaks at that geometry's projection of it; the box stays."""
    import torch

    from x2recon.drr.siddon import line_integrals
    from x2recon.io.volume import Volume

    vol = np.zeros((40, 40, 40), np.float32)
    vol[25:28, 13:16, 9:12] = 50.0  # bead around index (10, 14, 26)
    ct = Volume(vol, (2.0, 2.0, 2.0), (-40.0, -40.0, -40.0), np.eye(3))
    bead = ct.index_to_world([10, 14, 26])
    g = ProjectionGeometry.from_view("AP", (0, 0, 0), sdd=700, sod=450, size=(96, 96), detector_mm=200, box_size=80)
    p = replace(CLEAN, shift_mm=(12.0, -7.0), magnification=1.08, rotation_deg=4.0)
    g2 = perturb_geometry(g, p)
    assert np.allclose(g2.isocenter, g.isocenter) and g2.box_size == g.box_size
    c0, c2 = np.asarray(g.project(bead)), np.asarray(g2.project(bead))
    assert np.linalg.norm(c2 - c0) > 5  # the bead moved in the image
    for geom, want in ((g, c0), (g2, c2)):
        img = line_integrals(torch.from_numpy(vol), ct.affine, geom).numpy()
        w = np.clip(img - 0.02 * img.max(), 0, None)
        rows, cols = np.indices(img.shape)
        got = np.array([(w * cols).sum(), (w * rows).sum()]) / w.sum()
        assert np.linalg.norm(got - want) < 0.3, (got, want)
    # without a shift, the image rotates about the principal point and scales by the magnification
    g3 = perturb_geometry(g, replace(p, shift_mm=(0.0, 0.0)))
    off = np.asarray(g.project(bead)) - np.asarray(g.project(g.isocenter))
    off2 = np.asarray(g3.project(bead)) - np.asarray(g3.project(g.isocenter))
    assert np.linalg.norm(off2) == pytest.approx(1.08 * np.linalg.norm(off), rel=1e-6)
    ang = np.degrees(np.arctan2(off2[1], off2[0]) - np.arctan2(off[1], off[0]))
    assert abs(abs(ang) - 4.0) < 1e-6


def test_sampled_ranges_are_sensible():
    ps = [sample_params(s, (512, 512)) for s in range(200)]
    assert all(300 <= p.dose <= 20000 and 0.9 <= p.magnification <= 1.1 and abs(p.rotation_deg) <= 4 for p in ps)
    assert 0.3 < np.mean([p.marker != "" for p in ps]) < 0.7
    assert len({p.noise_seed for p in ps}) == 200


@pytest.mark.slow
def test_a_dataset_build_records_and_reproduces_each_views_variation(tmp_path):
    """build-dataset with xray_realism: each view's parameters are in meta.json, its geometry JSON is the moved
    camera, and render + apply from the record gives the stored image exactly; off: clean DRRs, no record."""
    from test_skeleton import phantom

    from x2recon.dataset.case import build_case
    from x2recon.dataset.config import BuildConfig
    from x2recon.dataset.skeleton import clear_outside_body
    from x2recon.drr.render import read_drr, render_drr

    ct, _ = phantom()
    from x2recon.io.volume import Volume

    ct = Volume(np.concatenate([ct.array, ct.array[:20]]), ct.spacing, ct.origin, ct.direction)  # 120 mm long
    kw = dict(structures="skeleton", views=["AP", "LAT"], drr_size=64, x2b_size=32, n_points=500, spider_grid=16,
              device="cpu")
    res = build_case(ct, tmp_path / "on", config=BuildConfig(xray_realism=True, **kw), case_id="c")
    assert res.status == "done", res.reason
    cfg = BuildConfig(xray_realism=True, **kw)
    for view in ("AP", "LAT"):
        rec = res.meta["drr_mapping"][view]["realism"]
        p = RealismParams.from_dict(rec)
        want_geom = perturb_geometry(cfg.geometry(view, np.array(res.meta["isocenter"])), p)
        stored = read_drr(res.case_dir / "images", view)
        assert stored.geometry == want_geom
        again = realistic_drr(render_drr(clear_outside_body(ct)[0], want_geom, device="cpu"), p)  # the table: air
        assert np.array_equal(again.display, stored.display)
    assert res.meta["drr_mapping"]["AP"]["realism"] != res.meta["drr_mapping"]["LAT"]["realism"]
    off = build_case(ct, tmp_path / "off", config=BuildConfig(**kw), case_id="c")
    assert "realism" not in off.meta["drr_mapping"]["AP"]
    assert read_drr(off.case_dir / "images", "AP").geometry == BuildConfig(**kw).geometry("AP", np.array(off.meta["isocenter"]))
