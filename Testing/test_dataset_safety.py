"""Issue 10, dataset side: nothing lost, nothing silently wrong.

Case ids confined to ``cases/<id>``, one writer per dataset, verified "done" cases, workers that
die with their parent, the same bytes whatever the order or interruptions, corrupt CTs and bad
geometries refused by name, ``manifest`` on things that are not datasets, up-front option errors,
read-only and full disks.  Destructive tests work in temporary folders only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from x2recon.dataset.builder import build_dataset, discover, write_manifest
from x2recon.dataset.case import CaseInput, build_case, sha256_file
from x2recon.dataset.config import BuildConfig
from x2recon.errors import X2ReconInputError

#: The smallest build that still makes every output (≈ 5 s per case on 2 shared cores).
TINY = dict(views=["AP"], drr_size=32, x2b_size=16, n_points=2000, spider_grid=16,
            structures=["vertebrae_T7", "vertebrae_T8"])
TINY_ARGS = ["--views", "AP", "--drr-size", "32", "--x2b-size", "16", "--points", "2000", "--spider-grid", "16",
             "--structures", "vertebrae_T7,vertebrae_T8", "--quiet"]


def tiny(**kw) -> BuildConfig:
    return BuildConfig(**{**TINY, **kw})


def cli(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    """``x2recon ARGS`` in a fresh process (as a user runs it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "x2recon.cli", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, env=env, **kw)


def run_main(capsys, *args) -> tuple[int, str]:
    """``x2recon ARGS`` in this process (faster, where no fresh process is needed): (exit code, stderr)."""
    from x2recon.cli import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its size and checksum."""
    return {str(p.relative_to(folder)): (p.stat().st_size, sha256_file(p))
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def case_files(case: Path) -> dict:
    return json.loads((case / "meta.json").read_text())["files"]


@pytest.fixture
def chest_dir(tmp_path, chest_half):
    """A case folder ``src/chest/`` holding links to chest_half's CT and labels."""
    d = tmp_path / "src" / "chest"
    d.mkdir(parents=True)
    (d / "ct.nii.gz").symlink_to(chest_half[0])
    (d / "labels.nii.gz").symlink_to(chest_half[1])
    return d


# ------------------------------------------------------------------ 1. ids
def test_ids_are_normalised_and_duplicates_named_by_their_folders(tmp_path, shared_data):
    ct = shared_data / "lumbar_crop_verse" / "ct.nii.gz"
    for site in ("siteA", "siteB"):
        (tmp_path / site / "x").mkdir(parents=True)
        (tmp_path / site / "x" / "ct.nii.gz").symlink_to(ct)
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "ct.nii.gz").symlink_to(ct)
    (tmp_path / "odd name#1.nii.gz").symlink_to(ct)
    cases = discover([tmp_path / "siteA" / "x" / "ct.nii.gz", tmp_path / "siteB" / "x" / "ct.nii.gz",
                      tmp_path / "src" / "sub" / "..", tmp_path / "odd name#1.nii.gz"])
    assert [c.case_id for c in cases] == ["siteA_x", "siteB_x", "src", "odd_name_1"]
    # a list line with '..' in it names the folder it means, not '..'
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tmp_path}/src/sub/../ct.nii.gz\n")
    assert [c.case_id for c in discover([lst])] == ["src"]
    with pytest.raises(X2ReconInputError, match="given twice"):
        discover([tmp_path / "src", tmp_path / "src" / "ct.nii.gz"])


def test_an_unsafe_case_id_never_deletes_outside_its_folder(tmp_path, chest_half):
    out = tmp_path / "ds"
    (out / "cases" / "finished").mkdir(parents=True)
    keep = out / "cases" / "finished" / "meta.json"
    keep.write_text("{}")
    for cid in ("..", ".", "a/b", "../../x"):
        with pytest.raises(X2ReconInputError, match="not a plain name"):
            build_case(CaseInput(cid, str(chest_half[0]), str(chest_half[1])), out / "cases", config=tiny())
    assert keep.read_text() == "{}" and sorted(p.name for p in out.iterdir()) == ["cases"]


def test_a_symlinked_case_folder_is_refused_and_its_target_kept(tmp_path, chest_half):
    out, elsewhere = tmp_path / "ds" / "cases", tmp_path / "precious"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("keep me")
    out.mkdir(parents=True)
    (out / "chest").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(X2ReconInputError, match="symbolic link"):
        build_case(CaseInput("chest", str(chest_half[0]), str(chest_half[1])), out, config=tiny())
    assert (elsewhere / "data.txt").read_text() == "keep me" and not (out / "chest.partial").exists()


# ------------------------------------------------------------------ 2. one writer, verified cases
HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from x2recon.dataset.lock import dataset_lock
    with dataset_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()  # held until the test says so (no race with slow process start-ups)
        time.sleep(float(sys.argv[2]))
""")


@pytest.mark.slow
def test_a_second_writer_refuses_naming_the_holder_or_waits(tmp_path, shared_data):
    out = tmp_path / "ds"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out), "8"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        ct = shared_data / "lumbar_crop_verse"  # fails fast (too thin): only the locking matters here
        r = cli("build-dataset", "--ct", ct, "--out", out, *TINY_ARGS)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr and "--wait" in r.stderr, r.stderr
        r = cli("manifest", out)
        assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr, r.stderr
        assert not (out / "status").exists() and not (out / "manifest.json").exists()
        holder.stdin.write("release in 8 s\n")
        holder.stdin.flush()
        r = cli("build-dataset", "--ct", ct, "--out", out, "--wait", *TINY_ARGS)
        assert holder.poll() is not None, "the build did not wait for the holder"
        assert "in use" not in r.stderr and (out / "status" / "lumbar_crop_verse.json").is_file(), r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_done_case_with_a_missing_or_changed_file_is_rebuilt(tmp_path, chest_half):
    out = tmp_path / "ds"
    inp = CaseInput("chest", str(chest_half[0]), str(chest_half[1]))
    assert build_dataset([inp], out, tiny(), progress=False).done == ["chest"]
    case = out / "cases" / "chest"
    ref = case_files(case)
    mesh = case / "meshes" / "vertebrae_T7.ply"
    mesh.unlink()
    (case / "points.npz").write_bytes(b"changed")
    m = write_manifest(out)  # the manifest no longer calls it done
    assert m["counts"] == {"done": 0, "failed": 1} and "missing" in m["cases"][0]["reason"]
    s = build_dataset([inp], out, tiny(), progress=False)
    assert s.done == ["chest"] and not s.skipped, s.text()
    assert case_files(case) == ref and mesh.is_file() and sha256_file(case / "points.npz") == ref["points.npz"]


# ------------------------------------------------------------------ 3. workers die with their parent
def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.slow
def test_killing_a_parallel_build_leaves_no_worker_writing(tmp_path, chest_half):
    src = tmp_path / "src"
    for name in ("a", "b", "c"):
        (src / name).mkdir(parents=True)
        (src / name / "ct.nii.gz").symlink_to(chest_half[0])
        (src / name / "labels.nii.gz").symlink_to(chest_half[1])
    out = tmp_path / "ds"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-m", "x2recon.cli", "build-dataset", "--ct", str(src), "--out", str(out),
                               "--workers", "2", "--variants", "1", *TINY_ARGS], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "cases").glob("*.partial/*")):
            time.sleep(0.2)
        assert list((out / "cases").glob("*.partial/*")), "no worker started writing"
        workers = [p for p in _children(parent.pid)
                   if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(workers) == 2
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        time.sleep(2)
        assert not [p for p in workers if _alive(p)], "orphaned workers survived their parent"
        before = snapshot(out)
        time.sleep(3)
        assert snapshot(out) == before, "something was written after the build was killed"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        for p in locals().get("workers", []):
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_input_errors_cross_the_worker_process_boundary():
    """A worker's X2ReconInputError (a full disk, say) reaches the parent as itself: before, its
    two-argument constructor made unpickling fail and the pool reported a different error."""
    import pickle

    from x2recon.nn.checkpoint import CheckpointError

    for e in (X2ReconInputError("/ds/cases", "cannot write"), X2ReconInputError(None, "x"), CheckpointError("/c", "d")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.path == e.path


# ------------------------------------------------------------------ 4 and 10. the same bytes, whatever happened
def test_deformation_does_not_depend_on_torch_threads(chest_half):
    import torch

    from x2recon.dataset.augment import random_deformation
    from x2recon.io.volume import read_ct

    ct = read_ct(chest_half[0])
    d = random_deformation(11, ct)
    n = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(d.apply(ct, kind="ct").array)
    finally:
        torch.set_num_threads(n)
    assert np.array_equal(out[0], out[1])


KILL_AT = textwrap.dedent("""
    import os, sys
    from x2recon.dataset.case import CaseInput, build_case
    from x2recon.dataset.config import BuildConfig
    cfg = BuildConfig(**{cfg!r})
    def progress(f, msg):
        if msg == sys.argv[1]:
            os._exit(9)   # a hard kill: no cleanup, no exception handling
    build_case(CaseInput({cid!r}, {ct!r}, {labels!r}, None, {variant}), {out!r}, config=cfg, progress=progress)
""")


@pytest.mark.slow
def test_kill_at_every_stage_then_resume_gives_the_bytes_of_one_run(tmp_path, chest_half):
    """A variant killed at each stage in turn — each run a fresh process that builds the variant
    alone — then finished here, has exactly the files of an uninterrupted build that built its
    original first in this process (a DRR rendered before the variant's deformation used to
    change the deformed CT)."""
    cfg = tiny(variants=1)
    ref = tmp_path / "ref"
    s = build_dataset([CaseInput("chest", str(chest_half[0]), str(chest_half[1]))], ref, cfg, progress=False)
    assert s.done == ["chest", "chest_v01"], s.text()
    expect = case_files(ref / "cases" / "chest_v01")
    out = tmp_path / "killed" / "cases"
    script = KILL_AT.format(cfg={**TINY, "variants": 1}, cid="chest_v01", ct=str(chest_half[0]),
                            labels=str(chest_half[1]), variant=1, out=str(out))
    for stage in ("extracting meshes", "sampling occupancy", "rendering DRR AP", "resampling SPIDER targets"):
        r = subprocess.run([sys.executable, "-c", script, stage], capture_output=True, text=True)
        assert r.returncode == 9, r.stderr
    seen = []
    res = build_case(CaseInput("chest_v01", str(chest_half[0]), str(chest_half[1]), None, 1), out, config=cfg,
                     progress=lambda f, m: seen.append(m))
    assert res.status == "done" and seen[1:] == ["resampling SPIDER targets", "done"], (res.reason, seen)
    assert case_files(out / "chest_v01") == expect
    assert set(snapshot(out / "chest_v01")) == set(expect) | {"meta.json"}  # nothing left over
    for rel, digest in expect.items():
        assert sha256_file(out / "chest_v01" / rel) == digest, rel


# ------------------------------------------------------------------ 5. corrupt CTs
def _dicom_series(vol, folder: Path) -> list[Path]:
    """Write ``vol`` as a CT DICOM series (one file per slice) and return the files.  GDCM's writer
    leaves the process in the C locale (ASCII text encoding) after tagged slices: kept as it was."""
    from x2recon.io.volume import locale_kept

    with locale_kept():
        return _write_dicom_series(vol, folder)


def _write_dicom_series(vol, folder: Path) -> list[Path]:
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    img = sitk.Cast(vol.to_sitk(), sitk.sitkInt16)
    d = img.GetDirection()
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    files = []
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        tags = {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                "0020|000e": "1.2.826.0.1.3680043.2.1125.2", "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{x:.6f}" for x in img.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0037": "\\".join(f"{x:.6f}" for x in (d[0], d[3], d[6], d[1], d[4], d[7]))}
        for key, value in tags.items():
            s.SetMetaData(key, value)
        files.append(folder / f"s{k:03d}.dcm")
        w.SetFileName(str(files[-1]))
        w.Execute(s)
    return files


@pytest.fixture(scope="module")
def bad_cts(tmp_path_factory, shared_data):
    """name → (path, expected message) of broken CT inputs made from the lumbar crop."""
    import gzip

    import SimpleITK as sitk

    from x2recon.io.volume import read_ct

    d = tmp_path_factory.mktemp("bad_cts")
    src = shared_data / "lumbar_crop_verse" / "ct.nii.gz"
    data = src.read_bytes()
    (d / "trunc.nii.gz").write_bytes(data[: len(data) // 2])
    raw = gzip.decompress(data)
    (d / "trunc.nii").write_bytes(raw[:-4096])
    (d / "crc.nii.gz").write_bytes(data[:-8] + bytes(8))  # all data, wrong CRC and length
    img = sitk.ReadImage(str(src))
    nan = sitk.GetImageFromArray(np.full(sitk.GetArrayViewFromImage(img).shape, np.nan, np.float32))
    nan.CopyInformation(img)
    sitk.WriteImage(nan, str(d / "nan.mha"))
    for name, spacing in (("coarse", "1000 1.5 1.5"), ("zero", "0 1.5 1.5"), ("nan_spacing", "nan 1.5 1.5"),
                          ("fine", "0.01 1.5 1.5")):
        sitk.WriteImage(img, str(d / f"{name}.mha"))
        text = (d / f"{name}.mha").read_bytes().replace(b"ElementSpacing = 1.5 1.5 1.5", f"ElementSpacing = {spacing}".encode())
        (d / f"{name}.mha").write_bytes(text)
    vol = read_ct(src)
    files = _dicom_series(vol, d / "dicom_ok")
    shutil.copytree(d / "dicom_ok", d / "dicom_corrupt")
    (d / "dicom_corrupt" / files[10].name).write_bytes(files[10].read_bytes()[:300])
    shutil.copytree(d / "dicom_ok", d / "dicom_gap")
    (d / "dicom_gap" / files[20].name).unlink()
    os.mkfifo(d / "fifo.nii.gz")
    return d, {
        "trunc.nii.gz": "truncated or corrupt gzip stream",
        "trunc.nii": "truncated NIfTI file: the header announces",
        "crc.nii.gz": "truncated or corrupt gzip stream",
        "nan.mha": "voxels are NaN or infinite",
        "coarse.mha": r"implausible voxel spacing \[1000.0",
        "zero.mha": "[Zz]ero-valued spacing|implausible voxel spacing",
        "nan_spacing.mha": "[Zz]ero-valued spacing|implausible voxel spacing",
        "fine.mha": "implausible voxel spacing",
        "dicom_corrupt": "s010.dcm: DICOM slice cannot be read",
        "dicom_gap": "3.00 mm between s019.dcm and s021.dcm",
        "fifo.nii.gz": "not a regular file",
    }


BAD_CT_NAMES = ["trunc.nii.gz", "trunc.nii", "crc.nii.gz", "nan.mha", "coarse.mha", "zero.mha", "nan_spacing.mha",
                "fine.mha", "dicom_corrupt", "dicom_gap", "fifo.nii.gz"]


@pytest.mark.parametrize("name", BAD_CT_NAMES)
def test_a_broken_ct_is_refused_by_name(bad_cts, name):
    from x2recon.io.volume import read_ct

    d, expect = bad_cts
    with pytest.raises(X2ReconInputError, match=expect[name]) as e:
        read_ct(d / name)
    assert str(d / name) in str(e.value) or name in str(e.value)


def test_writing_dicom_leaves_the_process_locale_alone(tmp_path, shared_data):
    """GDCM's writer switched this process to the C locale (ASCII text encoding: every later test that
    read a UTF-8 file without an encoding failed); ``locale_kept`` puts back what was there."""
    import locale

    from x2recon.io.volume import locale_kept, read_ct

    before = locale.setlocale(locale.LC_ALL)
    with locale_kept():
        _write_dicom_series(read_ct(shared_data / "lumbar_crop_verse" / "ct.nii.gz"), tmp_path / "dcm")
    assert locale.setlocale(locale.LC_ALL) == before


def test_a_good_dicom_series_reads_as_its_volume(bad_cts, shared_data):
    from x2recon.io.volume import read_ct

    a, b = read_ct(bad_cts[0] / "dicom_ok"), read_ct(shared_data / "lumbar_crop_verse" / "ct.nii.gz")
    assert np.array_equal(a.array, b.array) and np.allclose(a.spacing, b.spacing)


@pytest.mark.slow
def test_devices_and_fifos_are_refused_and_never_read(tmp_path, bad_cts):
    fifo = bad_cts[0] / "fifo.nii.gz"
    r = cli("drr", "--ct", fifo, "--out", tmp_path / "x.png", timeout=60)  # used to hang reading the FIFO
    assert r.returncode == 2 and "not a regular file" in r.stderr and "Traceback" not in r.stderr, r.stderr
    for ct in ("/dev/zero", fifo):
        r = cli("build-dataset", "--ct", ct, "--out", tmp_path / "ds", *TINY_ARGS, timeout=60)
        assert r.returncode == 2 and f"{ct}: not a regular file" in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "ds" / "status").exists()


# ------------------------------------------------------------------ 6. manifest
@pytest.mark.slow
def test_manifest_refuses_what_is_not_a_dataset_and_creates_nothing(tmp_path):
    r = cli("manifest", tmp_path / "nowhere")
    assert r.returncode == 2 and "dataset folder not found" in r.stderr and not (tmp_path / "nowhere").exists()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    r = cli("manifest", tmp_path / "photos")
    assert r.returncode == 2 and "not an x2recon dataset" in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["cat.jpg"]


def test_manifest_rebuilds_status_and_skips_bad_records(tmp_path, chest_half):
    out = tmp_path / "ds"
    inp = CaseInput("chest", str(chest_half[0]), str(chest_half[1]))
    assert build_dataset([inp], out, tiny(), progress=False).done == ["chest"]
    shutil.rmtree(out / "status")  # a dataset copied without status/
    r = cli("manifest", out)
    assert r.returncode == 0 and "1 done" in r.stdout and "rebuilt" in r.stderr, r.stdout + r.stderr
    assert (out / "splits" / "train.txt").read_text() == "chest\n"
    # a status record without case_id, and one that is not JSON: named, skipped; builds go on
    (out / "status" / "nameless.json").write_text('{"status": "done"}')
    (out / "status" / "garbage.json").write_bytes(b"\xff\x00")
    s = build_dataset([inp], out, tiny(), progress=False)
    assert s.skipped == ["chest"] and "WARNING" in s.text() and "nameless.json" in s.text()
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["done"] == 1 and (out / "splits" / "train.txt").read_text() == "chest\n"
    assert any("nameless.json: status record lacks 'case_id'" in p for p in m["problems"])
    assert any("garbage.json: unreadable status record" in p for p in m["problems"])
    # the split policy is recorded and kept by a later manifest; an impossible one is refused by name
    r = cli("manifest", out, "--split-by", "variant")
    assert r.returncode == 0 and json.loads((out / "manifest.json").read_text())["split_by"] == "variant"
    assert cli("manifest", out).returncode == 0 and json.loads((out / "manifest.json").read_text())["split_by"] == "variant"
    r = cli("manifest", out, "--split-by", "patient")
    assert r.returncode == 2 and "--split-by patient: splitting by patient needs at least 3 CTs" in r.stderr, r.stderr


# ------------------------------------------------------------------ 7. geometry
def _geometry(**change) -> dict:
    from x2recon.geometry import ProjectionGeometry

    d = ProjectionGeometry.from_view("AP", (0.0, 0.0, 0.0), size=(64, 64)).to_dict()
    d.update(change)
    return d


BAD_GEOMETRIES = {
    "source on the detector": (dict(source=[0.0, 200.0, 0.0]), "source lies on the detector plane"),
    "source in the detector plane": (dict(source=[300.0, 200.0, 0.0]), "source lies on the detector plane"),
    "source behind the detector": (dict(source=[0.0, 400.0, 0.0]), "isocentre must lie between"),
    "zero pixel size": (dict(spacing=[0.0, 1.0]), "pixel spacing must be two positive numbers"),
    "nan pixel size": (dict(spacing=[float("nan"), 1.0]), "pixel spacing must be two positive numbers"),
    "no pixels": (dict(size=[0, 64]), r"size must be \(width, height\)"),
    "too many pixels": (dict(size=[20000, 8]), r"size must be \(width, height\)"),
    "fractional pixels": (dict(size=[64.5, 64]), r"size must be \(width, height\)"),
    "non-orthogonal axes": (dict(v=[0.6, 0.0, -0.8]), "orthonormal"),
}


@pytest.mark.parametrize("name", list(BAD_GEOMETRIES))
def test_a_degenerate_geometry_is_refused_by_drr(tmp_path, capsys, shared_data, name):
    import re

    change, message = BAD_GEOMETRIES[name]
    g = tmp_path / "g.json"
    g.write_text(json.dumps(_geometry(**change)))
    code, err = run_main(capsys, "drr", "--ct", shared_data / "lumbar_crop_verse" / "ct.nii.gz", "--geometry", g,
                         "--out", tmp_path / "x.png")
    assert code == 2 and str(g) in err and re.search(message, err), err
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------ 8. options
BAD_OPTIONS = [
    ("build-dataset", ["--drr-size", "0"], "--drr-size"),
    ("build-dataset", ["--x2b-size", "-1"], "--x2b-size"),
    ("build-dataset", ["--angles", "abc"], "--angles"),
    ("build-dataset", ["--angles", "10,nan"], "--angles"),
    ("build-dataset", ["--views", "AP,XX"], "--views"),
    ("build-dataset", ["--structures", ""], "--structures"),
    ("build-dataset", ["--structures", "ribs,wings"], "--structures"),
    ("build-dataset", ["--points", "-5"], "--points"),
    ("build-dataset", ["--variants", "-1"], "--variants"),
    ("build-dataset", ["--workers", "0"], "--workers"),
    ("build-dataset", ["--spider-grid", "0"], "--spider-grid"),
    ("build-dataset", ["--near-surface", "1.5"], "--near-surface"),
    ("build-dataset", ["--sdd", "-1"], "--sdd"),
    ("build-dataset", ["--shard", "3/2"], "--shard"),
    ("build-dataset", ["--seed", "-1"], "--seed"),
    ("drr", ["--size", "0"], "--size"),
    ("drr", ["--isocenter", "abc"], "--isocenter"),
    ("drr", ["--isocenter", "1,2"], "--isocenter"),
    ("drr", ["--view", "sideways"], "--view"),
]


@pytest.mark.parametrize("command,extra,option", BAD_OPTIONS, ids=[" ".join(o[1]) or o[2] for o in BAD_OPTIONS])
def test_bad_options_are_named_before_any_work(tmp_path, capsys, command, extra, option):
    from x2recon.cli import main

    out = tmp_path / ("ds" if command == "build-dataset" else "x.png")
    with pytest.raises(SystemExit) as e:
        main([command, "--ct", str(tmp_path / "no_ct_needed"), "--out", str(out), *extra])
    assert e.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ 9. unwritable and full disks
def test_out_that_is_a_file_is_refused(tmp_path, chest_half):
    f = tmp_path / "file"
    f.write_text("mine")
    with pytest.raises(X2ReconInputError, match="not a folder"):
        build_dataset([CaseInput("chest", str(chest_half[0]), str(chest_half[1]))], f, tiny(), progress=False)
    assert f.read_text() == "mine"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (needs root; skipped with the reason where mounting is not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_build_clearly_and_it_resumes(tmp_path, chest_dir, small_tmpfs):
    out = small_tmpfs / "ds"
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (2 * 1024 * 1024 - 200 * 1024))  # 200 KiB left: the case cannot fit
    r = cli("build-dataset", "--ct", chest_dir, "--out", out, *TINY_ARGS)
    assert r.returncode == 2 and "No space left on device" in r.stderr and "resume" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (out / "cases" / "chest").exists()
    filler.unlink()
    r = cli("build-dataset", "--ct", chest_dir, "--out", out, *TINY_ARGS)
    assert r.returncode == 0 and "1 built" in r.stdout, r.stdout + r.stderr
    assert json.loads((out / "manifest.json").read_text())["counts"] == {"done": 1, "failed": 0}


@pytest.mark.slow
def test_a_read_only_dataset_is_refused_by_name(tmp_path, chest_dir, small_tmpfs):
    (small_tmpfs / "ds" / "cases").mkdir(parents=True)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    r = cli("build-dataset", "--ct", chest_dir, "--out", small_tmpfs / "ds", *TINY_ARGS)
    assert r.returncode == 2 and "argument --out" in r.stderr and "Read-only file system" in r.stderr, r.stderr
    r = cli("manifest", small_tmpfs / "ds")
    assert r.returncode == 2 and "Read-only file system" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(X2ReconInputError, match="Read-only file system"):
        build_dataset([CaseInput("chest", str(chest_dir / "ct.nii.gz"))], small_tmpfs / "ds", tiny(), progress=False)
