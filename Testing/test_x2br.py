"""X2BR end to end: detections → templates placed → registered onto the coarse shape; the CLI and
evaluate wiring; clear errors when nothing is detected."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("trimesh")


@pytest.fixture(scope="module")
def library(tiny_x2b_dataset, tmp_path_factory):
    from x2recon.x2br.template import build_library

    return build_library(tiny_x2b_dataset, tmp_path_factory.mktemp("templates"), structures=["vertebrae"])


def _case(dataset, case="chest_v02", view="AP"):
    from x2recon.dataset.torch_data import load_view
    from x2recon.x2br.evaluate import ground_truth_detections
    from x2recon.io.mesh import read_mesh

    folder = dataset / "cases" / case
    xray = load_view(folder, view, 64)
    return (xray, ground_truth_detections(folder, view, (64, 64)), read_mesh(folder / "meshes" / "bones.ply"))


@pytest.mark.slow
def test_x2br_registers_the_placed_template_part_by_part(library, tiny_x2b_dataset):
    """Ground-truth boxes of a held-out variant, the true bones as the coarse shape: X2BR's GBCPD++
    keeps the placed template's fit (Chamfer-L1 within 10 %) and its parts.  (GBCPD's advantage over
    Euclidean kernels where neighbouring parts move apart is tested in test_registration.py; on this
    case BCPD with the same settings scores alike — see the closing note.)"""
    from x2recon.metrics.mesh import mesh_metrics
    from x2recon.x2br.refine import refine_with_template

    xray, dets, gt = _case(tiny_x2b_dataset)
    res = refine_with_template(gt, xray, dets, library, method="gbcpd")
    assert set(res.parts) == set(res.names) and all(n.startswith("vertebrae_") for n in res.names)
    assert len(res.parts) >= 10 and len(res.mesh.faces) == len(res.template.faces)
    placed = mesh_metrics(res.template, gt, n_points=20_000, scale=384.0)
    refined = mesh_metrics(res.mesh, gt, n_points=20_000, scale=384.0)
    assert refined.chamfer_l1 <= 1.1 * placed.chamfer_l1, (placed, refined)
    assert refined.iou > 0.6
    for name, part in res.parts.items():  # each structure stays near its own ground truth
        assert np.linalg.norm(part.vertices.mean(0) - res.template.vertices[res.part_ids == res.names.index(name)].mean(0)) < 15


def test_no_detection_is_a_clear_error(library, tiny_x2b_dataset):
    from x2recon.errors import X2ReconInputError
    from x2recon.x2br.refine import refine_with_template

    xray, dets, gt = _case(tiny_x2b_dataset)
    with pytest.raises(X2ReconInputError, match="found no vertebrae or ribs"):
        refine_with_template(gt, xray, [], library)
    ribs_only = [d.renamed("ribs") for d in dets[:2]]  # the library has vertebrae only
    with pytest.raises(X2ReconInputError, match="template"):
        refine_with_template(gt, xray, ribs_only, library)


def test_evaluate_scores_x2br_rows_with_ground_truth_boxes(tiny_x2b_model, tiny_x2b_dataset, library, tmp_path, capsys):
    from x2recon.cli import main

    out = tmp_path / "eval.csv"
    assert main(["evaluate", "--model", str(tiny_x2b_model), "--data", str(tiny_x2b_dataset), "--split", "test",
                 "--views", "AP", "--resolution", "32", "--points", "5000", "--refine", "template",
                 "--detector", "ground-truth", "--templates", str(library.folder), "--registration", "gbcpd",
                 "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "X2B2" not in text and "X2BR (GBCPD)" in text and "Table 1" in text
    rows = out.read_text().splitlines()
    assert rows[0].split(",")[2] == "method" and len(rows) == 3  # X2B and X2BR for the one test view


def test_cli_refine_needs_its_inputs_and_says_when_nothing_is_detected(tiny_x2b_model, tiny_x2b_dataset, library,
                                                                       tmp_path, capsys, monkeypatch):
    import x2recon.resources.registry as registry
    from x2recon.cli import main

    monkeypatch.setattr(registry, "MODELS_DIR", tmp_path / "no_models")  # no bundled detector to fall back on

    png = tiny_x2b_dataset / "cases" / "chest_v02" / "images" / "AP_64.png"
    base = ["reconstruct", "--xray", str(png), "--model", str(tiny_x2b_model), "--out", str(tmp_path / "b.ply"),
            "--resolution", "32", "--quiet", "--refine", "template"]
    assert main(base + ["--templates", str(tmp_path)]) == 2
    assert "--detector" in capsys.readouterr().err
    assert main(base + ["--templates", str(tmp_path), "--detector", str(tmp_path / "none.safetensors")]) == 2
    assert "none.safetensors" in capsys.readouterr().err


def test_cpd_on_a_subset_moves_every_vertex_with_cpds_own_field():
    """Table 3's CPD baseline registers a subset and evaluates CPD's motion field at all vertices: the
    subset lands where CPD put it, and the whole surface follows the known deformation."""
    import trimesh

    from x2recon.registration import register
    from x2recon.x2br.refine import cpd_on_subset

    m = trimesh.creation.icosphere(4, radius=50.0)
    tgt = np.asarray(m.vertices) * np.array([1.2, 1.0, 0.9]) + 5.0
    r = cpd_on_subset(m, tgt, n=600, max_iter=80, seed=3)
    idx = np.sort(np.random.default_rng(3).choice(len(m.vertices), size=600, replace=False))
    direct = register(np.asarray(m.vertices)[idx], tgt, method="cpd", max_iter=80, seed=3)
    np.testing.assert_allclose(r.Y_hat[idx], direct.Y_hat, atol=1e-3)
    before = np.linalg.norm(m.vertices - tgt, axis=1).mean()
    after = np.linalg.norm(r.Y_hat - tgt, axis=1).mean()
    assert after < 0.4 * before, (before, after)
    assert len(r.Y_hat) == len(m.vertices) and r.mesh().is_watertight


def test_cli_reconstruct_refine_writes_parts_coarse_and_detections(tiny_x2b_model, tiny_x2b_dataset, library,
                                                                    tmp_path, monkeypatch):
    """``reconstruct --refine template`` end to end with a stand-in detector that returns the case's own boxes
    (a trained detector is tested in test_detection.py; here the X2BR plumbing and its files)."""
    import x2recon.x2br.detection as detection
    from x2recon.cli import main
    from x2recon.x2br.detection.detections import read_detections
    from x2recon.io.mesh import read_mesh

    _, dets, _ = _case(tiny_x2b_dataset)

    class GroundTruthDetector:
        def __init__(self, weights, *a, **k):
            self.weights = weights

        def detect(self, image, conf=0.25, **k):
            return dets

    monkeypatch.setattr(detection, "Detector", GroundTruthDetector, raising=False)
    (tmp_path / "det.safetensors").write_bytes(b"stand-in")
    png = tiny_x2b_dataset / "cases" / "chest_v02" / "images" / "AP_64.png"
    out = tmp_path / "bones.ply"
    assert main(["reconstruct", "--xray", str(png), "--model", str(tiny_x2b_model), "--out", str(out),
                 "--resolution", "32", "--quiet", "--refine", "template", "--detector", str(tmp_path / "det.safetensors"),
                 "--templates", str(library.folder)]) == 0
    parts = sorted(p.stem for p in (tmp_path / "bones_parts").glob("*.ply"))
    assert parts and all(p.startswith("vertebrae_") for p in parts)
    assert len(read_mesh(out).faces) == sum(len(read_mesh(tmp_path / "bones_parts" / f"{p}.ply").faces) for p in parts)
    assert (tmp_path / "bones_x2b.ply").is_file()
    assert len(read_detections(tmp_path / "bones_detections.json")) == len(dets)
