"""Issue 20 §2 and §8: a model is checked against the data it is given before any work.

``evaluate`` compares the checkpoint's structures and geometry with each case's (an error naming both
values, or with ``--allow-mismatch`` a warning in every table title), says which cases the model trained on
(titles and the CSV's ``seen_in_training``), refuses a SPIDER model whose class the data cannot contain, and
refuses (or waits for) a build that is still writing the dataset.  ``reconstruct`` names an X-ray geometry
unlike the model's.  The data is conftest's tiny dataset (vertebrae of the sample CT, isocentre on the
structures, 3 cases: the scan trains, two deformed variants validate and test); the bundled ``skeleton`` and
``spider`` models were trained with another isocentre (thorax) on all bone.
"""

from __future__ import annotations

import csv
import json
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from x2recon.dataset.lock import dataset_lock
from x2recon.dataset.model_fit import (NOT_RECORDED, NOT_SEEN, SAME_CT, SEEN, UNKNOWN, case_identity, check_fit,
                                       xray_differences)
from x2recon.errors import X2ReconInputError
from x2recon.geometry import ProjectionGeometry
from x2recon.nn.checkpoint import read_config
from x2recon.resources import model_arg

#: The cheapest evaluation that still reconstructs and scores: one view, a 32³ MISE grid, few samples.
CHEAP = ["--views", "AP", "--resolution", "32", "--points", "2000", "--quiet"]


def run_main(capsys, *args) -> tuple[int, str, str]:
    """``x2recon ARGS`` in this process: (exit code, stdout, stderr)."""
    from x2recon.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def split_ids(ds: Path, split: str) -> list[str]:
    """A split's case ids straight from the file the manifest wrote (the reference for what was trained on)."""
    return (ds / "splits" / f"{split}.txt").read_text().split()


@pytest.fixture(scope="module")
def tiny_run(tiny_x2b_dataset, tmp_path_factory) -> Path:
    """A one-step X2B on the tiny dataset's train split: a checkpoint made by today's training code."""
    from x2recon.train.common import TrainSettings
    from x2recon.x2b.network import X2BConfig
    from x2recon.x2b.train import train_x2b

    out = tmp_path_factory.mktemp("fit_run")
    s = TrainSettings(out=str(out), epochs=10**6, max_steps=1, batch_size=1, lr=1e-3, workers=0, save_every=0,
                      progress=False, val_every=10**6)
    train_x2b(tiny_x2b_dataset, s, X2BConfig(views=["AP"], backbone="convnext_atto", image_size=64, hidden=32,
                                             n_blocks=1, local_features=False, fourier=0),
              val_split="", augment=False)
    return out / "last.safetensors"


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_refuses_a_model_trained_on_other_structures_and_geometry(tiny_x2b_dataset, tmp_path, capsys):
    """skeleton (all bone, box on the lungs) on a vertebrae dataset centred on the structures: an error before
    any work that names each difference with both values — not an IoU of 0.03 and exit 0."""
    out = tmp_path / "scores.csv"
    code, _, err = run_main(capsys, "evaluate", "--model", "skeleton", "--data", tiny_x2b_dataset, "--split", "all",
                            "--out", out, *CHEAP)
    assert code == 2
    assert err.startswith("x2recon evaluate: error:") and err.count("\n") == 1, err
    assert "structures: model skeleton (all bone from HU) vs dataset vertebrae" in err
    assert "isocentre: model thorax vs dataset structures" in err
    assert "--allow-mismatch" in err
    assert not out.exists()


def test_allow_mismatch_scores_with_a_warning_in_every_title(tiny_x2b_dataset, tmp_path, capsys):
    """--allow-mismatch: the scores come, every table title carries the warning, and a model that predates the
    training-case records says it cannot tell what it trained on (per case too)."""
    out = tmp_path / "scores.csv"
    code, stdout, err = run_main(capsys, "evaluate", "--model", "skeleton", "--data", tiny_x2b_dataset,
                                 "--split", "test", "--out", out, "--allow-mismatch", *CHEAP)
    assert code == 0, err
    titles = [line for line in stdout.splitlines() if line.startswith("Table")]
    assert len(titles) == 3, stdout
    for t in titles:
        assert "WARNING: MODEL/DATA MISMATCH" in t and "isocentre: model thorax vs dataset structures" in t, t
        assert "training cases not recorded" in t, t
        assert "its card says it was trained on chest_lidc0001, wholebody_tcga_thca" in t, t
    assert "WARNING: MODEL/DATA MISMATCH" in err  # said before the work, too
    rows = read_rows(out)
    assert [r["case"] for r in rows] == split_ids(tiny_x2b_dataset, "test")
    assert {r["seen_in_training"] for r in rows} == {NOT_RECORDED}


def test_evaluate_threshold_sets_every_reconstructions_surface(tiny_x2b_dataset, tmp_path, capsys):
    """--threshold τ: a higher occupancy threshold encloses less (the level sets are nested), so every case's
    predicted/true volume falls; --atlas refuses it (no network)."""
    vols = {}
    for tau in ("0.2", "0.6"):
        out = tmp_path / f"t{tau}.csv"
        code, _, err = run_main(capsys, "evaluate", "--model", "skeleton", "--data", tiny_x2b_dataset, "--split", "test",
                                "--out", out, "--allow-mismatch", "--threshold", tau, *CHEAP)
        assert code == 0, err
        vols[tau] = [float(r["world_volume_ratio"]) for r in read_rows(out)]
    assert all(hi < lo for lo, hi in zip(vols["0.2"], vols["0.6"])), vols
    code, _, err = run_main(capsys, "evaluate", "--atlas", tmp_path, "--data", tiny_x2b_dataset, "--threshold", "0.5")
    assert code == 2 and "--threshold" in err and "not used by --atlas" in err, err


def test_spider_refuses_a_dataset_without_its_class(tiny_x2b_dataset, tmp_path, capsys):
    """The bundled SPIDER's one class is 'skeleton'; a vertebrae dataset has no such labels, so its Dice would be
    0 and its HD95 the box diagonal (665 mm) whatever the model did: an error, even with --allow-mismatch."""
    for extra in ([], ["--allow-mismatch"]):
        out = tmp_path / "spider.csv"
        code, _, err = run_main(capsys, "evaluate", "--model", "spider", "--data", tiny_x2b_dataset, "--split",
                                "test", "--out", out, "--quiet", *extra)
        assert code == 2, err
        assert "class skeleton has no structure in this dataset" in err and "vertebrae" in err, err
        assert not out.exists()


@pytest.mark.slow
def test_evaluate_says_which_cases_the_model_trained_on(tiny_x2b_dataset, tiny_run, tmp_path, capsys):
    """A model trained today records its training cases; evaluating every case names the one it trained on and
    the two deformed copies of its CT — in the title and per case — against the split file it trained from."""
    recorded = read_config(tiny_run)["dataset"]["training_cases"]
    assert list(recorded["cases"]) == split_ids(tiny_x2b_dataset, "train")
    out = tmp_path / "scores.csv"
    code, stdout, err = run_main(capsys, "evaluate", "--model", tiny_run, "--data", tiny_x2b_dataset, "--split",
                                 "all", "--out", out, *CHEAP)
    assert code == 0, err
    train = set(split_ids(tiny_x2b_dataset, "train"))
    rows = read_rows(out)
    assert len(rows) == 3
    for r in rows:
        assert r["seen_in_training"] == (SEEN if r["case"] in train else SAME_CT), r
    titles = [line for line in stdout.splitlines() if line.startswith("Table")]
    assert titles and all("seen in training: 1 of 3 cases, 2 more from a training CT deformed otherwise" in t
                          for t in titles), stdout
    assert "WARNING" not in stdout


def test_seen_in_training_matches_by_scan_not_by_name(tiny_x2b_dataset, tiny_run, tmp_path):
    """Identity is the CT's voxels (and the deformation), not the case id: the training scan under another
    name is seen, another scan under the training case's name is not, and a case from a dataset built before
    checksums were recorded is 'unknown' — never a guess."""
    cfg = read_config(tiny_run)
    train_id = split_ids(tiny_x2b_dataset, "train")[0]
    meta = json.loads((tiny_x2b_dataset / "cases" / train_id / "meta.json").read_text())
    other_scan = json.loads(json.dumps(meta))
    other_scan["inputs"]["ct_sha256"] = "0" * 64
    old = json.loads(json.dumps(meta))
    del old["inputs"]["ct_sha256"]
    fake = tmp_path / "ds"
    for cid, m in (("renamed", meta), (train_id, other_scan), ("old", old)):
        (fake / "cases" / cid).mkdir(parents=True)
        (fake / "cases" / cid / "meta.json").write_text(json.dumps(m))
    fit = check_fit(cfg, fake, ["renamed", train_id, "old"])
    assert fit.seen == {"renamed": SEEN, train_id: NOT_SEEN, "old": UNKNOWN}
    assert fit.seen_note().startswith("seen in training: 1 of 3 cases") and "1 unknown" in fit.seen_note()
    assert case_identity(old) is None


def test_a_geometry_mismatch_names_model_and_dataset_values(tiny_x2b_dataset, tiny_run, tmp_path):
    """A dataset whose cases were rendered with another SDD and box than the model's training data: the error
    lists both, with the model's value first (cases' meta.json edited: the check reads nothing else)."""
    cfg = read_config(tiny_run)
    fake = tmp_path / "ds"
    ids = split_ids(tiny_x2b_dataset, "test")
    for cid in ids:
        meta = json.loads((tiny_x2b_dataset / "cases" / cid / "meta.json").read_text())
        meta["config"].update(sdd=1000.0, box_size=300.0)
        (fake / "cases" / cid).mkdir(parents=True)
        (fake / "cases" / cid / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(X2ReconInputError) as e:
        check_fit(cfg, fake, ids)
    assert "SDD (mm): model 1800 vs dataset 1000" in str(e.value)
    assert "box edge (mm): model 384 vs dataset 300" in str(e.value)
    fit = check_fit(cfg, fake, ids, allow_mismatch=True)
    assert fit.warning().startswith("WARNING: MODEL/DATA MISMATCH") and "SDD (mm)" in fit.title()


# ---------------------------------------------------------------------------------------------- the lock


def test_evaluate_refuses_a_dataset_a_build_is_writing(tiny_x2b_dataset, tmp_path, capsys):
    """While a build (or one shard of one) holds the dataset, evaluate --split all would score the cases that
    happen to be finished: it refuses, naming the build and --wait, before any work."""
    for shard in (None, (1, 2)):
        with dataset_lock(tiny_x2b_dataset, shard=shard):
            code, _, err = run_main(capsys, "evaluate", "--model", "skeleton", "--data", tiny_x2b_dataset,
                                    "--split", "all", "--out", tmp_path / "x.csv", "--allow-mismatch", *CHEAP)
        assert code == 2, err
        assert "is being written by x2recon build" in err and "partial dataset" in err and "--wait" in err, err
        assert not (tmp_path / "x.csv").exists()
    for p in tiny_x2b_dataset.glob(".lock.shard-*"):  # the shard lock file this test made
        p.unlink()


def test_evaluate_wait_waits_for_the_build(tiny_x2b_dataset, tmp_path, capsys):
    """--wait: says what it waits for, and goes on when the build releases the dataset (here to the structure
    check, which then stops it: the sign it got past the lock)."""
    held, release = threading.Event(), threading.Event()

    def build():
        with dataset_lock(tiny_x2b_dataset):
            held.set()
            release.wait(30)

    t = threading.Thread(target=build)
    t.start()
    held.wait(10)
    threading.Timer(1.0, release.set).start()
    t0 = time.monotonic()
    code, _, err = run_main(capsys, "evaluate", "--model", "skeleton", "--data", tiny_x2b_dataset, "--split", "all",
                            "--out", tmp_path / "x.csv", "--wait", *CHEAP)
    t.join()
    assert time.monotonic() - t0 >= 0.9
    assert "waiting for x2recon build" in err, err
    assert code == 2 and "does not fit this dataset" in err, err


def test_evaluate_reads_a_read_only_dataset(tiny_x2b_dataset, tmp_path, capsys):
    """The reader's lock needs no write access: a dataset copied read-only (no .lock) is checked all the same."""
    ro = tmp_path / "ro"
    shutil.copytree(tiny_x2b_dataset, ro, ignore=shutil.ignore_patterns(".lock*"))
    for p in [ro, *ro.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        code, _, err = run_main(capsys, "evaluate", "--model", "skeleton", "--data", ro, "--split", "all",
                                "--out", tmp_path / "x.csv", *CHEAP)
    finally:
        for p in [ro, *ro.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert code == 2 and "does not fit this dataset" in err, err


# ---------------------------------------------------------------------------------------------- X-rays


def test_xray_geometry_differences_name_each_value():
    """Each way an X-ray's geometry can differ from the model's training geometry is named with both values;
    the model's own geometry (and radiograph-like camera jitter) is not."""
    cfg = read_config(model_arg("skeleton"))  # thorax isocentre, SDD 1800, SOD 1600, 384 mm box, cone beam
    base = ProjectionGeometry.from_view("AP", (0, 0, 0))
    assert xray_differences(cfg, replace(base, isocenter_mode="thorax")) == []
    assert xray_differences(cfg, base) == []  # no isocentre mode recorded: nothing to compare
    assert xray_differences(cfg, base.pixel_shifted(20, -10)) == []
    d = xray_differences(cfg, replace(base, isocenter_mode="structures"))
    assert len(d) == 1 and d[0].startswith("isocentre: model thorax (the centre of the lungs) vs X-ray structures")
    d = xray_differences(cfg, ProjectionGeometry.from_view("AP", (0, 0, 0), sdd=1000, sod=800, box_size=300))
    assert any(x.startswith("box edge: model 384 mm vs X-ray 300 mm") for x in d), d
    assert any(x.startswith("SDD: model 1800 mm vs X-ray 1000 mm") for x in d), d
    assert any(x.startswith("SOD: model 1600 mm vs X-ray 800 mm") for x in d), d
    d = xray_differences(cfg, ProjectionGeometry.from_view("AP", (0, 0, 0), kind="parallel"))
    assert d == ["beam: model cone vs X-ray parallel — another projection than the model learned"]


def test_reconstruct_names_a_dataset_drr_centred_unlike_the_model(tiny_x2b_dataset, tmp_path, capsys):
    """A DRR built with the default --isocenter structures, given to the skeleton model (trained with thorax):
    one warning line names the isocentres and what that does; the mesh is still written."""
    case = tiny_x2b_dataset / "cases" / split_ids(tiny_x2b_dataset, "test")[0]
    assert json.loads((case / "images" / "AP.json").read_text())["isocenter_mode"] == "structures"
    out = tmp_path / "m.ply"
    code, _, err = run_main(capsys, "reconstruct", "--model", "skeleton", "--xray", case / "images" / "AP.png",
                            "--out", out, "--resolution", "32", "--quiet")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: AP.png: geometry differs")]
    assert len(warnings) == 1, err
    assert "isocentre: model thorax (the centre of the lungs) vs X-ray structures" in warnings[0]
    assert out.is_file()
