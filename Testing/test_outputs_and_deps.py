"""Issue 20 items 6–7 and part of 8: what a command writes and what it needs, checked before the work.

``reconstruct --faces N`` keeps the surface closed (it never worked before: quadric collapse pinched thin
bones); optional extras (ultralytics) and a torchvision built for another torch are one line each, before
any work; a training run folder has one writer; outputs that would overwrite each other or an input are
refused; a full disk is an error naming the file, never a truncated PNG or a library traceback; unsupported
output formats are named; only commands that resume say so after Ctrl-C; a non-ASCII path under the C locale
reaches ITK as its bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from x2recon.cli import main
from x2recon.errors import X2ReconInputError
from x2recon.mesh.extract import MeshError, signed_volume, simplify_closed, watertight_report

from test_dataset_safety import small_tmpfs  # noqa: F401  (the 2 MiB tmpfs fixture: full and read-only disks)

CLOSED = {"open_edges": 0, "nonmanifold_edges": 0, "winding_consistent": True}


def run_main(capsys, *args) -> tuple[int, str, str]:
    """``x2recon ARGS`` in this process: (exit code, stdout, stderr); argparse's own errors give their code."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``x2recon ARGS`` in a fresh process (``args`` may hold bytes: file names in no encoding)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "x2recon.cli", *[a if isinstance(a, bytes) else str(a) for a in args]],
                          capture_output=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def nih_xray(shared_data) -> Path:
    """A real radiograph (NIH ChestX-ray14, PA, no geometry: placed from its lung fields)."""
    return shared_data / "xray_nih_cxr" / "00000001_000.png"


def closed_pieces(mesh: trimesh.Trimesh) -> list[tuple[int, int]]:
    """(Euler number, faces) of each connected piece, sorted: the topology a simplification must keep."""
    return sorted((p.euler_number, len(p.faces)) for p in mesh.split(only_watertight=False))


# ----------------------------------------------------------------- 6. --faces keeps the surface closed
@pytest.fixture(scope="module")
def raw_surface(nih_xray):
    """The bundled skeleton model's closed 64³ surface of the NIH radiograph (box coordinates), unsimplified."""
    from x2recon.io.xray import model_geometry, read_xray
    from x2recon.nn.checkpoint import load_model, read_config
    from x2recon.resources import bundled
    from x2recon.x2b.reconstruct import reconstruct

    model_path = bundled("skeleton")
    model, _ = load_model(model_path, "cpu")
    xray = read_xray(nih_xray, model_geometry=model_geometry(read_config(model_path)))
    return reconstruct(model, [xray], resolution=64, device="cpu").mesh_box


def test_simplified_reconstruction_stays_closed_with_its_topology(raw_surface):
    import pyfqmr

    assert watertight_report(raw_surface) == CLOSED and len(raw_surface.faces) > 25_000
    # what reconstruct did before: plain quadric collapse pinches this surface (why --faces always failed)
    s = pyfqmr.Simplify()
    s.setMesh(np.asarray(raw_surface.vertices), np.asarray(raw_surface.faces, np.int32))
    s.simplify_mesh(target_count=20_000, aggressiveness=7, preserve_border=True, verbose=False)
    v, f, _ = s.getMesh()
    assert watertight_report(trimesh.Trimesh(v, f))["nonmanifold_edges"] > 0

    out = simplify_closed(raw_surface, 20_000)
    assert len(out.faces) == 20_000
    again = trimesh.Trimesh(out.vertices, out.faces, process=True)  # as a reader merges coincident corners
    assert again.is_watertight and again.is_winding_consistent and watertight_report(again) == CLOSED
    assert [e for e, _ in closed_pieces(out)] == [e for e, _ in closed_pieces(raw_surface)]  # same pieces, same genus
    assert signed_volume(out) == pytest.approx(signed_volume(raw_surface), rel=0.01)
    # the shape: sampled surfaces within a third of a 64³ cell on average, both ways (the raw one against itself: ~0.2)
    a, _ = trimesh.sample.sample_surface(raw_surface, 40_000, seed=1)
    b, _ = trimesh.sample.sample_surface(out, 40_000, seed=2)
    assert cKDTree(a).query(b)[0].mean() < 0.35 / 64 and cKDTree(b).query(a)[0].mean() < 0.35 / 64


def test_simplifying_below_what_the_topology_allows_stops_closed(raw_surface):
    out = simplify_closed(raw_surface, 10)
    pieces = closed_pieces(out)
    assert watertight_report(out) == CLOSED and len(pieces) == len(closed_pieces(raw_surface))
    assert 10 < len(out.faces) < 40 * len(pieces)  # each closed piece keeps a handful of triangles


def test_simplified_labelmap_vertebra_keeps_its_holes(shared_data):
    """A real extracted surface: L3 of lumbar_crop_verse (a vertebra: holes, so Euler number < 2), a tenth of
    its triangles: every hole kept, still closed, the labelmap's volume."""
    from x2recon.io.volume import read_labelmap
    from x2recon.mesh.extract import mask_to_mesh

    seg = read_labelmap(shared_data / "lumbar_crop_verse" / "labels_verse.nii.gz")
    mesh = mask_to_mesh(seg.array == 22, seg.affine, name="L3")
    assert watertight_report(mesh) == CLOSED and mesh.euler_number < 2
    target = len(mesh.faces) // 10 // 2 * 2  # a closed triangle mesh has an even face count (3F = 2E)
    out = simplify_closed(mesh, target, "L3")
    assert len(out.faces) == target and watertight_report(out) == CLOSED
    assert out.euler_number == mesh.euler_number
    assert signed_volume(out) == pytest.approx(mesh.metadata["voxel_volume_mm3"], rel=0.02)


def test_simplify_closed_refuses_an_open_surface_by_name():
    open_box = trimesh.creation.box()
    open_box.update_faces(np.arange(len(open_box.faces)) > 0)
    with pytest.raises(MeshError, match="cannot simplify the lid keeping it closed: it is not closed and manifold \\(3 open edges"):
        simplify_closed(open_box, 4, "the lid")


def test_the_watertight_error_names_the_cli_option_not_python():
    from x2recon.x2b.reconstruct import _checked_watertight

    sphere = trimesh.creation.icosphere(4)
    sphere.update_faces(sphere.triangles_center[:, 2] < 0.5)  # a cap cut off: a hole of more than 32 edges
    with pytest.raises(MeshError) as e:
        _checked_watertight(sphere)
    assert "--no-watertight" in str(e.value) and "watertight=False" not in str(e.value)


@pytest.fixture(scope="module")
def faces_run_on_full_disk(nih_xray, tmp_path_factory):
    """``reconstruct --faces 20000 --out m.stl --render full/r.png`` (64³) with ``full/`` a tmpfs holding
    10 KiB free: the mesh is written, then the PNG hits the full disk.  (rc, stdout, stderr, mesh, png, full)."""
    tmp = tmp_path_factory.mktemp("faces_full")
    full = tmp / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (full / "filler").write_bytes(b"\0" * (1024 * 1024 - 10 * 1024))
        mesh, png = tmp / "m.stl", full / "r.png"
        r = cli("reconstruct", "--xray", nih_xray, "--model", "skeleton", "--resolution", "64", "--faces", "20000",
                "--out", mesh, "--render", png, "--quiet", "--device", "cpu")
        left = sorted(p.name for p in full.iterdir())
        yield r.returncode, r.stdout.decode(), r.stderr.decode(), mesh, png, left
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


@pytest.mark.slow  # a fresh x2recon process (10–60 s on 2 shared cores)
def test_reconstruct_faces_writes_a_watertight_mesh_of_about_n_triangles(faces_run_on_full_disk):
    _, out, err, mesh_path, _, _ = faces_run_on_full_disk
    assert "not watertight" not in err and "Traceback" not in err, err
    assert f"{mesh_path}: 20,000 triangles" in out, out
    mesh = trimesh.load(mesh_path, process=True)  # as another program reads the STL
    assert len(mesh.faces) == 20_000
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0


@pytest.mark.slow  # a fresh x2recon process (10–60 s on 2 shared cores)
def test_render_on_a_full_disk_fails_naming_the_png_and_leaves_no_part(faces_run_on_full_disk):
    rc, _, err, _, png, left = faces_run_on_full_disk
    assert rc == 2, err
    assert f"x2recon reconstruct: error: {png}: No space left on device" in err, err
    assert "libpng" not in err and "Traceback" not in err
    assert left == ["filler"]  # neither a truncated r.png nor a temporary file


def test_faces_below_the_topology_says_what_it_gave(nih_xray, tmp_path, capsys):
    out = tmp_path / "m.ply"
    code, stdout, err = run_main(capsys, "reconstruct", "--xray", nih_xray, "--model", "skeleton", "--resolution", "32",
                                 "--faces", "10", "--out", out, "--quiet", "--device", "cpu")
    assert code == 0, err
    mesh = trimesh.load(out, process=True)
    assert mesh.is_watertight and len(mesh.faces) > 10
    assert f"note: --faces 10: {len(mesh.faces):,} triangles is the fewest that keep every piece" in err, err


# ----------------------------------------------------------------- 7. optional and broken dependencies
def _python_path(tmp_path: Path, name: str, code: str) -> dict:
    """An environment whose ``PYTHONPATH`` starts with a folder holding module ``name`` (``code``)."""
    shim = tmp_path / "shim"
    (shim / name).mkdir(parents=True)
    (shim / name / "__init__.py").write_text(textwrap.dedent(code))
    return {"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


@pytest.mark.slow  # a fresh x2recon process (10–60 s on 2 shared cores)
def test_refine_template_without_ultralytics_fails_first_in_one_line(nih_xray, tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['ultralytics'] = None  # not installed\n")
    out = tmp_path / "m.stl"
    t0 = time.monotonic()
    r = cli("reconstruct", "--xray", nih_xray, "--model", "skeleton", "--refine", "template", "--out", out,
            "--device", "cpu", env=env)
    seconds = time.monotonic() - t0
    err, stdout = r.stderr.decode(), r.stdout.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "--refine template: the YOLO detector (X2BR) needs ultralytics" in err
    assert 'pip install -e ".[x2br]"' in err and 'pip install "x2recon[x2br]"' in err
    # first: before the X-ray is placed (its geometry lines) and the model runs, so nothing was written
    assert "geometry:" not in stdout and "triangles" not in stdout and not out.exists()
    assert seconds < 60, seconds  # ~5 s of start-up on 2 loaded cores; the X2B work took 20 s before it failed


@pytest.mark.slow  # a fresh x2recon process (10–60 s on 2 shared cores)
def test_torchvision_built_for_another_torch_is_one_line_saying_how_to_reinstall(nih_xray, tmp_path):
    env = _python_path(tmp_path, "torchvision", """
        # what a torchvision wheel built for another torch raises at import
        raise RuntimeError("operator torchvision::nms does not exist")
    """)
    r = cli("reconstruct", "--xray", nih_xray, "--model", "skeleton", "--resolution", "32", "--out", tmp_path / "m.stl",
            "--device", "cpu", "--quiet", env=env)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err and "x2recon reconstruct: error: torchvision " in err, err
    import torch

    assert f"does not load with torch {torch.__version__} (RuntimeError: operator torchvision::nms does not exist)" in err
    assert f"reinstall them together: pip install --force-reinstall torch=={torch.__version__.split('+')[0]} " \
           "torchvision --index-url https://download.pytorch.org/whl/" in err, err


# ----------------------------------------------------------------- 8. one writer per training run folder
HOLD = textwrap.dedent("""
    import sys
    from x2recon.dataset.lock import run_lock
    with run_lock(sys.argv[1], "train x2b"):
        print("held", flush=True)
        sys.stdin.read()
""")


def test_a_second_train_into_a_held_out_folder_refuses_naming_the_holder(tmp_path, capsys):
    import socket

    out = tmp_path / "runs" / "conc"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = run_main(capsys, "train", "x2b", "--data", tmp_path / "nodata", "--out", out)
        assert code == 2, err
        assert (f"x2recon train x2b: error: {out}: run folder is in use by x2recon train x2b, pid {holder.pid} on "
                f"{socket.gethostname()} since") in err, err
        assert "give another --out" in err
    finally:
        holder.communicate("", timeout=60)
    code, _, err = run_main(capsys, "train", "x2b", "--data", tmp_path / "nodata", "--out", out)
    assert code == 2 and "in use" not in err and "nodata" in err, err  # released: on to the next check


@pytest.mark.parametrize("argv, module, function", [
    (["train", "x2b"], "x2recon.x2b.train", "train_x2b"),
    (["train", "spider"], "x2recon.spider.train", "train_spider"),
    (["train", "detector"], "x2recon.x2br.detection.yolo", "train_detector"),
], ids=["x2b", "spider", "detector"])
def test_every_train_command_holds_its_out_while_it_trains(tmp_path, capsys, monkeypatch, argv, module, function):
    import importlib

    import x2recon.cli.x2b as cli_x2b
    from x2recon.dataset.lock import run_lock

    out = tmp_path / "run"
    seen = []

    def training(*args, **kw):  # stands in for the training: a second writer must be refused meanwhile
        with pytest.raises(X2ReconInputError, match=f"run folder is in use by x2recon {' '.join(argv)}, pid {os.getpid()}"):
            with run_lock(out):
                pass
        seen.append(True)
        return {"steps": 0, "stopped": False}

    monkeypatch.setattr(importlib.import_module(module), function, training)
    monkeypatch.setattr(cli_x2b, "_warn_dataset_sampling", lambda *a: None)
    import x2recon.dataset.torch_data as td

    monkeypatch.setattr(td, "dataset_build_config", lambda d: {"structures": ["ribs"], "beam": "cone"})
    run_main(capsys, *argv, "--data", tmp_path / "data", "--out", out, "--quiet")
    assert seen == [True]


# ----------------------------------------------------------------- 8. a full disk names the file
def test_train_on_a_full_disk_names_the_checkpoint(tmp_path, small_tmpfs, capsys, monkeypatch):
    """The training loop's writes (checkpoint: safetensors' SafetensorError; state: torch.save) on a full
    disk: ``x2recon train x2b: error: <out>/last.safetensors: No space left on device``, no traceback."""
    import torch

    import x2recon.cli.x2b as cli_x2b
    import x2recon.x2b.train as x2b_train
    from x2recon.train.common import TrainSettings, setup
    from x2recon.train.loop import Task, train

    class Toy(Task):  # a real run of the one training loop with a 4 MB model (the tmpfs has 2 MiB)
        def __init__(self):
            self.model = torch.nn.Linear(1000, 1000)

        def make_optimizer(self, settings):
            return torch.optim.SGD(self.model.parameters(), lr=1e-3)

        def step(self, fwd, batch, amp_ctx):
            return {"loss": fwd(batch).square().mean(), "items": len(batch)}

    def toy_training(data, settings, cfg, **kw):
        s = TrainSettings(out=settings.out, epochs=1, max_steps=2, batch_size=2, workers=0, progress=False)
        class Zeros(torch.utils.data.Dataset):  # items keyed (index, epoch), as the loop's EpochSampler draws them
            def __len__(self):
                return 4

            def __getitem__(self, key):
                return torch.zeros(1000)

        return train(Toy(), Zeros(), s, setup(s), {"network": "x2b", "model": {}, "training": {}}, log=lambda m: None)

    monkeypatch.setattr(x2b_train, "train_x2b", toy_training)
    monkeypatch.setattr(cli_x2b, "_warn_dataset_sampling", lambda *a: None)
    out = small_tmpfs / "run"
    code, _, err = run_main(capsys, "train", "x2b", "--data", tmp_path, "--out", out, "--quiet")
    assert code == 2, err
    assert f"x2recon train x2b: error: {out / 'last.safetensors'}: No space left on device" in err, err
    assert "Traceback" not in err and "SafetensorError" not in err
    assert not [p.name for p in out.iterdir() if ".part" in p.name]


def test_training_state_and_log_on_a_full_disk_name_their_files(small_tmpfs):
    import torch

    from x2recon.train.common import Logger, save_state

    out = small_tmpfs / "run"
    out.mkdir()
    (out / "last.safetensors").write_bytes(b"weights")
    logger = Logger(out, True)
    (small_tmpfs / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 64 * 1024))
    opt = torch.optim.SGD(torch.nn.Linear(3, 3).parameters(), lr=0.1)
    with pytest.raises(OSError) as e:  # torch.save to a path said "unexpected pos 576 vs 534"
        save_state(out, opt, 1, 0, 0.0, {"big": torch.zeros(300_000)})  # 1.2 MB
    assert e.value.filename == str(out / "last.state.pt") and e.value.strerror == "No space left on device"
    assert sorted(p.name for p in out.iterdir()) == ["last.safetensors", "log.jsonl", "tensorboard"]
    with pytest.raises(OSError) as e:
        for step in range(2000):  # ~1 KB a line: the last free blocks fill
            logger.scalars(step, {"train/loss": 1.0, **{f"pad/{i}": float(i) for i in range(50)}})
    assert e.value.filename == str(out / "log.jsonl") and e.value.strerror == "No space left on device"
    try:
        logger.close()  # flushes what is left into the full disk again
    except OSError:
        pass


# ----------------------------------------------------------------- 8. outputs that collide, formats named
def test_outputs_that_name_the_same_file_are_refused_before_any_work(nih_xray, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(capsys, "reconstruct", "--xray", nih_xray, "--model", "skeleton", "--out", "same.stl",
                              "--render", "sub/../same.stl")
    assert code == 2 and "--out and --render name the same file" in err, err
    assert "geometry" not in out and not (tmp_path / "same.stl").exists()  # before the X-ray was even placed
    code, _, err = run_main(capsys, "spider", "--pa", nih_xray, "--lat", nih_xray, "--out", "x.nii.gz",
                            "--labels", tmp_path / "x.nii.gz")
    assert code == 2 and "x.nii.gz: --out and --labels name the same file" in err, err
    before = nih_xray.read_bytes()
    code, _, err = run_main(capsys, "reconstruct", "--xray", nih_xray, "--model", "skeleton", "--out", "m.stl",
                            "--render", nih_xray)
    assert code == 2 and "--render would overwrite the input --xray" in err, err
    assert nih_xray.read_bytes() == before
    code, _, err = run_main(capsys, "reconstruct", "--xray", nih_xray, "--model", "skeleton", "--out", "m.stl",
                            "--refine", "template", "--render", "m_detections.json")
    assert code == 2 and "--render and the detections <stem>_detections.json name the same file" in err, err


def test_outputs_in_unsupported_formats_are_named_before_any_work(nih_xray, tmp_path, capsys):
    code, _, err = run_main(capsys, "spider", "--pa", nih_xray, "--lat", nih_xray, "--out", tmp_path / "sp.txt")
    assert code == 2 and "Traceback" not in err
    assert f"argument --out: {tmp_path / 'sp.txt'}: x2recon cannot write a volume in this format; use one of " \
           ".nii.gz, .nii, .nrrd, .mha" in err, err
    code, _, err = run_main(capsys, "spider", "--pa", nih_xray, "--lat", nih_xray, "--out", tmp_path / "ct.nii.gz",
                            "--labels", tmp_path / "labels.mhd")
    assert code == 2 and "argument --labels" in err and "use one of .nii.gz" in err, err
    code, out, err = run_main(capsys, "reconstruct", "--xray", nih_xray, "--model", "skeleton", "--out",
                              tmp_path / "m.xyz")
    assert code == 2 and f"{tmp_path / 'm.xyz'}: --out: x2recon cannot write a mesh in this format; use one of " \
                         ".stl, .ply, .obj, .off, .vtk" in err, err
    assert "geometry" not in out  # before the X-ray was placed


# ----------------------------------------------------------------- 8. Ctrl-C: "resume" only where it resumes
def test_ctrl_c_says_resume_only_for_commands_that_resume(nih_xray, chest_half, tmp_path, capsys, monkeypatch):
    import x2recon.dataset.builder as builder
    import x2recon.x2b.reconstruct as rec

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(rec, "mise", interrupted)  # Ctrl-C in the middle of the reconstruction
    code, _, err = run_main(capsys, "reconstruct", "--xray", nih_xray, "--model", "skeleton", "--out",
                            tmp_path / "m.stl", "--quiet", "--device", "cpu")
    assert code == 130 and err.strip().endswith("x2recon reconstruct: cancelled"), err
    assert "resume" not in err
    monkeypatch.setattr(builder, "build_dataset", interrupted)
    code, _, err = run_main(capsys, "build-dataset", "--ct", chest_half[0], "--out", tmp_path / "ds", "--quiet")
    assert code == 130 and "x2recon build-dataset: cancelled; run the same command again to resume" in err, err


# ----------------------------------------------------------------- 8. non-ASCII paths under the C locale
def test_native_path_gives_itk_the_file_name_bytes():
    from x2recon.io import native_path

    assert native_path("/data/röntgen.png") == "/data/röntgen.png"
    # what Python makes of b"r\xc3\xb6ntgen.png" under LC_ALL=C (ASCII + surrogateescape)
    assert native_path("/data/r\udcc3\udcb6ntgen.png") == "/data/röntgen.png"
    with pytest.raises(X2ReconInputError, match="not UTF-8 text"):
        native_path("/data/r\udcf6ntgen.png")  # a Latin-1 name: no text ITK could be given


C_LOCALE = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LANG": "C"}


@pytest.mark.slow  # a fresh x2recon process (10–60 s on 2 shared cores)
def test_non_ascii_xray_path_under_the_c_locale_reconstructs(nih_xray, tmp_path):
    xray = tmp_path / "röntgen.png"
    xray.write_bytes(nih_xray.read_bytes())
    out = tmp_path / "knochen_ö.stl"
    r = cli("reconstruct", "--xray", xray, "--model", "skeleton", "--resolution", "32", "--out", out,
            "--render", tmp_path / "bild_ö.png", "--quiet", "--device", "cpu", env=C_LOCALE)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, err  # was: C++ abort in SimpleITK, exit 134
    assert trimesh.load(out).is_watertight and (tmp_path / "bild_ö.png").read_bytes()[:4] == b"\x89PNG"
    latin1 = os.fsencode(tmp_path) + b"/r\xf6ntgen.png"  # a name that is no UTF-8 text
    Path(os.fsdecode(latin1)).write_bytes(nih_xray.read_bytes())
    r = cli("reconstruct", "--xray", latin1, "--model", "skeleton", "--resolution", "32", "--out", tmp_path / "m.stl",
            "--quiet", "--device", "cpu", env=C_LOCALE)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and "Traceback" not in err, err
    assert "the file name is not UTF-8 text, which ITK and VTK cannot open" in err
