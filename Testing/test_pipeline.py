"""Dataset pipeline end to end: outputs, manifest, resume after a kill, bad inputs, shards, workers, Dask."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from x2recon.dataset.builder import (
    build_dataset,
    discover,
    expand_variants,
    make_splits,
    parse_shard,
    select_shard,
)
from x2recon.dataset.case import CaseInput, build_case
from x2recon.dataset.config import BuildConfig
from x2recon.io.volume import read_ct, read_labelmap, write_volume

FAST = dict(views=["AP", "LAT"], drr_size=128, x2b_size=64, n_points=20_000, spider_grid=32)


def fast_config(**kw) -> BuildConfig:
    return BuildConfig(**{**FAST, **kw})


@pytest.fixture(scope="module")
def built_case(tmp_path_factory, chest_half):
    out = tmp_path_factory.mktemp("ds")
    ct, labels = chest_half
    summary = build_dataset([CaseInput("chest", str(ct), str(labels))], out, fast_config(), progress=False)
    assert not summary.failed, summary.text()
    return out


def test_case_has_every_output_and_a_consistent_meta(built_case):
    case = built_case / "cases" / "chest"
    meta = json.loads((case / "meta.json").read_text())
    names = set(meta["segmentation"]["names"].values())
    assert {"vertebrae_T7", "rib_left_3", "costal_cartilages"} <= names
    assert not any(n.startswith("scapula") for n in names)  # paper default excludes scapulae
    for rel in ["segmentation.nii.gz", "points.npz", "meshes/bones.ply", "meshes/bones_box.ply",
                "meshes/vertebrae_T7.ply", "spider/ct.nii.gz", "spider/labels.nii.gz"]:
        assert (case / rel).is_file(), rel
    for v in ("AP", "LAT"):
        for rel in (f"images/{v}.png", f"images/{v}.json", f"images/{v}_mu.npy", f"images/{v}_64.png", f"labels/{v}.txt"):
            assert (case / rel).is_file(), rel
    # checksums in meta match the files
    from x2recon.dataset.case import sha256_file

    for rel, digest in meta["files"].items():
        assert sha256_file(case / rel) == digest, rel
    assert not (built_case / "cases" / "chest.partial").exists()
    assert not (case / "stages.json").exists()
    # the manifest lists the case as done, with its meta checksum
    man = json.loads((built_case / "manifest.json").read_text())
    (rec,) = man["cases"]
    assert rec["status"] == "done" and rec["meta_sha256"] == sha256_file(case / "meta.json")
    assert (built_case / "dataset.yaml").is_file()
    assert "torch" in meta["versions"] and meta["config"]["n_points"] == 20_000


def test_isocenter_centres_the_bones_and_box_mesh_is_normalised(built_case):
    from x2recon.io.mesh import read_mesh

    case = built_case / "cases" / "chest"
    meta = json.loads((case / "meta.json").read_text())
    world = read_mesh(case / "meshes" / "bones.ply")
    box = read_mesh(case / "meshes" / "bones_box.ply")
    iso = np.array(meta["isocenter"])
    np.testing.assert_allclose(world.bounds.mean(0), iso, atol=3.0)  # bbox centre (voxel-edge tolerance)
    np.testing.assert_allclose(box.vertices, (world.vertices - iso) / meta["box_size"], atol=1e-4)
    assert np.abs(box.vertices).max() <= 0.5


def test_spider_targets_are_in_the_box(built_case):
    import SimpleITK as sitk

    case = built_case / "cases" / "chest"
    meta = json.loads((case / "meta.json").read_text())
    img = sitk.ReadImage(str(case / "spider" / "ct.nii.gz"))
    assert img.GetSize() == (32, 32, 32)
    assert np.allclose(img.GetSpacing(), meta["box_size"] / 32)
    lab = read_labelmap(case / "spider" / "labels.nii.gz")
    assert set(np.unique(lab.array)) - {0} <= {int(k) for k in meta["segmentation"]["names"]}


def test_rerun_is_idempotent(built_case, chest_half):
    ct, labels = chest_half
    case = built_case / "cases" / "chest"
    before = (case / "meta.json").stat().st_mtime_ns
    s = build_dataset([CaseInput("chest", str(ct), str(labels))], built_case, fast_config(), progress=False)
    assert s.skipped == ["chest"] and not s.done
    assert (case / "meta.json").stat().st_mtime_ns == before


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from x2recon.dataset.case import CaseInput, build_case
    from x2recon.dataset.config import BuildConfig
    cfg = BuildConfig(**{fast!r})
    def progress(f, msg):
        if msg == {stop!r}:
            os._exit(9)   # a hard kill: no cleanup, no exception handling
    build_case(CaseInput("chest", {ct!r}, {labels!r}), {out!r}, config=cfg, progress=progress)
    """
)


@pytest.mark.slow
def test_resume_after_a_killed_run(tmp_path, chest_half):
    ct, labels = chest_half
    out = tmp_path / "cases"
    script = KILL_SCRIPT.format(fast=FAST, stop="rendering DRR LAT", ct=str(ct), labels=str(labels), out=str(out))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    # killed mid-case: only the partial folder exists, nothing looks finished
    assert not (out / "chest").exists()
    partial = out / "chest.partial"
    stages = json.loads((partial / "stages.json").read_text())["stages"]
    assert {"segment", "meshes", "occupancy", "drr_AP"} <= set(stages) and "drr_LAT" not in stages
    mtimes = {p: p.stat().st_mtime_ns for p in (partial / "segmentation.nii.gz", partial / "points.npz", partial / "images" / "AP.png")}
    seen = []
    res = build_case(CaseInput("chest", str(ct), str(labels)), out, config=fast_config(), progress=lambda f, m: seen.append(m))
    assert res.status == "done", res.reason
    assert "rendering DRR AP" not in seen and "segmenting" not in seen and "rendering DRR LAT" in seen
    for p, t in mtimes.items():  # finished stages were not redone
        assert (out / "chest" / p.relative_to(partial)).stat().st_mtime_ns == t
    assert not partial.exists()


@pytest.mark.slow
def test_a_corrupted_stage_output_is_rebuilt(tmp_path, chest_half):
    ct, labels = chest_half
    out = tmp_path / "cases"
    script = KILL_SCRIPT.format(fast=FAST, stop="rendering DRR AP", ct=str(ct), labels=str(labels), out=str(out))
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 9
    pts = out / "chest.partial" / "points.npz"
    pts.write_bytes(pts.read_bytes()[:100])  # truncated behind the pipeline's back
    seen = []
    res = build_case(CaseInput("chest", str(ct), str(labels)), out, config=fast_config(), progress=lambda f, m: seen.append(m))
    assert res.status == "done" and "sampling occupancy" in seen and "segmenting" not in seen


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, chest_half, chest_full, shared_data):
    d = tmp_path_factory.mktemp("bad")
    ct, labels = chest_half
    garbage = d / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a NIfTI file at all" * 10)
    ctv = read_ct(ct)
    empty = d / "empty_labels.nii.gz"
    write_volume(read_labelmap(labels).with_array(np.zeros_like(read_labelmap(labels).array)), empty)
    return {
        "unreadable": CaseInput("unreadable", str(garbage), str(labels)),
        "not_a_ct": CaseInput("not_a_ct", str(labels), str(labels)),
        "missing_file": CaseInput("missing_file", str(d / "nope.nii.gz"), None),
        "empty_labels": CaseInput("empty_labels", str(ct), str(empty)),
        "mismatched": CaseInput("mismatched", str(ct), str(chest_full[1])),
        "no_structures": CaseInput("no_structures", str(shared_data / "head_invesalius" / "ct.nii.gz"), None),
        "thin_slab": CaseInput("thin_slab", str(shared_data / "thoracoabdominal_slab" / "ct.nii.gz"),
                               str(shared_data / "thoracoabdominal_slab" / "labels.nii.gz")),
    }, ctv


EXPECTED = {
    "unreadable": "garbage.nii.gz: cannot read as a CT",
    "not_a_ct": "not a CT in Hounsfield units",
    "missing_file": "nope.nii.gz: CT file not found",
    "empty_labels": "empty_labels.nii.gz: labelmap is empty",
    "mismatched": "labelmap grid .* does not match the CT",
    "no_structures": "head_invesalius/ct.nii.gz: no labelmap given",
    "thin_slab": "too thin for radiographs",
}


@pytest.mark.slow
def test_bad_inputs_fail_their_case_with_a_clear_reason_and_the_run_continues(tmp_path, bad_inputs, chest_half):
    inputs, _ = bad_inputs
    ct, labels = chest_half
    cases = list(inputs.values()) + [CaseInput("good", str(ct), str(labels))]
    s = build_dataset(cases, tmp_path, fast_config(), progress=False)
    assert s.done == ["good"]
    reasons = dict(s.failed)
    assert set(reasons) == set(EXPECTED)
    import re

    for cid, pattern in EXPECTED.items():
        assert re.search(pattern, reasons[cid]), (cid, reasons[cid])
        assert "Traceback" not in reasons[cid]
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["counts"] == {"done": 1, "failed": len(EXPECTED)}
    assert "too thin" in s.text()
    for cid in EXPECTED:  # a failed case never looks finished
        assert not (tmp_path / "cases" / cid / "meta.json").exists()


def test_missing_requested_structures_fail_and_partial_sets_are_recorded(tmp_path, chest_half):
    ct, labels = chest_half
    res = build_case(CaseInput("femurs", str(ct), str(labels)), tmp_path, config=fast_config(structures=["femur_left", "femur_right"]))
    assert res.status == "failed" and "none of the requested structures is present (femur_left, femur_right)" in res.reason
    res = build_case(CaseInput("mixed", str(ct), str(labels)), tmp_path,
                     config=fast_config(structures=["vertebrae_T5", "femur_left"], views=["AP"]))
    assert res.status == "done", res.reason
    assert res.meta["segmentation"]["missing"] == ["femur_left"]


def test_verse_labels_are_mapped_to_totalsegmentator_names(tmp_path, shared_data):
    from x2recon.dataset.segmentation import segment

    d = shared_data / "lumbar_crop_verse"
    ct = read_ct(d / "ct.nii.gz")
    seg, names, src = segment(ct, d / "labels_verse.nii.gz", BuildConfig(label_convention="verse"))
    assert set(names.values()) == {"vertebrae_L2", "vertebrae_L3", "vertebrae_L4"} and "verse" in src
    assert (discover([d / "ct.nii.gz"])[0]).label_convention == "verse"


def test_threshold_fallback_is_labelled(chest_half):
    from x2recon.dataset.segmentation import THRESHOLD_NAME, segment

    ct = read_ct(chest_half[0])
    seg, names, src = segment(ct, None, BuildConfig(segmentation="threshold"))
    assert names == {1: THRESHOLD_NAME} and "fallback" in src
    lab = read_labelmap(chest_half[1]).array
    bone = np.isin(lab, list(range(25, 51)) + list(range(92, 117)))
    # most labelled bone is found (recall); contrast-filled vessels and the table are kept too
    assert (seg.array[bone] > 0).mean() > 0.7


@pytest.mark.slow
def test_cli_reports_bad_input_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "x2recon.cli", "build-dataset", "--ct", str(tmp_path / "nothing"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and "nothing: CT input not found" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "x2recon.cli", "build-dataset", "--ct", str(tmp_path),
                        "--out", str(tmp_path / "o"), "--structures", "ribz"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown structure(s) ['ribz']" in r.stderr


# ----------------------------------------------------------------------------- discovery, shards, variants


def test_discovery_of_the_shared_data_folder(shared_data):
    cases = {c.case_id: c for c in discover([shared_data])}
    # every CT folder; xray_nih_cxr holds a radiograph, not a CT, and is no case
    assert {"abdomen_pancreas_cb001", "chest_lidc0001", "chest_lidc0001_half", "chest_lungdx_a0001", "head_invesalius",
            "lumbar_crop_verse", "thoracoabdominal_slab", "wholebody_tcga_thca"} == set(cases)
    assert cases["chest_lidc0001"].labels.endswith("labels.nii.gz")
    for unlabelled in ("head_invesalius", "wholebody_tcga_thca", "abdomen_pancreas_cb001", "chest_lungdx_a0001"):
        assert cases[unlabelled].labels is None, unlabelled


def test_list_file_and_explicit_labels(tmp_path, chest_half):
    ct, labels = chest_half
    lst = tmp_path / "cases.txt"
    lst.write_text(f"# comment\n{ct}\t{labels}\n")
    (c,) = discover([lst])
    assert c.ct == str(ct) and c.labels == str(labels)
    from x2recon.errors import X2ReconInputError

    with pytest.raises(X2ReconInputError, match="2 labelmaps given for 1 CTs"):
        discover([ct], [labels, labels])


def test_shards_partition_the_cases():
    cases = expand_variants([CaseInput(f"c{i}", "x") for i in range(7)], 2)
    assert len(cases) == 21 and cases[1].case_id == "c0_v01" and cases[1].variant == 1 and cases[1].base_id == "c0"
    parts = [select_shard(cases, parse_shard(f"{k}/4")) for k in range(1, 5)]
    ids = [c.case_id for p in parts for c in p]
    assert sorted(ids) == sorted(c.case_id for c in cases) and len(set(ids)) == 21
    with pytest.raises(ValueError, match="K/N"):
        parse_shard("5/4")


def test_splits_never_share_a_ct():
    recs = [{"case_id": f"ct{i}" + (f"_v{v:02d}" if v else ""), "base_id": f"ct{i}", "variant": v}
            for i in range(10) for v in range(3)]
    s = make_splits(recs)
    base = lambda ids: {i.split("_v")[0] for i in ids}
    assert not (base(s["train"]) & base(s["val"])) and not (base(s["train"]) & base(s["test"]))
    one = [{"case_id": "a" + (f"_v{v:02d}" if v else ""), "base_id": "a", "variant": v} for v in range(11)]
    s = make_splits(one)
    assert "a" in s["train"] and s["val"] and s["test"] and not set(s["val"]) & set(s["train"])


def test_split_by_variant_trains_every_patient():
    """A leave-one-patient-out fold of 3 training CTs: by default 1 CT would train (whole CTs per split);
    by variant all three train, only variants validate, and none is spent on a test split."""
    recs = [{"case_id": f"ct{i}" + (f"_v{v:02d}" if v else ""), "base_id": f"ct{i}", "variant": v}
            for i in range(3) for v in range(3)]
    base = lambda ids: {i.split("_v")[0] for i in ids}
    assert len(base(make_splits(recs)["train"])) == 1
    s = make_splits(recs, by="variant")
    assert base(s["train"]) == {"ct0", "ct1", "ct2"} and {"ct0", "ct1", "ct2"} <= set(s["train"])
    assert s["val"] and not s["test"] and all("_v" in i for i in s["val"]) and len(s["train"]) == 8
    assert not set(s["train"]) & set(s["val"])
    assert make_splits(recs, by="patient") == make_splits(recs)
    with pytest.raises(ValueError, match="at least 3 CTs"):
        make_splits([r for r in recs if r["base_id"] != "ct2"], by="patient")


@pytest.mark.slow
def test_variants_are_deformed_copies_recorded_in_meta(tmp_path, chest_half):
    ct, labels = chest_half
    s = build_dataset([CaseInput("chest", str(ct), str(labels))], tmp_path, fast_config(views=["AP"], variants=1, n_points=5000),
                      workers=2, progress=False)
    assert sorted(s.done) == ["chest", "chest_v01"], s.text()
    m0 = json.loads((tmp_path / "cases" / "chest" / "meta.json").read_text())
    m1 = json.loads((tmp_path / "cases" / "chest_v01" / "meta.json").read_text())
    assert m0["deformation"] is None and m1["deformation"]["seed"] is not None
    a = np.load(tmp_path / "cases" / "chest" / "images" / "AP_mu.npy")
    b = np.load(tmp_path / "cases" / "chest_v01" / "images" / "AP_mu.npy")
    assert np.abs(a - b).mean() > 0.01 * a.max()  # the variant's anatomy differs
    assert m1["meshes"]["volume_mm3"] != m0["meshes"]["volume_mm3"]


@pytest.mark.slow
def test_dask_cluster_builds_cases(tmp_path, chest_half):
    distributed = pytest.importorskip("distributed")
    ct, labels = chest_half
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        s = build_dataset([CaseInput("chest", str(ct), str(labels))], tmp_path,
                          fast_config(views=["AP"], n_points=5000), dask=cluster.scheduler_address, progress=False)
    assert s.done == ["chest"], s.text()
    assert (tmp_path / "status" / "chest.json").exists()
