"""What lies outside the body (a radiotherapy couch, blankets, tubes) is air in what a dataset renders and meshes
(``build-dataset``'s default; ``--keep-outside-body`` keeps it), and old records read as kept."""

import json

import numpy as np
import pytest

from x2recon.dataset.case import build_case
from x2recon.dataset.config import BuildConfig
from x2recon.drr.render import read_drr, render_drr
from x2recon.io.volume import Volume, read_labelmap

SP = 2.0  # mm, isotropic
AIR = -1024


def phantom():
    """A body cylinder (soft tissue, two lungs, a spine rod) and a separate couch slab 16 mm behind the back,
    on air of -1024 HU, 120 mm long: ``(CT, CT without the slab, slab mask)``."""
    Z, H, W = 60, 100, 100
    y, x = (np.mgrid[:H, :W] - np.array([H, W])[:, None, None] / 2 + 0.5) * SP
    body = (x / 70) ** 2 + (y / 50) ** 2 <= 1
    lungs = (((x + 32) / 22) ** 2 + ((y + 4) / 28) ** 2 <= 1) | (((x - 32) / 22) ** 2 + ((y + 4) / 28) ** 2 <= 1)
    spine = x**2 + (y - 32) ** 2 <= 12**2  # a cortex (700 HU) round fatty marrow
    marrow = x**2 + (y - 32) ** 2 <= 9**2
    slab = (np.abs(x) <= 85) & (y >= 66) & (y <= 78)  # LPS: +y is posterior, the couch under a supine patient
    a = np.full((H, W), float(AIR))
    a[body] = 40
    a[lungs] = -850
    a[spine] = 700
    a[marrow] = -40
    clean = np.repeat(a[None], Z, 0).astype(np.int16)
    a[slab] = 600
    ct = np.repeat(a[None], Z, 0).astype(np.int16)
    vol = lambda arr: Volume(arr, (SP, SP, SP), (0.0, 0.0, 0.0), np.eye(3))
    return vol(ct), vol(clean), np.repeat(slab[None], Z, 0)


KW = dict(structures="skeleton", views=["AP", "LAT"], isocenter="ct", drr_size=64, x2b_size=32, n_points=500,
          spider_grid=64, device="cpu")


def test_clear_outside_body_makes_the_slab_air_and_keeps_the_body():
    from x2recon.dataset.skeleton import clear_outside_body

    ct, clean, slab = phantom()
    out, body, rec = clear_outside_body(ct)
    assert (out.array[slab] == AIR).all()
    assert np.array_equal(out.array, clean.array)  # every body voxel (lungs too) as it was
    assert not body[slab].any() and body[clean.array > -900].all()
    assert rec["cleared_dense_ml"] == pytest.approx(slab.sum() * SP**3 / 1000, abs=0.05)
    assert ct.array[slab].min() == 600  # the input is not changed


def test_the_dataset_drr_is_the_drr_without_the_couch(tmp_path):
    """Default build: each view's line integrals equal the couch-free phantom's (float tolerance), the SPIDER
    target CT has no couch; --keep-outside-body: the couch is in the DRR (this test fails on code that kept it)."""
    ct, clean, slab = phantom()
    res = build_case(ct, tmp_path / "a", config=BuildConfig(**KW), case_id="c")
    assert res.status == "done", res.reason
    assert res.meta["config"]["keep_outside_body"] is False
    assert res.meta["outside_body"]["kept"] is False and res.meta["outside_body"]["cleared_dense_ml"] > 100
    for view in ("AP", "LAT"):
        stored = read_drr(res.case_dir / "images", view)
        want = render_drr(clean, stored.geometry, device="cpu")
        np.testing.assert_allclose(stored.line_integral, want.line_integral, rtol=1e-5, atol=1e-5)
    from x2recon.io.volume import read_ct

    from x2recon.dataset.spider_targets import resample_to_box

    seg = read_labelmap(res.case_dir / "segmentation.nii.gz")
    want_box, _ = resample_to_box(clean, seg, np.array(res.meta["isocenter"]), res.meta["box_size"], 64)
    assert np.array_equal(read_ct(res.case_dir / "spider" / "ct.nii.gz").array, want_box.array)
    kept = build_case(ct, tmp_path / "b", config=BuildConfig(keep_outside_body=True, **KW), case_id="c")
    assert kept.status == "done", kept.reason
    assert kept.meta["outside_body"] == {"kept": True}
    lat_kept = read_drr(kept.case_dir / "images", "LAT").line_integral
    lat = read_drr(res.case_dir / "images", "LAT").line_integral
    assert lat_kept.max() > lat.max() * 1.2  # …and kept, the LAT view goes through 170 mm of couch


def test_labels_outside_the_body_are_dropped(tmp_path):
    """A labelmap naming something outside the body (here: the slab as a 'rib') loses it."""
    ct, _, slab = phantom()
    lab = np.zeros(ct.array.shape, np.uint8)
    lab[slab] = 1  # the couch mislabelled
    spine = ct.array == 700
    lab[spine] = 2
    labels = ct.with_array(lab)
    cfg = BuildConfig(**{**KW, "structures": "rib_left_1,vertebrae_T1"})
    from x2recon.structures import name_to_id

    ids = name_to_id()
    lab2 = np.zeros_like(lab)
    lab2[lab == 1], lab2[lab == 2] = ids["rib_left_1"], ids["vertebrae_T1"]
    res = build_case(ct, tmp_path, labels=labels.with_array(lab2), config=cfg, case_id="c")
    assert res.status == "done", res.reason
    seg = read_labelmap(res.case_dir / "segmentation.nii.gz")
    assert not seg.array[slab].any() and seg.array[spine].all()
    assert res.meta["meshes"]["structures"] == ["vertebrae_T1"]


def test_old_records_read_as_kept_and_keep_their_digest():
    new_keys = ("keep_outside_body", "variant_scale", "variant_rotation_deg", "variant_shift_mm")
    old = {k: v for k, v in BuildConfig().to_dict().items() if k not in new_keys}  # a record from before them
    cfg = BuildConfig.from_dict(old)
    assert cfg.keep_outside_body is True
    assert BuildConfig(keep_outside_body=True).digest() != BuildConfig().digest()
    # the digest of a build before the setting existed (its dict had no such key) is the 'kept' one
    import hashlib

    d = {k: v for k, v in old.items() if k != "preset" and not (k == "xray_realism" and not v)}
    assert BuildConfig(keep_outside_body=True).digest() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def test_evaluate_notes_a_model_trained_with_the_couch(tmp_path):
    from x2recon.dataset.model_fit import check_fit

    ct, _, _ = phantom()
    res = build_case(ct, tmp_path / "cases", config=BuildConfig(**KW), case_id="c")
    assert res.status == "done", res.reason
    old_build = {k: v for k, v in res.meta["config"].items() if k != "keep_outside_body"}
    fit = check_fit({"network": "x2b", "dataset": {"build": old_build}}, tmp_path, ["c"])
    assert "outside the body: model trained on data with it kept (couch in the DRRs) vs dataset cleared to air" in fit.title()
    same = check_fit({"network": "x2b", "dataset": {"build": res.meta["config"]}}, tmp_path, ["c"])
    assert "outside the body" not in same.title()


def test_cli_keep_outside_body_reaches_the_config():
    from x2recon.cli import build_parser
    from x2recon.cli.dataset import _config_from_args

    p = build_parser()
    a = p.parse_args(["build-dataset", "--ct", "x", "--out", "y"])
    assert _config_from_args(a).keep_outside_body is False
    a = p.parse_args(["build-dataset", "--ct", "x", "--out", "y", "--keep-outside-body"])
    assert _config_from_args(a).keep_outside_body is True


@pytest.mark.slow
def test_the_couch_rows_of_a_real_ct_lose_their_signal(shared_data):
    """chest_lungdx_a0001 lies on a couch: in its LAT DRR the pixels whose rays miss the body (the couch rows
    behind the back) carry signal as scanned and none once it is cleared; the body's pixels change little."""
    from x2recon.dataset.skeleton import clear_outside_body
    from x2recon.io.volume import read_ct

    ct = read_ct(shared_data / "chest_lungdx_a0001" / "ct.nii.gz")
    cleared, body, rec = clear_outside_body(ct)
    g = BuildConfig(drr_size=128).geometry("LAT", ct.corners_world().mean(0))
    before = render_drr(ct, g, device="cpu").line_integral
    after = render_drr(cleared, g, device="cpu").line_integral
    hits_body = render_drr(ct.with_array(np.where(body, 0, AIR).astype(np.int16)), g, device="cpu").line_integral > 0
    couch = ~hits_body & (before > 0.1 * before.max())
    assert rec["cleared_dense_ml"] > 500 and couch.sum() > 100  # a couch shows in whole rows of the LAT view
    assert (after[~hits_body] == 0).all()
    assert (after <= before + 1e-5).all()  # clearing only takes attenuation away (blankets, gown, the couch's edge)
    assert np.abs(after - before)[hits_body].mean() < 0.1 * before[hits_body].mean()
