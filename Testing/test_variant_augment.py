"""Variants that make new patients (``build-dataset --variants N``): body size per axis (``--variant-scale``),
rotation (``--variant-rotation``) and the patient's place in the box (``--variant-shift-mm``, a seeded
isocentre offset, recorded in meta.json)."""

import numpy as np
import pytest

from x2recon.dataset.case import CaseInput, build_case, variant_seed
from x2recon.dataset.config import BuildConfig

KW = dict(structures="skeleton", views=["AP"], isocenter="thorax", drr_size=64, x2b_size=32, n_points=500,
          spider_grid=32, device="cpu", variant_scale=0.15)


@pytest.fixture(scope="module")
def ct_path(tmp_path_factory):
    from test_outside_body import phantom

    from x2recon.io.volume import write_volume

    p = tmp_path_factory.mktemp("ph") / "ct.nii.gz"
    write_volume(phantom()[0], p)
    return p


def _centroid(path):
    from x2recon.io.mesh import read_mesh

    m = read_mesh(path)
    return np.asarray(m.vertices, float).mean(0)


@pytest.mark.slow  # three case builds, 12 s
def test_box_shift_moves_the_bones_in_the_box_by_the_recorded_offset(ct_path, tmp_path):
    """With --isocenter thorax the box follows the deformed lungs (a translation is cancelled); the recorded
    box_shift_mm moves the bones in the box by exactly that much, and the deformation is the same."""
    a = build_case(CaseInput("ph_v01", str(ct_path), variant=1), tmp_path / "a",
                   config=BuildConfig(**KW, variant_shift_mm=[15, 25, 15]))
    b = build_case(CaseInput("ph_v01", str(ct_path), variant=1), tmp_path / "b", config=BuildConfig(**KW))
    assert a.status == b.status == "done", (a.reason, b.reason)
    shift = np.array(a.meta["box_shift_mm"])
    assert b.meta["box_shift_mm"] == [0.0, 0.0, 0.0] and np.all(np.abs(shift) <= [15, 25, 15]) and np.abs(shift).min() > 0.5
    assert a.meta["deformation"] == b.meta["deformation"]
    np.testing.assert_allclose(np.array(a.meta["isocenter"]) - b.meta["isocenter"], shift, atol=1e-9)
    moved = (_centroid(a.case_dir / "meshes" / "bones_box.ply") - _centroid(b.case_dir / "meshes" / "bones_box.ply"))
    np.testing.assert_allclose(moved * a.meta["box_size"], -shift, atol=0.01)  # box units × edge = mm
    np.testing.assert_allclose(_centroid(a.case_dir / "meshes" / "bones.ply"),  # the same bones in LPS
                               _centroid(b.case_dir / "meshes" / "bones.ply"), atol=1e-4)
    orig = build_case(CaseInput("ph", str(ct_path)), tmp_path / "a", config=BuildConfig(**KW, variant_shift_mm=[15, 25, 15]))
    assert orig.meta["box_shift_mm"] == [0.0, 0.0, 0.0]  # the CT itself is never moved


def test_the_record_reproduces_the_variant(ct_path, tmp_path):
    """meta.json's deformation (drawn within --variant-scale / --variant-rotation) rebuilt from its record and
    applied to the CT gives the stored DRR."""
    from x2recon.dataset.augment import Deformation, random_deformation
    from x2recon.dataset.skeleton import clear_outside_body
    from x2recon.drr.render import read_drr, render_drr
    from x2recon.io.volume import read_ct

    cfg = BuildConfig(**{**KW, "variant_rotation_deg": 8.0})
    res = build_case(CaseInput("ph_v02", str(ct_path), variant=2), tmp_path, config=cfg)
    assert res.status == "done", res.reason
    rec = res.meta["deformation"]
    assert rec["params"]["max_scale"] == 0.15 and rec["params"]["max_rotation_deg"] == 8.0
    assert res.meta["config"]["variant_scale"] == 0.15
    ct = read_ct(ct_path)
    d = Deformation.from_dict(rec)
    again = random_deformation(variant_seed(cfg, "ph", 2), ct, params=cfg.deformation_params())
    np.testing.assert_array_equal(d.matrix, again.matrix)
    stored = read_drr(res.case_dir / "images", "AP")
    img = render_drr(clear_outside_body(d.apply(ct))[0], stored.geometry, device="cpu")
    np.testing.assert_allclose(img.line_integral, stored.line_integral, rtol=1e-5, atol=1e-5)


def test_a_large_body_scale_never_folds():
    """--variant-scale 0.15 (and the largest allowed, 0.5): the sampling map's Jacobian determinant stays
    positive on every voxel for many seeds."""
    from x2recon.dataset.augment import random_deformation
    from x2recon.io.volume import Volume

    vol = Volume(np.zeros((24, 40, 40), np.int16), (4.0, 4.0, 6.0), (0, 0, 0), np.eye(3))
    for scale in (0.15, 0.5):
        params = BuildConfig(variant_scale=scale).deformation_params()
        dets = []
        for seed in range(6):
            src = random_deformation(seed, vol, params=params).source_index(vol)  # (k, j, i, 3) as i, j, k
            jac = np.stack([np.gradient(src[..., c], axis=a) for c in range(3) for a in (2, 1, 0)], -1)
            dets.append(np.linalg.det(jac.reshape(*jac.shape[:3], 3, 3)).min())
        assert min(dets) > 0.1, (scale, dets)


def test_cli_options_reach_the_config_and_defaults_keep_the_digest():
    from x2recon.cli import build_parser
    from x2recon.cli.dataset import _config_from_args

    p = build_parser()
    a = p.parse_args(["build-dataset", "--ct", "x", "--out", "y", "--variant-scale", "0.15",
                      "--variant-rotation", "7", "--variant-shift-mm", "15,25,15"])
    c = _config_from_args(a)
    assert (c.variant_scale, c.variant_rotation_deg, c.variant_shift_mm) == (0.15, 7.0, [15.0, 25.0, 15.0])
    assert c.deformation_params().max_scale == 0.15
    d = _config_from_args(p.parse_args(["build-dataset", "--ct", "x", "--out", "y"]))
    assert (d.variant_scale, d.variant_rotation_deg, d.variant_shift_mm) == (0.06, 5.0, [0.0, 0.0, 0.0])
    assert d.digest() == BuildConfig().digest() != c.digest()
    for bad in (["--variant-scale", "0.9"], ["--variant-shift-mm", "1,2"], ["--variant-shift-mm", "-3"]):
        with pytest.raises(SystemExit):
            p.parse_args(["build-dataset", "--ct", "x", "--out", "y", *bad])
