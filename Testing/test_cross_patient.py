"""Issue 13 §3: the thorax-centred isocentre and the leave-one-patient-out study command."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from x2recon.dataset.config import BuildConfig
from x2recon.dataset.case import isocenter_of
from x2recon.dataset.thorax import lung_center
from x2recon.errors import X2ReconInputError
from x2recon.io.volume import Volume

REPO = Path(__file__).resolve().parents[1]


def trunk(lungs: bool = True) -> tuple[Volume, Volume]:
    """A 3 mm synthetic trunk (k=z up): soft-tissue cylinder in air, a spine along its whole length,
    two lungs in the upper third and a small gas bubble low in the abdomen; and the spine's labelmap."""
    nz, ny, nx = 150, 70, 90
    k, j, i = np.mgrid[:nz, :ny, :nx]
    hu = np.full((nz, ny, nx), -1000, np.int16)
    hu[((i - 45) / 40.0) ** 2 + ((j - 35) / 30.0) ** 2 <= 1] = 40
    spine = ((i - 45) ** 2 + (j - 55) ** 2 <= 16)
    hu[spine] = 700
    if lungs:
        for cx in (30, 60):
            hu[((i - cx) / 10.0) ** 2 + ((j - 32) / 14.0) ** 2 + ((k - 115) / 25.0) ** 2 <= 1] = -850
    hu[(i - 45) ** 2 + (j - 25) ** 2 + (k - 20) ** 2 <= 9] = -900  # bowel gas, ~2.5 ml at 3 mm voxels
    z = Volume(hu, np.array([3.0, 3.0, 3.0]), np.zeros(3), np.eye(3), "synthetic.nii.gz")
    seg = Volume(spine.astype(np.uint8), z.spacing.copy(), z.origin.copy(), z.direction.copy())
    return z, seg


def test_thorax_isocentre_is_the_lungs_not_the_skeleton():
    ct, seg = trunk()
    c = lung_center(ct)
    # lungs span k 90..140 (z 270..420 mm), i 20..70, j 18..46 → centre (135, 96, 345) within a 3 mm block
    assert np.allclose(c, [135.0, 96.0, 345.0], atol=4.5), c
    assert np.allclose(isocenter_of(seg, ct, BuildConfig(isocenter="thorax")), c)
    bones = isocenter_of(seg, ct, BuildConfig(isocenter="structures"))
    assert abs(bones[2] - 223.5) < 2 and abs(bones[2] - c[2]) > 100  # the spine's centre is the abdomen


def test_no_lungs_is_a_clear_error():
    ct, _ = trunk(lungs=False)
    with pytest.raises(X2ReconInputError, match="no lungs found") as e:
        lung_center(ct)
    assert e.value.args[0] == "synthetic.nii.gz" or "synthetic.nii.gz" in str(e.value)


@pytest.mark.slow
def test_whole_body_ct_lungs_are_in_its_upper_part(shared_data):
    """The real skull-base → mid-thigh CT: the lung centre lies in the chest, not at the CT's middle."""
    from x2recon.io.volume import read_ct

    ct = read_ct(shared_data / "wholebody_tcga_thca" / "ct.nii.gz")
    z = ct.corners_world()[:, 2]
    c = lung_center(ct)
    top = z.max()
    assert 80 < top - c[2] < 260, (top, c)  # lungs' middle: 8–26 cm below the skull base
    assert abs(c[2] - z.mean()) > 120


def _load_study():
    spec = importlib.util.spec_from_file_location("cross_patient", REPO / "training" / "cross_patient.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["cross_patient"] = mod
    spec.loader.exec_module(mod)
    return mod


def _split_ids(ds: Path) -> set[str]:
    ids = set()
    for name in ("train", "val"):
        f = ds / "splits" / f"{name}.txt"
        ids |= set(f.read_text().split()) if f.is_file() else set()
    return ids


def two_patients(shared_data: Path, root: Path) -> list[Path]:
    """Two small "patients": the upper and lower slabs (≥ 150 mm each) of the half-resolution chest CT;
    the upper one keeps its labels (a labelled patient), the lower one has none."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(shared_data / "chest_lidc0001_half" / "ct.nii.gz"))
    lab = sitk.ReadImage(str(shared_data / "chest_lidc0001_half" / "labels.nii.gz"))
    nz = img.GetSize()[2]
    out = []
    for name, (z0, z1) in (("patient_a", (0, 62)), ("patient_b", (nz - 62, nz))):
        (root / name).mkdir(parents=True)
        sitk.WriteImage(img[:, :, z0:z1], str(root / name / "ct.nii.gz"))
        if name == "patient_a":
            sitk.WriteImage(lab[:, :, z0:z1], str(root / name / "labels.nii.gz"))
        out.append(root / name)
    return out


@pytest.mark.slow
def test_smoke_study_holds_patients_out_and_resumes(tmp_path, shared_data, capsys):
    study = _load_study()
    out = tmp_path / "study"
    a, b = two_patients(shared_data, tmp_path / "data")
    argv = ["--out", str(out), "--profile", "smoke", "--patients", f"{a},{b}", "--isocenter", "structures"]
    assert study.main(argv) == 0
    for held, other in (("patient_a", "patient_b"), ("patient_b", "patient_a")):
        train = json.loads((out / held / "train_data" / "manifest.json").read_text())
        bases = {c.get("base_id") for c in train["cases"]}
        assert bases == {other}, bases
        assert not any(held in i for i in _split_ids(out / held / "train_data"))
        test = json.loads((out / held / "test_data" / "manifest.json").read_text())
        assert [(c.get("base_id"), c.get("variant")) for c in test["cases"]] == [(held, 0)]
    table = (out / "results.md").read_text()
    for protocol in ("| paper |", "| world |", "| intensity + skeleton Dice |"):
        assert protocol in table
    res = json.loads((out / "results.json").read_text())
    assert {r["held_out"] for r in res["rows"]} == {"patient_a", "patient_b"}
    assert all(r["n_train_patients"] == 1 for r in res["rows"])
    capsys.readouterr()
    assert study.main(argv) == 0  # resume: every step recorded, nothing runs again
    text = capsys.readouterr().out
    assert text.count("done before, skipped") == 2 * (2 + 2 * 4)
    assert "x2recon build-dataset" not in text and "x2recon train" not in text

    models = tmp_path / "models"  # the bundled assets: every patient, the folds' recipes, their cards
    assert study.main([*argv, "--bundle", str(models)]) == 0
    cards = json.loads((models / "cards.json").read_text())
    assert set(cards) == {"skeleton", "spider", "detector", "templates"}
    for alias, card in cards.items():
        assert (models / card["file"]).exists(), alias
        assert card["not_clinical"] is True and card["held_out"]
    merged = json.loads((out / "all" / "train_data" / "manifest.json").read_text())
    assert {c.get("base_id") for c in merged["cases"]} == {"patient_a", "patient_b"}
    assert cards["skeleton"]["trained_on"]["patients"] == ["patient_a", "patient_b"]
    assert cards["skeleton"]["recipe"] in ("x2b_paper", "x2b_ours")
    assert {f["held_out"] for f in cards["skeleton"]["held_out"]["folds"]} == {"patient_a", "patient_b"}
    assert cards["detector"]["trained_on"]["patients"] == ["patient_a"]  # the labelled patient only
    from x2recon.cli.info import read_info

    assert read_info(models / "x2b_skeleton.safetensors")["network"] == "x2b"
    assert read_info(models / "spider_skeleton.safetensors")["network"] == "spider"
    assert "library.json" in {p.name for p in (models / "templates").iterdir()}
    read_info(models / "detector.safetensors")
