"""Every ``x2recon`` command over a table of bad inputs, as a careless or hostile user types them.

Each row must end in a non-zero exit with a message that names the file or option at fault, no Python
traceback, and nothing changed outside the row's ``--out`` (``out/`` in a scratch tree, which is also the
working directory).  Rows run in-process through ``x2recon.cli.main`` (fast); a few run as a real
``python -m x2recon.cli`` process.  Also here: a broken stdout pipe, bugs that must keep their
traceback, and the help text of every option."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from x2recon.cli import COMMAND_MODULES, build_parser, main

CT = "{ct}"
OUT = "{root}/out"

# (row id, argv, substrings the error message must contain: the file or option at fault)
ROWS = [
    # build-dataset / drr / manifest
    ("build-dataset-missing-ct", f"build-dataset --ct {{missing}} --out {OUT}/ds", ["missing.nii.gz", "not found"]),
    ("build-dataset-out-is-file", "build-dataset --ct {missing} --out {afile}", ["--out", "a_file", "not a folder"]),
    ("drr-missing-ct", f"drr --ct {{missing}} --out {OUT}/x.png", ["missing.nii.gz", "not found"]),
    ("drr-text-ct", f"drr --ct {{text}} --out {OUT}/x.png", ["notes.txt", "cannot read"]),
    ("drr-geometry-100000px", f"drr --ct {CT} --geometry {{huge_geom}} --out {OUT}/x.png", ["huge_geometry.json", "100000"]),
    ("drr-out-inside-file", f"drr --ct {CT} --out {{afile}}/x.png", ["--out", "a_file", "not a folder"]),
    ("drr-out-is-folder", f"drr --ct {CT} --out {{adir}}", ["--out", "a_folder", "is a folder"]),
    ("drr-size-0", f"drr --ct {CT} --size 0 --out {OUT}/x.png", ["--size"]),
    ("manifest-missing", "manifest {root}/no_such_dataset", ["no_such_dataset", "not found"]),
    ("manifest-file", "manifest {afile}", ["a_file"]),
    # train
    ("train-x2b-steps-negative", f"train x2b --data {{nodata}} --out {OUT}/run --steps -5", ["--steps", "-5"]),
    ("train-x2b-image-size-0", f"train x2b --data {{nodata}} --out {OUT}/run --image-size 0", ["--image-size"]),
    ("train-x2b-device-tpu9", f"train x2b --data {{nodata}} --out {OUT}/run --device tpu9", ["--device", "tpu9"]),
    ("train-x2b-out-is-file", "train x2b --data {nodata} --out {afile}", ["--out", "a_file", "not a folder"]),
    ("train-x2b-resume-text", f"train x2b --data {{nodata}} --out {OUT}/run --resume {{text}}", ["--resume", "notes.txt"]),
    ("train-x2b2-resume-pickle", f"train x2b2 --data {{nodata}} --out {OUT}/run --resume {{pickle}}",
     ["--resume", "renamed_pickle.safetensors"]),
    ("train-x2b-no-dataset", f"train x2b --data {{nodata}} --out {OUT}/run", ["nodata", "not an x2recon dataset"]),
    ("train-x2b2-heads-0", f"train x2b2 --data {{nodata}} --out {OUT}/run --heads 0", ["--heads"]),
    ("train-spider-fraction-2", f"train spider --data {{nodata}} --out {OUT}/run --foreground-fraction 2",
     ["--foreground-fraction"]),
    ("train-spider-lr-negative", f"train spider --data {{nodata}} --out {OUT}/run --lr -1", ["--lr"]),
    ("train-spider-out-is-file", "train spider --data {nodata} --out {afile}", ["--out", "a_file"]),
    ("train-detector-epochs-0", f"train detector --data {{nodata}} --out {OUT}/det --epochs 0", ["--epochs"]),
    ("train-detector-device", f"train detector --data {{nodata}} --out {OUT}/det --device tpu9", ["--device"]),
    ("train-detector-no-dataset", f"train detector --data {{nodata}} --out {OUT}/det", ["nodata"]),
    # reconstruct
    ("reconstruct-faces-negative", f"reconstruct --xray {{tiny_png}} --model {{text}} --out {OUT}/m.stl --faces -5",
     ["--faces", "-5"]),
    ("reconstruct-resolution-100", f"reconstruct --xray {{tiny_png}} --model {{text}} --out {OUT}/m.stl --resolution 100",
     ["--resolution", "32·2^k"]),
    ("reconstruct-threshold-1.5", f"reconstruct --xray {{tiny_png}} --model {{text}} --out {OUT}/m.stl --threshold 1.5",
     ["--threshold"]),
    ("reconstruct-device-tpu9", f"reconstruct --xray {{tiny_png}} --model {{text}} --out {OUT}/m.stl --device tpu9",
     ["--device", "tpu9"]),
    ("reconstruct-out-is-folder", "reconstruct --xray {tiny_png} --model {text} --out {adir}", ["--out", "a_folder"]),
    ("reconstruct-out-inside-file", "reconstruct --xray {tiny_png} --model {text} --out {afile}/m.stl",
     ["--out", "a_file"]),
    ("reconstruct-xray-30000px", f"reconstruct --xray {{huge_png}} --model {{text}} --out {OUT}/m.stl",
     ["huge.png", "30000×30000"]),
    ("reconstruct-xray-8px", f"reconstruct --xray {{tiny_png}} --model {{text}} --out {OUT}/m.stl", ["tiny.png", "8×8"]),
    ("reconstruct-xray-not-png", f"reconstruct --xray {{fake_png}} --model {{text}} --out {OUT}/m.stl",
     ["fake.png", "not a PNG"]),
    ("reconstruct-geometry-100000px", f"reconstruct --xray {{ok_png}} --geometry {{huge_geom}} --model {{text}} "
     f"--out {OUT}/m.stl", ["huge_geometry.json", "100000"]),
    ("reconstruct-model-text", f"reconstruct --xray {{ok_png}} --model {{text}} --out {OUT}/m.stl",
     ["notes.txt", "not a safetensors"]),
    ("reconstruct-model-nested", f"reconstruct --xray {{ok_png}} --model {{nested}} --out {OUT}/m.stl",
     ["nested.safetensors", "nested too deeply"]),
    ("reconstruct-model-list", f"reconstruct --xray {{ok_png}} --model {{list}} --out {OUT}/m.stl",
     ["list.safetensors", "JSON list"]),
    ("reconstruct-model-no-model-key", f"reconstruct --xray {{ok_png}} --model {{nomodel}} --out {OUT}/m.stl",
     ["nomodel.safetensors", "'model'"]),
    ("reconstruct-model-empty", f"reconstruct --xray {{ok_png}} --model {{empty}} --out {OUT}/m.stl",
     ["empty.safetensors"]),
    # spider
    ("spider-resolution-0", f"spider --pa {{ok_png}} --lat {{ok_png}} --model {{text}} --out {OUT}/ct.nii.gz --resolution 0",
     ["--resolution"]),
    ("spider-model-text", f"spider --pa {{ok_png}} --lat {{ok_png}} --model {{text}} --out {OUT}/ct.nii.gz", ["notes.txt"]),
    ("spider-model-pickle", f"spider --pa {{ok_png}} --lat {{ok_png}} --model {{pickle}} --out {OUT}/ct.nii.gz",
     ["renamed_pickle.safetensors"]),
    ("spider-out-is-folder", "spider --pa {ok_png} --lat {ok_png} --model {text} --out {adir}", ["--out", "a_folder"]),
    # evaluate
    ("evaluate-points-0", f"evaluate --model {{text}} --data {{nodata}} --out {OUT}/e.csv --points 0", ["--points"]),
    ("evaluate-resolution-100", f"evaluate --model {{text}} --data {{nodata}} --out {OUT}/e.csv --resolution 100",
     ["--resolution"]),
    ("evaluate-model-nested", f"evaluate --model {{nested}} --data {{nodata}} --out {OUT}/e.csv", ["nested.safetensors"]),
    ("evaluate-model-list", f"evaluate --model {{list}} --data {{nodata}} --out {OUT}/e.csv", ["list.safetensors"]),
    ("evaluate-meshes-is-file", "evaluate --model {text} --data {nodata} --out {root}/out/e.csv --meshes {afile}",
     ["--meshes", "a_file"]),
    # info
    ("info-nested", "info {nested}", ["nested.safetensors", "nested too deeply"]),
    ("info-list", "info {list}", ["list.safetensors", "JSON list"]),
    ("info-no-model-key", "info {nomodel}", ["nomodel.safetensors", "key 'model'"]),
    ("info-pickle", "info {pickle}", ["renamed_pickle.safetensors", "not a safetensors"]),
    ("info-text", "info {text}", ["notes.txt", "not a safetensors"]),
    ("info-missing", "info {missing}", ["missing.nii.gz", "not found"]),
    ("info-empty", "info {empty}", ["empty.safetensors"]),
    # demo
    ("demo-resolution-100", f"demo --out {OUT}/demo --resolution 100", ["--resolution"]),
    ("demo-device-tpu9", f"demo --out {OUT}/demo --device tpu9", ["--device"]),
    ("demo-out-is-file", "demo --out {afile}", ["--out", "a_file"]),
    # register
    ("register-max-iter-0", f"register {{mesh}} {{mesh}} --out {OUT}/r.ply --max-iter 0", ["--max-iter"]),
    ("register-max-iter-negative", f"register {{mesh}} {{mesh}} --out {OUT}/r.ply --max-iter -1", ["--max-iter"]),
    ("register-w-1", f"register {{mesh}} {{mesh}} --out {OUT}/r.ply --w 1", ["--w"]),
    ("register-beta-negative", f"register {{mesh}} {{mesh}} --out {OUT}/r.ply --beta -2", ["--beta"]),
    ("register-missing-source", f"register {{missing}} {{mesh}} --out {OUT}/r.ply", ["missing.nii.gz", "not found"]),
    ("register-text-target", f"register {{mesh}} {{text}} --out {OUT}/r.ply", ["notes.txt"]),
    ("register-out-suffix", f"register {{mesh}} {{mesh}} --out {OUT}/r.xyz2", ["--out", "r.xyz2"]),
    ("register-out-is-folder", "register {mesh} {mesh} --out {adir}", ["--out", "a_folder"]),
    # template build / detect
    ("template-no-inputs", f"template build --out {OUT}/lib", ["--data"]),
    ("template-no-dataset", f"template build --data {{nodata}} --out {OUT}/lib", ["nodata"]),
    ("template-out-is-file", "template build --data {nodata} --out {afile}", ["--out", "a_file"]),
    ("template-skel-units", f"template build --data {{nodata}} --out {OUT}/lib --skel-units km", ["--skel-units"]),
    ("detect-xray-30000px", f"detect {{huge_png}} --detector {{text}} --out {OUT}/b.json", ["huge.png", "30000×30000"]),
    ("detect-xray-not-png", f"detect {{fake_png}} --detector {{text}} --out {OUT}/b.json", ["fake.png"]),
    ("detect-conf-2", f"detect {{ok_png}} --detector {{text}} --out {OUT}/b.json --conf 2", ["--conf"]),
    ("detect-device", f"detect {{ok_png}} --detector {{text}} --out {OUT}/b.json --device tpu", ["--device"]),
    ("detect-out-is-folder", "detect {ok_png} --detector {text} --out {adir}", ["--out", "a_folder"]),
]

# issue 20 §8: inputs too large, mislabelled or ambiguous (Testing/test_input_limits.py holds the finer tests)
ROWS += [
    ("drr-ct-over-voxel-limit", f"drr --ct {{big_ct}} --out {OUT}/x.png", ["big_ct.nii", "1024×1024×800", "268 M voxels"]),
    ("drr-ct-float64-over-voxel-limit", f"drr --ct {{big_f64}} --out {OUT}/x.png", ["big_f64.nii", "MAX_VOLUME_VOXELS"]),
    ("drr-ct-rescaled-twice", f"drr --ct {{twice_ct}} --out {OUT}/x.png", ["twice.nii.gz", "applied twice"]),
    ("drr-ct-int8-clipped", f"drr --ct {{int8_ct}} --out {OUT}/x.png", ["int8.nii.gz", "no voxels above 300 HU"]),
    ("drr-ct-mirrored-sform", f"drr --ct {{mirrored_ct}} --out {OUT}/x.png", ["mirrored.nii", "mirror images"]),
    ("drr-geometry-latin1", f"drr --ct {CT} --geometry {{latin1_geom}} --out {OUT}/x.png",
     ["latin1_geometry.json", "not UTF-8"]),
    ("drr-geometry-nested", f"drr --ct {CT} --geometry {{nested_geom}} --out {OUT}/x.png",
     ["nested_geometry.json", "nested 100,000 levels"]),
    ("drr-geometry-box-nan", f"drr --ct {CT} --geometry {{nan_box_geom}} --out {OUT}/x.png",
     ["nan_box_geometry.json", "box_size", "nan"]),
    ("drr-geometry-box-1e9", f"drr --ct {CT} --geometry {{huge_box_geom}} --out {OUT}/x.png",
     ["huge_box_geometry.json", "box_size", "1e+09"]),
    ("build-dataset-threshold-hu-nan", f"build-dataset --ct {CT} --out {OUT}/ds --threshold-hu nan",
     ["--threshold-hu", "nan"]),
    ("build-dataset-box-size-1e9", f"build-dataset --ct {CT} --out {OUT}/ds --box-size 1e9", ["--box-size", "1e9"]),
    ("drr-sdd-1e9", f"drr --ct {CT} --sdd 1e9 --out {OUT}/x.png", ["--sdd", "1e9"]),
    ("build-dataset-list-missing", f"build-dataset --ct {{missing_list}} --out {OUT}/ds",
     ["missing_list.txt", "not found", "(7 of 7 listed paths are missing)"]),
    ("build-dataset-list-latin1", f"build-dataset --ct {{latin1_list}} --out {OUT}/ds", ["latin1_list.txt", "not UTF-8"]),
    ("register-10m-face-source", f"register {{big_stl}} {{mesh}} --out {OUT}/r.ply",
     ["big.stl", "10,000,000 triangles", "1,000,000 points"]),
    ("register-10m-face-target-cpd", f"register {{mesh}} {{big_stl}} --method cpd --out {OUT}/r.ply",
     ["big.stl", "target has 10,000,000 triangles"]),
    ("register-stl-header-lies", f"register {{lie_stl}} {{mesh}} --out {OUT}/r.ply", ["lie.stl", "announces 1,000 triangles"]),
]

if "compare" in COMMAND_MODULES:
    ROWS += [("compare-missing", "compare {missing} {mesh}", ["missing.nii.gz", "not found"]),
             ("compare-text", "compare {text} {mesh}", ["notes.txt"]),
             ("compare-stl-header-lies", "compare {lie_stl} {mesh}", ["lie.stl", "announces 1,000 triangles"])]

# commands that must refuse an --out in a read-only folder before doing anything
READ_ONLY_ROWS = [
    ("build-dataset", "build-dataset --ct {ct} --out {ro}/ds"),
    ("drr", "drr --ct {ct} --out {ro}/x.png"),
    ("train-x2b", "train x2b --data {nodata} --out {ro}/run"),
    ("train-spider", "train spider --data {nodata} --out {ro}/run"),
    ("train-detector", "train detector --data {nodata} --out {ro}/det"),
    ("reconstruct", "reconstruct --xray {ok_png} --model {text} --out {ro}/m.stl"),
    ("spider", "spider --pa {ok_png} --lat {ok_png} --model {text} --out {ro}/ct.nii.gz"),
    ("evaluate", "evaluate --model {text} --data {nodata} --out {ro}/e.csv"),
    ("register", "register {mesh} {mesh} --out {ro}/r.ply"),
    ("template", "template build --data {nodata} --out {ro}/lib"),
    ("detect", "detect {ok_png} --detector {text} --out {ro}/b.json"),
    ("demo", "demo --out {ro}/demo"),
]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` pixels (8-bit grey) with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _checkpoint_with_config(path: Path, text: str) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path), metadata={"x2recon": text})
    return path


def _limit_inputs(root: Path, big: Path, shared_data: Path) -> dict:
    """Issue 20 §8's inputs: header-only CTs over the voxel limit, CTs whose HU cannot be right (from the lumbar
    crop), a mirrored sform, geometry JSON in Latin-1 / nested / with an absurd box, CT lists with missing paths
    or in Latin-1, a sparse 10 M-triangle STL (in ``big``, outside the snapshotted tree) and an STL whose header
    lies.  All small or sparse: nothing here allocates more than the lumbar crop."""
    import numpy as np
    import SimpleITK as sitk
    import trimesh

    from x2recon.geometry import ProjectionGeometry
    from x2recon.io.mesh import write_mesh

    f = {}
    for name, dtype in (("big_ct", np.int16), ("big_f64", np.float64)):
        small = sitk.GetImageFromArray(np.zeros((2, 2, 2), dtype))
        small.SetSpacing((0.5, 0.5, 0.5))
        sitk.WriteImage(small, str(root / f"{name}.nii"))
        hdr = bytearray((root / f"{name}.nii").read_bytes()[:352])
        struct.pack_into("<4h", hdr, 40, 3, 1024, 1024, 800)  # a 0.5 mm CT's header without its 1.6–6.7 GB
        f[name] = root / f"{name}.nii"
        f[name].write_bytes(bytes(hdr))
    img = sitk.ReadImage(str(shared_data / "lumbar_crop_verse" / "ct.nii.gz"))
    hu = sitk.GetArrayFromImage(img)
    for name, arr in (("twice_ct", (hu.astype(np.int32) - 1024).clip(-2048, None).astype(np.int16)),
                      ("int8_ct", hu.clip(-128, 127).astype(np.int8))):
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        f[name] = root / f"{name.removesuffix('_ct')}.nii.gz"
        sitk.WriteImage(out, str(f[name]))
    sitk.WriteImage(img, str(root / "mirrored.nii"))
    raw = bytearray((root / "mirrored.nii").read_bytes())
    srow = np.array(struct.unpack("<12f", raw[280:328])).reshape(3, 4)
    srow[:, 0] *= -1  # the sform mirrored against the qform
    raw[280:328] = struct.pack("<12f", *srow.ravel())
    f["mirrored_ct"] = root / "mirrored.nii"
    f["mirrored_ct"].write_bytes(bytes(raw))
    geometry = ProjectionGeometry.from_view("AP", (0, 0, 0), size=(64, 64)).to_dict()
    f["latin1_geom"] = root / "latin1_geometry.json"
    f["latin1_geom"].write_bytes(json.dumps({**geometry, "name": "salle Ménard"}, ensure_ascii=False).encode("latin-1"))
    f["nested_geom"] = root / "nested_geometry.json"
    f["nested_geom"].write_text("[" * 100_000 + "]" * 100_000)
    for name, box in (("nan_box_geom", float("nan")), ("huge_box_geom", 1e9)):
        f[name] = root / f"{name.removesuffix('_geom')}_geometry.json"
        f[name].write_text(json.dumps({**geometry, "box_size": box}))
    f["missing_list"] = root / "missing_list.txt"
    f["missing_list"].write_text("\ufeff# seven scans\n" + "".join(f"/nowhere/ct_{i}.nii.gz\n" for i in range(7)))
    f["latin1_list"] = root / "latin1_list.txt"
    f["latin1_list"].write_bytes("/data/Pérez/ct.nii.gz\n".encode("latin-1"))
    f["big_stl"] = big / "big.stl"
    with open(f["big_stl"], "wb") as fh:  # sparse: 500 MB announced, no block written
        fh.write(b"binary STL".ljust(80) + struct.pack("<I", 10_000_000))
        fh.truncate(84 + 50 * 10_000_000)
    f["lie_stl"] = root / "lie.stl"
    write_mesh(trimesh.creation.icosphere(1), f["lie_stl"])  # 80 triangles
    data = bytearray(f["lie_stl"].read_bytes())
    data[80:84] = struct.pack("<I", 1000)
    f["lie_stl"].write_bytes(bytes(data))
    return f


@pytest.fixture(scope="module")
def tree(tmp_path_factory, chest_half, shared_data):
    """A scratch tree of bad (and a few good) inputs; returns the names the rows format with."""
    import numpy as np
    import torch
    import trimesh

    from x2recon.geometry import ProjectionGeometry
    from x2recon.io.image import write_png16

    root = tmp_path_factory.mktemp("fuzz")
    f = {"root": root, "ct": chest_half[0], "nodata": root / "nodata", "missing": root / "missing.nii.gz"}
    f["text"] = root / "notes.txt"
    f["text"].write_text("hello\n")
    f["empty"] = root / "empty.safetensors"
    f["empty"].write_bytes(b"")
    f["pickle"] = root / "renamed_pickle.safetensors"
    torch.save({"w": torch.zeros(2)}, f["pickle"])
    f["nested"] = _checkpoint_with_config(root / "nested.safetensors", "[" * 200_000 + "]" * 200_000)
    f["list"] = _checkpoint_with_config(root / "list.safetensors", json.dumps([1, 2]))
    f["nomodel"] = _checkpoint_with_config(root / "nomodel.safetensors",
                                           json.dumps({"format": "x2recon.checkpoint/1", "network": "x2b"}))
    f["huge_png"] = root / "huge.png"
    f["huge_png"].write_bytes(png_header_only(30000, 30000))
    f["fake_png"] = root / "fake.png"
    f["fake_png"].write_text("not a png")
    f["tiny_png"] = root / "tiny.png"
    write_png16(np.arange(64, dtype=np.uint16).reshape(8, 8) * 100, f["tiny_png"])
    f["ok_png"] = root / "ok.png"
    write_png16((np.random.default_rng(0).random((64, 64)) * 60000).astype(np.uint16), f["ok_png"])
    geometry = ProjectionGeometry.from_view("AP", (0, 0, 0), size=(64, 64)).to_dict()
    geometry["size"] = [100000, 100000]
    f["huge_geom"] = root / "huge_geometry.json"
    f["huge_geom"].write_text(json.dumps(geometry))
    f["afile"] = root / "a_file"
    f["afile"].write_text("x")
    f["adir"] = root / "a_folder"
    f["adir"].mkdir()
    f["mesh"] = root / "sphere.ply"
    trimesh.creation.icosphere(2).export(f["mesh"])
    f.update(_limit_inputs(root, tmp_path_factory.mktemp("fuzz_big"), shared_data))
    return {k: str(v) for k, v in f.items()}


def snapshot(root: Path, skip: str = "out") -> dict:
    """Every path under ``root`` except ``root/skip``: kind, size and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts[:1] == (skip,):
            continue
        out[str(rel)] = ("dir", sorted(n for n in dirnames + filenames if not (rel == Path(".") and n == skip)))
        for n in filenames:
            p = Path(dirpath) / n
            out[str(rel / n)] = ("file", p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def _check(code, err: str, expect: list[str], fmt: dict, before: dict, root: Path) -> None:
    assert code not in (0, None), f"exit {code}; stderr: {err[-500:]}"
    assert "Traceback" not in err, err[-2000:]
    assert "error:" in err, err[-500:]
    assert not re.search(r"\bnp\.\w+\(|\barray\(", err), f"a numpy repr in the message: {err[-500:]}"
    for e in expect:
        assert e.format(**fmt) in err, f"{e!r} not in {err[-500:]!r}"
    assert snapshot(root) == before, "files outside --out changed"


@pytest.mark.parametrize("argv, expect", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_a_clear_error(tree, argv, expect, capsys, monkeypatch):
    root = Path(tree["root"])
    monkeypatch.chdir(root)  # a command that writes into the working directory changes the snapshot
    before = snapshot(root)
    code, err = run_in_process(argv.format(**tree).split(), capsys)
    _check(code, err, expect, tree, before, root)


@pytest.fixture(scope="module")
def read_only_dir(tree):
    """A folder no one can write to: a read-only tmpfs (root, which ignores file modes), else mode 0555."""
    ro = Path(tree["root"]) / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root without permission to mount a read-only file system")
    else:
        ro.chmod(0o555)
    yield ro
    if mounted:
        subprocess.run(["umount", str(ro)], check=True)
    else:
        ro.chmod(0o755)


@pytest.mark.parametrize("argv", [r[1] for r in READ_ONLY_ROWS], ids=[r[0] for r in READ_ONLY_ROWS])
def test_read_only_out_is_refused_before_any_work(tree, read_only_dir, argv, capsys, monkeypatch):
    root = Path(tree["root"])
    monkeypatch.chdir(root)
    fmt = {**tree, "ro": str(read_only_dir)}
    before = snapshot(root)
    code, err = run_in_process(argv.format(**fmt).split(), capsys)
    _check(code, err, ["argument --out", str(read_only_dir), "cannot write"], fmt, before, root)


# parse-time errors (no torch import: a real process stays fast); the broken-pipe test below runs a full command
SUBPROCESS_ROWS = [
    ("reconstruct-faces-negative", "reconstruct --xray {ok_png} --model {text} --out {root}/out/m.stl --faces -5",
     ["--faces"]),
    ("train-x2b-out-is-file", "train x2b --data {nodata} --out {afile}", ["--out", "a_file"]),
    ("register-out-is-folder", "register {mesh} {mesh} --out {adir}", ["a_folder"]),
]


@pytest.mark.parametrize("argv, expect", [r[1:] for r in SUBPROCESS_ROWS], ids=[r[0] for r in SUBPROCESS_ROWS])
def test_bad_input_in_a_real_process(tree, argv, expect):
    root = Path(tree["root"])
    before = snapshot(root)
    p = subprocess.run([sys.executable, "-m", "x2recon.cli", *argv.format(**tree).split()], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    _check(p.returncode, p.stderr, expect, tree, before, root)


def test_closed_stdout_pipe_is_not_a_traceback(tmp_path, monkeypatch):
    """``x2recon info MODEL | head -1``: the reader stops early; x2recon stops quietly (exit 141, as
    SIGPIPE would) and leaves stdout on /dev/null so the interpreter's last flush is quiet too."""
    import io

    import x2recon.cli.info as info
    from x2recon.nn.checkpoint import read_config

    model = _checkpoint_with_config(tmp_path / "m.safetensors", json.dumps(
        {"format": "x2recon.checkpoint/1", "network": "x2b", "model": {f"setting_{i}": i for i in range(50)}}))
    # the checkpoint half of 'info' (its detector and template-library readers import ultralytics: slow here)
    monkeypatch.setattr(info, "cmd_info", lambda a: print(json.dumps(read_config(a.model), indent=1)) or 0)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    stdout = io.TextIOWrapper(open(write_end, "wb"))
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["info", str(model)]) == 141
    print("after the pipe closed")  # what the interpreter's final flush does: must not raise now
    sys.stdout.flush()
    monkeypatch.setattr(sys, "stdout", sys.__stdout__)
    stdout.close()


def test_bugs_keep_their_traceback(monkeypatch, capsys, tmp_path):
    """Only x2recon's own ``ValueError``s about a value become one-line errors; the same type raised
    inside numpy (a bug in how x2recon calls it), or any other exception, propagates."""
    import numpy as np

    import x2recon.cli.info as info

    def numpy_fails(a):
        return np.zeros(2) + np.zeros(3)

    monkeypatch.setattr(info, "cmd_info", numpy_fails)
    with pytest.raises(ValueError, match="broadcast"):
        main(["info", "whatever"])
    monkeypatch.setattr(info, "cmd_info", lambda a: {}["missing"])
    with pytest.raises(KeyError):
        main(["info", "whatever"])

    def x2recon_rejects(a):
        from x2recon.geometry import ProjectionGeometry

        return ProjectionGeometry.from_view("sideways", (0, 0, 0))

    monkeypatch.setattr(info, "cmd_info", x2recon_rejects)
    assert main(["info", "whatever"]) == 2
    assert "x2recon info: error: unknown view 'sideways'" in capsys.readouterr().err

    def cannot_write(a):
        open(tmp_path / "no" / "such" / "folder.txt", "w")

    monkeypatch.setattr(info, "cmd_info", cannot_write)
    assert main(["info", "whatever"]) == 2
    assert "folder.txt: No such file or directory" in capsys.readouterr().err


def _parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_command_and_option_has_help_that_says_its_default_once():
    problems = []
    for path, parser in _parsers(build_parser()):
        if path and not (parser.description or "").strip():
            problems.append(f"{' '.join(path)}: no description")
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            name = f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                problems.append(f"{name}: no help")
                continue
            text = formatter._expand_help(action)  # as shown: the formatter may append "(default: X)"
            own = argparse.HelpFormatter(parser.prog)._expand_help(action)  # the help as written
            if text != own and "default" in own.lower():
                problems.append(f"{name}: says its default twice: {text!r}")
            if text.count("(default: ") > 1 or "(default: None)" in text or "==SUPPRESS==" in text:
                problems.append(f"{name}: {text!r}")
    assert not problems, "\n".join(problems)
