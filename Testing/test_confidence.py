"""Issue 19 §5, "say when it does not know": every X2B reconstruction carries a per-vertex confidence (mesh
scalar, printed mean, <stem>_confidence.json, colour-mapped rendering), and an X-ray unlike the model's training
images (a lateral given as frontal, an abdomen, a head) gets a warning naming why; the training patient's own
AP/PA DRRs, another patient's chest AP and a real chest film do not.  DRRs are rendered in the bundled ``skeleton`` model's training
geometry (its card's SDD/SOD/detector/box, ``--isocenter thorax``) at 64² to stay fast."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from x2recon.x2b.confidence import (COLUMN_FLOOR, CONFIDENCE_ARRAY, PROBE_BOX, ROW_FLOOR, profile_similarity,
                                    reference_image, training_likeness_warnings, vertex_confidence)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def skeleton():
    from x2recon.resources import bundled

    return bundled("skeleton")


@pytest.fixture(scope="module")
def build(skeleton):
    """The skeleton model's training geometry at a 64² detector."""
    from x2recon.dataset.config import BuildConfig
    from x2recon.nn.checkpoint import read_config

    b = read_config(skeleton)["dataset"]["build"]
    assert b["isocenter"] == "thorax"
    return BuildConfig(drr_size=64, sdd=b["sdd"], sod=b["sod"], detector_mm=b["detector_mm"], box_size=b["box_size"],
                       isocenter="thorax")


def _drr(ct_path, build, view, isocenter=None):
    from x2recon.dataset.thorax import lung_center
    from x2recon.drr.render import render_drr
    from x2recon.io.volume import read_ct
    from x2recon.io.xray import xray_from_array

    ct = read_ct(ct_path)
    iso = lung_center(ct) if isocenter is None else isocenter(ct)
    d = render_drr(ct, build.geometry(view, iso))
    return xray_from_array(d.display, d.geometry, str(ct_path))


@pytest.fixture(scope="module")
def chest_ap(chest_half, build):
    return _drr(chest_half[0], build, "AP")


@pytest.fixture(scope="module")
def lateral_as_frontal(chest_half, build, chest_ap):
    """The sample's lateral DRR given to the model as if it were its AP (the AP's geometry)."""
    return replace(_drr(chest_half[0], build, "LAT"), geometry=chest_ap.geometry)


# ------------------------------------------------------------------------------------ the measure
def test_confidence_is_the_occupancy_jump_across_the_surface():
    """On a sphere whose occupancy is σ(k (r − |x|)), the confidence at a surface vertex is
    |σ(−k h) − σ(k h)| = tanh(k h / 2): near 1 for a sharp field, near 0 for a flat one; normals flipped
    (a raw surface) give the same."""
    rng = np.random.default_rng(0)
    d = rng.normal(size=(500, 3))
    n = d / np.linalg.norm(d, axis=1, keepdims=True)
    r = 0.3
    v = r * n
    for k, near in ((2000.0, 1.0), (20.0, 0.0)):
        def prob(p, k=k):
            return 1 / (1 + np.exp(-k * (r - np.linalg.norm(p, axis=1))))

        c = vertex_confidence(prob, v, n)
        np.testing.assert_allclose(c, math.tanh(k * PROBE_BOX / 2), atol=1e-5)
        np.testing.assert_allclose(vertex_confidence(prob, v, -n), c, atol=1e-6)
        assert abs(c.mean() - near) < 0.1 and c.dtype == np.float32


def test_every_reconstruction_carries_its_confidence(skeleton, chest_ap, tmp_path):
    """The reconstruction's meshes carry the confidence as a vertex scalar, the values the occupancy one probe
    step either side of each vertex gives; PLY and VTK files keep it, STL cannot."""
    from x2recon.io.mesh import read_mesh, read_vertex_scalar, write_mesh
    from x2recon.nn.checkpoint import load_model
    from x2recon.x2b.reconstruct import OccupancyField, reconstruct

    model, _ = load_model(skeleton, torch.device("cpu"))
    rec = reconstruct(model, [chest_ap], resolution=32, device="cpu", precision="fp32")
    nv = len(rec.mesh.vertices)
    assert rec.confidence.shape == (nv,) and 0 <= rec.confidence.min() and rec.confidence.max() <= 1
    assert rec.confidence.std() > 0  # it varies over the surface
    np.testing.assert_array_equal(rec.mesh.vertex_attributes[CONFIDENCE_ARRAY], rec.confidence)
    np.testing.assert_array_equal(rec.mesh_box.vertex_attributes[CONFIDENCE_ARRAY], rec.confidence)
    assert rec.mean_confidence == pytest.approx(float(rec.confidence.mean()))
    # independently: the field's occupancy at v ± h n (outward mesh normals, box coordinates)
    field = OccupancyField(model, [chest_ap], torch.device("cpu"))
    v = np.asarray(rec.mesh_box.vertices, np.float32)
    n = np.asarray(trimesh_normals(rec.mesh_box), np.float32)
    expect = np.abs(field.prob(v + PROBE_BOX * n) - field.prob(v - PROBE_BOX * n))
    np.testing.assert_allclose(rec.confidence, expect, atol=2e-3)
    for suffix in (".ply", ".vtk"):
        write_mesh(rec.mesh, tmp_path / f"m{suffix}")
        assert len(read_mesh(tmp_path / f"m{suffix}").vertices) == nv
        np.testing.assert_allclose(read_vertex_scalar(tmp_path / f"m{suffix}", CONFIDENCE_ARRAY), rec.confidence,
                                   atol=1e-7)
    write_mesh(rec.mesh, tmp_path / "m.stl")
    assert read_vertex_scalar(tmp_path / "m.stl", CONFIDENCE_ARRAY) is None


def trimesh_normals(mesh):
    """The mesh's own area-weighted vertex normals (recomputed from its faces, not the stored ones)."""
    import trimesh

    return trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).vertex_normals


# ------------------------------------------------------------------------------------ out of distribution
def test_the_training_patients_frontal_drrs_do_not_warn(chest_half, build, chest_ap):
    assert training_likeness_warnings(chest_ap) == []
    assert training_likeness_warnings(_drr(chest_half[0], build, "PA")) == []


def test_another_patients_chest_ap_does_not_warn(shared_data, build):
    """A patient the model never saw (couch in the image, other body): still a frontal chest."""
    x = _drr(shared_data / "chest_lungdx_a0001" / "ct.nii.gz", build, "AP")
    assert training_likeness_warnings(x) == []


def test_a_real_chest_film_placed_from_its_lung_fields_does_not_warn(shared_data, skeleton):
    """A real PA radiograph (NIH ChestX-ray14, no geometry): arms and soft tissue fill its outer columns where a
    DRR shows air, its display mapping differs — still a frontal chest."""
    from x2recon.io.xray import model_geometry, read_xray
    from x2recon.nn.checkpoint import read_config

    x = read_xray(shared_data / "xray_nih_cxr" / "00000001_000.png", model_geometry=model_geometry(read_config(skeleton)))
    assert x.placement.method == "lung fields"
    assert training_likeness_warnings(x) == []


def test_a_lateral_given_as_frontal_warns(lateral_as_frontal):
    w = training_likeness_warnings(lateral_as_frontal)
    assert len(w) == 1 and "left–right profile" in w[0] and "lateral" in w[0]
    col, row = profile_similarity(lateral_as_frontal.image, reference_image(lateral_as_frontal.geometry))
    assert col < COLUMN_FLOOR <= row


def test_an_abdomen_warns(shared_data, build):
    x = _drr(shared_data / "abdomen_pancreas_cb001" / "ct.nii.gz", build, "AP")
    w = training_likeness_warnings(x)
    assert w and any("head–foot profile" in s and "abdomen" in s for s in w)


def test_a_head_warns(shared_data, build):
    """A non-chest image: the head CT has no lungs, so it is framed on its own centre."""
    x = _drr(shared_data / "head_invesalius" / "ct.nii.gz", build, "AP", isocenter=lambda ct: ct.corners_world().mean(0))
    w = training_likeness_warnings(x)
    assert len(w) == 2, w


def test_a_lateral_view_is_not_checked_against_the_frontal_reference(lateral_as_frontal, chest_half, build):
    """A lateral placed as a lateral (an X2B2 model's second view) is not judged by the frontal profiles."""
    assert training_likeness_warnings(_drr(chest_half[0], build, "LAT")) == []


# ------------------------------------------------------------------------------------ the command
def _png(xray, path):
    from x2recon.io.image import write_png16
    from x2recon.io.xray import write_geometry

    write_png16(np.round(xray.image * 65535).astype(np.uint16), path)
    write_geometry(xray.geometry, path.with_suffix(".json"))
    return path


@pytest.mark.slow  # two reconstructions through the CLI, each loading the model (~30 s on 2 loaded cores)
def test_reconstruct_prints_writes_and_renders_the_confidence(skeleton, chest_ap, lateral_as_frontal, tmp_path,
                                                               capsys):
    from x2recon.cli import main

    ap = _png(chest_ap, tmp_path / "ap.png")
    base = ["reconstruct", "--model", "skeleton", "--resolution", "32", "--quiet", "--precision", "fp32"]
    assert main(base + ["--xray", str(ap), "--out", str(tmp_path / "ap.stl"), "--render-confidence"]) == 2
    assert "--render-confidence" in capsys.readouterr().err and not (tmp_path / "ap.stl").exists()

    assert main(base + ["--xray", str(ap), "--out", str(tmp_path / "ap.stl"), "--render", str(tmp_path / "ap.png.png"),
                        "--render-confidence"]) == 0
    out, err = capsys.readouterr()
    summary = json.loads((tmp_path / "ap_confidence.json").read_text())
    assert f"confidence: mean {summary['mean_confidence']:.3f}" in out and "in the JSON" in out
    assert summary["ood_checked"] and summary["ood_warnings"] == [] and "WARNING" not in err
    vc = summary["vertex_confidence"]  # STL cannot carry it: the JSON does
    assert len(vc) > 100 and abs(np.mean(vc) - summary["mean_confidence"]) < 1e-3
    assert (tmp_path / "ap.png.png").stat().st_size > 1000

    lat = _png(lateral_as_frontal, tmp_path / "lat.png")
    assert main(base + ["--xray", str(lat), "--out", str(tmp_path / "lat.ply")]) == 0
    out, err = capsys.readouterr()
    assert "WARNING: lat.png may be outside what the model was trained on" in err and "lateral" in err
    summary = json.loads((tmp_path / "lat_confidence.json").read_text())
    assert len(summary["ood_warnings"]) == 1 and "vertex_confidence" not in summary  # the PLY carries it
    assert "in the JSON" not in out
