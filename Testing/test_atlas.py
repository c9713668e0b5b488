"""The atlas (x2b.atlas): no learning — the library case whose DRR matches the X-ray best after a 2D scale +
shift alignment, its bones placed on the X-ray.

The library is made here from conftest's tiny dataset (vertebrae of the sample CT): a "copy" patient whose CT is
the sample CT scaled by known factors about the AP view's isocentre and shifted in the detector plane, its AP DRR
rendered from that CT and its bones moved alike; beside it a "decoy", a deformed variant of the sample CT
relabelled as another patient.  The X-ray is the AP DRR of the sample CT itself; the reference is that case's
own ground-truth bones, which the atlas never reads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

#: The copy's anatomy against the sample CT's: scale along L, P, S (P, the AP view's depth, as L: the atlas
#: scales depth as the image's horizontal axis) and a shift in the detector plane (mm).
SCALE = np.array([1.08, 1.08, 0.93])
SHIFT = np.array([12.0, 0.0, -15.0])


def run_main(capsys, *args) -> tuple[int, str, str]:
    from x2recon.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _relabelled(src: Path, root: Path, case_id: str, views: list[str]) -> Path:
    """``src`` copied to ``root/cases/case_id`` as another patient: its own CT checksum, only ``views``."""
    dst = root / "cases" / case_id
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    meta["case_id"], meta["views"] = case_id, views
    meta["inputs"]["ct_sha256"] = hashlib.sha256(case_id.encode()).hexdigest()
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def atlas_setup(tiny_x2b_dataset, chest_half, tmp_path_factory):
    """(library folder, the X-ray's PNG, the sample case's folder): the copy + decoy library and the sample CT's
    AP DRR written with its geometry, both DRRs rendered here from the raw CT alike."""
    from x2recon.drr.render import render_drr, write_drr
    from x2recon.geometry import ProjectionGeometry
    from x2recon.io.mesh import read_mesh, write_mesh
    from x2recon.io.volume import read_ct

    case = tiny_x2b_dataset / "cases" / "chest"
    g = ProjectionGeometry.from_json(case / "images" / "AP.json")
    c = g.isocenter
    ct = read_ct(chest_half[0])
    work = tmp_path_factory.mktemp("atlas")
    lib = work / "library"
    copy = _relabelled(case, lib, "copy", ["AP"])
    moved = replace(ct, spacing=ct.spacing * SCALE, origin=c + SCALE * (ct.origin - c) + SHIFT)
    for p in (copy / "images").glob("AP*"):
        p.unlink()
    write_drr(render_drr(moved, g, device="cpu"), copy / "images", "AP")
    bones = read_mesh(case / "meshes" / "bones.ply")
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = np.diag(SCALE), c - SCALE * c + SHIFT
    write_mesh(bones.copy().apply_transform(m), copy / "meshes" / "bones.ply")
    _relabelled(tiny_x2b_dataset / "cases" / "chest_v01", lib, "decoy", ["AP", "LAT"])
    xray_dir = work / "xray"
    write_drr(render_drr(ct, g, device="cpu"), xray_dir, "AP")
    return lib, xray_dir / "AP.png", case


def _chamfer_mm(mesh, gt) -> float:
    from x2recon.metrics.mesh import chamfer_l1, sample_surface

    return chamfer_l1(sample_surface(mesh, 20_000)[0], sample_surface(gt, 20_000)[0])[0]


def test_the_scaled_and_shifted_copy_is_chosen_and_lands_on_the_patient(atlas_setup):
    """The copy wins over the decoy, the 2D fit recovers the inverse of the known scale and shift (in mm at the
    isocentre plane, so the cone beam's 1800/1600 magnification is out of it), and its bones placed on the X-ray
    lie on the patient's own within a voxel (chest_half: 1.4 × 1.4 × 2.5 mm) — where placing them as they are
    misses by more than 4 mm."""
    from x2recon.io.mesh import read_mesh
    from x2recon.io.xray import read_xray
    from x2recon.x2b.atlas import load_library, reconstruct_atlas

    lib, png, case = atlas_setup
    library = load_library(lib)
    res = reconstruct_atlas(read_xray(png), library)
    assert res.case.case_id == "copy", res.candidates
    assert [label for label, _ in res.candidates] == ["library/copy/AP", "library/decoy/AP"]  # LAT: not compared
    # image axes of AP: horizontal = +L, vertical = −S (rows run head → feet)
    assert res.fit.scale == pytest.approx((1 / SCALE[0], 1 / SCALE[2]), rel=0.01)
    assert res.fit.shift == pytest.approx((-SHIFT[0] / SCALE[0], SHIFT[2] / SCALE[2]), abs=1.5)
    gt = read_mesh(case / "meshes" / "bones.ply")
    assert _chamfer_mm(res.mesh, gt) < 1.6
    assert _chamfer_mm(read_mesh(lib / "cases" / "copy" / "meshes" / "bones.ply"), gt) > 4.0
    again = reconstruct_atlas(read_xray(png), [c for c in library if c.case_id == "copy"])  # deterministic
    assert again.fit == res.fit and np.array_equal(again.mesh.vertices, res.mesh.vertices)


def test_a_library_drr_that_cannot_be_aligned_is_skipped(atlas_setup, monkeypatch):
    """One library DRR whose fit flips an image axis is no candidate; the others still compete. Only when none
    aligns is it an error, naming the X-ray."""
    from x2recon.errors import X2ReconInputError
    from x2recon.io.xray import read_xray
    from x2recon.x2b import atlas

    lib, png, _ = atlas_setup
    library = atlas.load_library(lib)
    real, calls = atlas.align, []

    def copy_flips(target, moving):
        calls.append(1)
        if len(calls) == 1:  # the copy's DRR comes first in library order
            raise atlas.AlignmentFailed("the 2D alignment flipped an image axis")
        return real(target, moving)

    monkeypatch.setattr(atlas, "align", copy_flips)
    res = atlas.reconstruct_atlas(read_xray(png), library)
    assert res.case.case_id == "decoy" and [label for label, _ in res.candidates] == ["library/decoy/AP"]

    def never(target, moving):
        raise atlas.AlignmentFailed("the 2D alignment flipped an image axis")

    monkeypatch.setattr(atlas, "align", never)
    with pytest.raises(X2ReconInputError, match="no library DRR could be aligned"):
        atlas.reconstruct_atlas(read_xray(png), library)


def test_a_library_holding_the_scored_patient_is_refused(tiny_x2b_dataset, atlas_setup, tmp_path, capsys):
    """A library with a deformed variant of the scored patient's CT (same CT checksum, another deformation) is
    refused before any work, naming the library case and the scored one, and so is one whose checksum was never
    recorded; the CSV is not written."""
    lib = tmp_path / "lib"
    shutil.copytree(tiny_x2b_dataset / "cases" / "chest_v01", lib / "cases" / "chest_v01")
    out = tmp_path / "scores.csv"
    code, _, err = run_main(capsys, "evaluate", "--atlas", f"{atlas_setup[0]},{lib}", "--data", tiny_x2b_dataset,
                            "--split", "train", "--out", out, "--quiet")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"x2recon evaluate: error: {lib / 'cases' / 'chest_v01'}: the library case has the same CT")
    assert "as the scored case chest of" in err
    assert not out.exists()
    # a library case without a recorded CT checksum cannot be told apart from the scored patient: refused too
    meta_path = lib / "cases" / "chest_v01" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["inputs"]["ct_sha256"]
    meta_path.write_text(json.dumps(meta))
    code, _, err = run_main(capsys, "evaluate", "--atlas", lib, "--data", tiny_x2b_dataset, "--split", "train",
                            "--out", out, "--quiet")
    assert code == 2 and "built before x2recon recorded CT checksums" in err, err
    assert not out.exists()


def test_cli_round_trip(tiny_x2b_dataset, atlas_setup, tmp_path, capsys):
    """reconstruct --method atlas writes the placed mesh (on the patient's bones) and names the library case;
    a missing library or a missing --library is a one-line error and no file, for evaluate --atlas too."""
    from x2recon.io.mesh import read_mesh

    lib, png, case = atlas_setup
    mesh = tmp_path / "atlas.ply"
    code, out, err = run_main(capsys, "reconstruct", "--method", "atlas", "--library", lib, "--xray", png,
                              "--out", mesh, "--quiet")
    assert code == 0, err
    assert "library case library/copy" in out
    gt = read_mesh(case / "meshes" / "bones.ply")
    assert _chamfer_mm(read_mesh(mesh), gt) < 1.6

    for args in (["--library", tmp_path / "nowhere"], []):
        code, _, err = run_main(capsys, "reconstruct", "--method", "atlas", *args, "--xray", png,
                                "--out", tmp_path / "none.ply", "--quiet")
        assert code == 2 and err.count("\n") == 1, err
        assert (f"{tmp_path / 'nowhere'}: library dataset folder not found" if args else
                "--library: --method atlas needs --library") in err
    code, _, err = run_main(capsys, "evaluate", "--atlas", tmp_path / "nowhere", "--data", tiny_x2b_dataset,
                            "--out", tmp_path / "none.csv", "--quiet")
    assert code == 2 and "library dataset folder not found" in err
    assert not (tmp_path / "none.ply").exists() and not (tmp_path / "none.csv").exists()


@pytest.mark.slow  # the scoring of both protocols: ~10 s
def test_evaluate_atlas_writes_the_x2b_rows_columns(tiny_x2b_dataset, atlas_setup, tmp_path, capsys):
    """evaluate --atlas: one row per (case, view) with the columns of evaluate's X2B rows (case, view, method, the
    protocols' metrics, seconds, faces, seen_in_training), labelled atlas and not seen, and the tables."""
    from x2recon.io.mesh import read_mesh
    from x2recon.metrics.protocol import flat_row, score

    lib, _, case = atlas_setup
    gt = read_mesh(case / "meshes" / "bones.ply")
    scores = tmp_path / "atlas.csv"
    code, out, err = run_main(capsys, "evaluate", "--atlas", lib, "--data", tiny_x2b_dataset, "--split", "test",
                              "--views", "AP", "--points", "2000", "--out", scores, "--quiet")
    assert code == 0, err
    assert "atlas | 1 |" in out
    with open(scores, newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = flat_row(score(gt, gt, n_points=500, box=(gt.bounds[0] - 1, gt.bounds[1] + 1)))
    x2b_row = ["case", "view", "method", *metrics, "seconds", "faces", "seen_in_training"]  # evaluate_model's
    assert list(rows[0]) == x2b_row
    assert [(r["case"], r["view"], r["method"], r["seen_in_training"]) for r in rows] == [
        ("chest_v02", "AP", "atlas", "no")]
    assert float(rows[0]["world_chamfer_l1"]) < 10.0
