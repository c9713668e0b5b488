"""The bundled models (x2recon/resources/models, registry in x2recon.resources.registry): aliases → files,
clear errors for a missing one, their cards, ``info --bundled``, the commands' defaults, and — with the
real files — every command and panel default running with only what the package ships.

The registry tests point the registry at a folder in tmp_path (stand-in files there, never in the
package).  The end-to-end tests use the real bundled files; each is skipped only while its file is not
yet committed (see ``missing``)."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import x2recon.resources.registry as registry
from x2recon.cli import build_parser, main
from x2recon.errors import X2ReconInputError
from x2recon.resources import ASSETS, DEFAULT_BONE_MODEL, bundled, card, cards

REPO = Path(__file__).resolve().parents[1]
PACKAGE_MODELS = registry.MODELS_DIR


@pytest.fixture
def models(tmp_path, monkeypatch) -> Path:
    """An empty stand-in for the package's models folder."""
    d = tmp_path / "models"
    d.mkdir()
    monkeypatch.setattr(registry, "MODELS_DIR", d)
    return d


def _stand_ins(d: Path, *aliases: str) -> dict:
    """Files where the registry looks (content is not read by the resolution tests)."""
    out = {}
    for a in aliases:
        p = d / ASSETS[a].file
        if ASSETS[a].kind == "templates":
            p.mkdir(parents=True, exist_ok=True)
            (p / "library.json").write_text("{}")
        else:
            p.write_bytes(b"stand-in")
        out[a] = p
    return out


def _card(alias: str, **change) -> dict:
    c = {"file": ASSETS[alias].file, "what": "w", "trained_on": {"patients": ["p"], "cases": 1}, "structures": "s",
         "geometry": "g", "preset": "ours", "command": "x2recon train", "held_out": "none: a test card",
         "not_clinical": True, "measured_on": "a test"}
    c.update(change)
    return c


# ------------------------------------------------------------------------------------ the registry
def test_every_alias_resolves_to_its_file_and_a_missing_one_says_how_to_replace_it(models):
    for alias, a in ASSETS.items():
        with pytest.raises(X2ReconInputError) as e:
            bundled(alias)
        assert e.value.path == str(models / a.file) and "missing from this installation" in e.value.problem
        assert a.replace.split()[0] in e.value.problem  # --model / --detector / --templates
    (models / "templates").mkdir()  # a folder without library.json is no library
    with pytest.raises(X2ReconInputError, match="templates"):
        bundled("templates")
    files = _stand_ins(models, *ASSETS)
    assert {a: bundled(a) for a in ASSETS} == files
    with pytest.raises(X2ReconInputError, match="no bundled asset is called 'yolo'"):
        bundled("yolo")


@pytest.mark.parametrize("alias", ["demo", "skeleton", "spider"])
def test_model_takes_every_checkpoint_alias_unless_a_file_of_that_name_exists(alias, models, tmp_path, monkeypatch,
                                                                                capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["reconstruct", "--xray", "x.png", "--out", "o.stl", "--model", alias]
    with pytest.raises(SystemExit):  # missing: argparse names the option, the file and the way out
        build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert "argument --model" in err and ASSETS[alias].file in err and "--model FILE" in err
    path = _stand_ins(models, alias)[alias]
    assert build_parser().parse_args(argv).model == str(path)
    assert build_parser().parse_args(["evaluate", "--data", "ds", "--model", alias]).model == str(path)
    (tmp_path / alias).write_text("a file of that name wins")
    assert build_parser().parse_args(argv).model == alias


def test_model_does_not_take_the_detector_or_templates(models, tmp_path, monkeypatch):
    _stand_ins(models, "detector", "templates")
    monkeypatch.chdir(tmp_path)
    for alias in ("detector", "templates"):  # not a network: left as a (missing) file name for the loader
        assert build_parser().parse_args(["reconstruct", "--xray", "x", "--out", "o.stl", "--model", alias]).model == alias


@pytest.mark.parametrize("argv, typo, alias", [
    (["reconstruct", "--xray", "x.png", "--out", "o.stl", "--model", "skeletn"], "skeletn", "skeleton"),
    (["spider", "--model", "Spidr", "--pa", "a.png", "--lat", "l.png", "--out", "o.nii.gz"], "Spidr", "spider"),
    (["info", "templats"], "templats", "templates"),
])
def test_a_mistyped_alias_names_the_alias_it_resembles(argv, typo, alias, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and f"{typo}: no such file; did you mean the bundled {alias!r}?" in err
    (tmp_path / typo).write_text("a file of that name is taken as it is")
    assert getattr(build_parser().parse_args(argv), "model", None) == typo


def test_a_name_like_no_alias_stays_a_file_name_for_the_loader(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("foo", "runs/skeletn", "skeletn.safetensors"):  # no alias near, or a path meant as a file
        assert build_parser().parse_args(["info", name]).model == name


def test_cards_are_read_and_checked(models):
    f = models / "cards.json"
    with pytest.raises(X2ReconInputError, match="cards are missing"):
        card("demo")
    bad = {"{": "not valid JSON", "[]": "JSON object",
           json.dumps({"demo": _card("demo", not_clinical=False)}): "not_clinical must be true",
           json.dumps({"demo": _card("demo", file="other.safetensors")}): "is for 'other.safetensors'",
           json.dumps({"yolo": _card("demo")}): "names no bundled asset",
           json.dumps({"demo": {k: v for k, v in _card("demo").items() if k != "held_out"}}): "lacks held_out"}
    for text, problem in bad.items():
        f.write_text(text)
        with pytest.raises(X2ReconInputError, match=problem) as e:
            card("demo")
        assert e.value.path == str(f)
    recipe = _card("spider")
    recipe["recipe"] = recipe.pop("preset")  # a recipe stands for a preset
    f.write_text(json.dumps({"demo": _card("demo"), "spider": recipe}))
    assert card("demo") == _card("demo") and set(cards()) == {"demo", "spider"}
    with pytest.raises(X2ReconInputError, match="has no card for 'detector'"):
        card("detector")


# ------------------------------------------------------------------------------------ x2recon info
def test_info_bundled_lists_every_asset_present_or_missing(models, capsys):
    (models / "x2b_demo.safetensors").write_bytes(b"\0" * 2_500_000)
    _stand_ins(models, "templates")
    (models / "templates" / "meshes").mkdir()
    (models / "templates" / "meshes" / "rib_left_1.ply").write_bytes(b"\0" * 1_000_000)
    assert main(["info", "--bundled"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert set(lines) == set(ASSETS)
    assert "x2recon/resources/models/x2b_demo.safetensors" in lines["demo"] and "2.5  present" in lines["demo"]
    assert "1.0  present" in lines["templates"]
    for alias in ("skeleton", "spider", "detector"):
        assert "0.0  missing" in lines[alias] and ASSETS[alias].what in lines[alias]
    assert main(["info"]) == 2
    assert "--bundled" in capsys.readouterr().err


def test_info_of_an_alias_adds_its_card_and_keeps_the_config(models, capsys):
    shutil.copyfile(PACKAGE_MODELS / ASSETS["demo"].file, models / ASSETS["skeleton"].file)
    (models / "cards.json").write_text(json.dumps({"skeleton": _card("skeleton", what="a stand-in")}))
    for arg in ("skeleton", str(models / ASSETS["skeleton"].file)):  # by alias or by the bundled file's path
        assert main(["info", arg]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["format"] == "x2recon.checkpoint/1" and doc["network"] == "x2b" and doc["card"]["what"] == "a stand-in"
    with pytest.raises(SystemExit):  # argparse: argument model: <file>: ... missing ...
        main(["info", "detector"])
    assert "detector.safetensors" in capsys.readouterr().err


def test_info_demo_keeps_its_keys_and_adds_the_demo_card(capsys):
    assert main(["info", "demo"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"format", "network", "model", "dataset", "training", "versions", "card"} <= set(doc)
    c = doc["card"]
    assert c["file"] == "x2b_demo.safetensors" and c["not_clinical"] is True
    assert c["trained_on"]["patients"] == ["chest_lidc0001_half"]
    assert c["trained_on"]["cases"] == doc["dataset"]["train_cases"]  # the card agrees with the checkpoint
    assert abs(c["held_out"]["validation_iou_at_step_2000"] - doc["training"]["val/iou"]) < 5e-4


# ------------------------------------------------------------------------------------ the commands' defaults
def test_spider_and_detect_default_to_the_bundled_files(models, tmp_path, capsys):
    spider = ["spider", "--pa", "pa.png", "--lat", "lat.png", "--out", str(tmp_path / "ct.nii.gz")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(spider)
    assert "spider_skeleton.safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["detect", "x.png"])
    err = capsys.readouterr().err
    assert "detector.safetensors" in err and "--detector FILE" in err
    files = _stand_ins(models, "spider", "detector")
    assert build_parser().parse_args(spider).model == str(files["spider"])
    assert build_parser().parse_args(["detect", "x.png"]).detector == str(files["detector"])
    assert build_parser().parse_args(["detect", "x.png", "--detector", "mine.pt"]).detector == "mine.pt"


def test_reconstruct_refine_template_defaults_to_the_bundled_detector_and_templates(models, tmp_path):
    from x2recon.cli.x2br import bundled_x2br_inputs

    base = ["reconstruct", "--xray", "x.png", "--out", str(tmp_path / "o.stl"), "--model", "m", "--refine", "template"]
    a = build_parser().parse_args(base)
    assert a.detector is None and a.templates is None  # resolved only when refining: no file needed otherwise
    with pytest.raises(X2ReconInputError, match="--detector FILE") as e:
        bundled_x2br_inputs(a)
    assert e.value.path == str(models / "detector.safetensors")
    files = _stand_ins(models, "detector", "templates")
    a = build_parser().parse_args(base)
    assert bundled_x2br_inputs(a) == [f"--detector: {files['detector']} (bundled)",
                                      f"--templates: {files['templates']} (bundled)"]
    assert (a.detector, a.templates) == (str(files["detector"]), str(files["templates"]))
    a = build_parser().parse_args(base + ["--detector", "mine.pt"])
    assert bundled_x2br_inputs(a)[0] == "--detector: mine.pt" and a.templates == str(files["templates"])


# ------------------------------------------------------------------------------------ Slicer panels
def test_panel_fields_that_start_with_bundled_files_exist_in_the_ui_and_parameter_node():
    from x2recon.slicer.bundled import PANEL_ASSETS

    assert set(PANEL_ASSETS) == {"X2BoneRecon", "SpiderCT"}
    for module, fields in PANEL_ASSETS.items():
        ui = ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()
        edits = {w.get("name"): w for w in ui.iter("widget") if w.get("class") == "ctkPathLineEdit"}
        code = (REPO / module / f"{module}.py").read_text()
        for param, alias in fields.items():
            assert alias in ASSETS and f"{param}LineEdit" in edits, (module, param)
            bound = [p.find("string").text for p in edits[f"{param}LineEdit"].iter("property")
                     if p.get("name") == "SlicerParameterName"]
            assert bound in ([param], []) and f"        {param}: Path" in code, (module, param)


def test_panel_defaults_are_the_installed_bundled_files(models):
    from x2recon.slicer.bundled import or_bundled, panel_defaults

    assert panel_defaults("X2BoneRecon") == {} and panel_defaults("X2DatasetBuilder") == {}
    files = _stand_ins(models, DEFAULT_BONE_MODEL, "spider", "detector")
    assert panel_defaults("X2BoneRecon") == {"modelPath": files[DEFAULT_BONE_MODEL], "detectorPath": files["detector"]}
    assert panel_defaults("SpiderCT") == {"modelPath": files["spider"]}
    assert or_bundled(".", "spider") == str(files["spider"]) and or_bundled("mine.safetensors", "spider") == "mine.safetensors"
    assert or_bundled("", "templates") is None


# ------------------------------------------------------------------------------------ the real bundled files
def test_bundled_models_fit_the_package_budget_and_have_cards():
    """What is committed now: ≤ 60 MB in all, each network ≤ 20 MB, a valid card for every file."""
    files = [f for f in PACKAGE_MODELS.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 60e6
    for f in PACKAGE_MODELS.glob("*.safetensors"):
        assert f.stat().st_size <= 20e6, f
    doc = cards()
    for alias, a in ASSETS.items():
        if a.present():
            assert alias in doc, f"{a.file} has no card in cards.json"
            assert doc[alias]["held_out"] and doc[alias]["trained_on"], alias


def test_every_asset_is_bundled_with_a_complete_card():
    doc = cards()
    assert set(doc) == set(ASSETS)
    for alias, c in doc.items():
        assert all(c.get(k) not in (None, "", [], {}) for k in registry.CARD_KEYS if k != "preset"), alias
        assert c["trained_on"]["patients"], alias


@pytest.mark.parametrize("alias, expect", [
    ("demo", ("x2recon.checkpoint/1", "x2b")),
    ("skeleton", ("x2recon.checkpoint/1", "x2b")),
    ("spider", ("x2recon.checkpoint/1", "spider")),
    ("detector", ("x2recon.detector/1", "yolo")),
    ("templates", ("x2recon.templates/1", None))])
def test_info_of_every_bundled_alias(alias, expect, capsys):
    assert main(["info", alias]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["format"], doc.get("network")) == expect and doc["card"]["file"] == ASSETS[alias].file


def test_spider_runs_with_only_the_bundled_model(chest_half, tmp_path, capsys):
    """x2recon spider without --model: the bundled model's DRR pair of the sample CT (--from-ct) → a CT
    with air and bone and a non-empty skeleton labelmap, on the model's box."""
    import SimpleITK as sitk

    ct, seg = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    assert main(["spider", "--pa", str(tmp_path / "pa.png"), "--lat", str(tmp_path / "lat.png"), "--from-ct",
                 str(chest_half[0]), "--from-ct-labels", str(chest_half[1]), "--out", str(ct), "--labels", str(seg),
                 "--resolution", "32", "--device", "cpu", "--quiet"]) == 0
    assert f"model: {PACKAGE_MODELS / ASSETS['spider'].file}" in capsys.readouterr().out
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(ct)))
    assert a.shape == (32, 32, 32) and (a < -500).mean() > 0.05 and (a > 200).any()
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    assert 0 < (lab > 0).mean() < 0.5


@pytest.fixture(scope="module")
def sample_ap(chest_half, tmp_path_factory):
    """A 256² AP DRR of the sample CT in the default chest geometry (x2recon drr), with its JSON."""
    png = tmp_path_factory.mktemp("bundled_ap") / "ap.png"
    assert main(["drr", "--ct", str(chest_half[0]), "--out", str(png), "--size", "256", "--device", "cpu"]) == 0
    return png


@pytest.mark.slow
def test_reconstruct_refine_template_runs_with_only_bundled_files(sample_ap, tmp_path, capsys):
    from x2recon.io.mesh import read_mesh
    from x2recon.x2br.detection.detections import read_detections

    out = tmp_path / "bones.ply"
    assert main(["reconstruct", "--xray", str(sample_ap), "--model", DEFAULT_BONE_MODEL, "--out", str(out),
                 "--resolution", "64", "--refine", "template", "--device", "cpu", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"--detector: {PACKAGE_MODELS / 'detector.safetensors'} (bundled)" in text
    assert f"--templates: {PACKAGE_MODELS / 'templates'} (bundled)" in text
    parts = sorted((tmp_path / "bones_parts").glob("*.ply"))
    assert parts and len(read_mesh(out).faces) == sum(len(read_mesh(p).faces) for p in parts)
    assert read_detections(tmp_path / "bones_detections.json")


def test_reconstruct_with_the_bundled_skeleton_model(sample_ap, tmp_path):
    from x2recon.io.mesh import read_mesh

    out = tmp_path / "skeleton.ply"
    assert main(["reconstruct", "--xray", str(sample_ap), "--model", "skeleton", "--out", str(out),
                 "--resolution", "32", "--device", "cpu", "--quiet"]) == 0
    m = read_mesh(out)
    assert len(m.faces) > 100 and np.isfinite(m.vertices).all()


# ------------------------------------------------------------------ no build-machine paths in what ships
def _records(f: Path):
    """A bundled file's records: a JSON file's content, or a .safetensors file's metadata (JSON values parsed)."""
    if f.suffix == ".json":
        return json.loads(f.read_text())
    from safetensors import safe_open

    with safe_open(str(f), "np") as h:
        meta = h.metadata() or {}
    return {k: json.loads(v) if v.lstrip().startswith(("{", "[")) else v for k, v in meta.items()}


def test_no_bundled_file_records_a_folder_of_the_machine_it_was_built_on():
    from x2recon.io.documents import absolute_paths

    files = sorted(f for f in PACKAGE_MODELS.rglob("*") if f.suffix in (".json", ".safetensors"))
    assert {f.name for f in files} >= {"cards.json", "library.json", "x2b_skeleton.safetensors", "x2b_demo.safetensors",
                                       "spider_skeleton.safetensors", "detector.safetensors"}
    found = {f.relative_to(PACKAGE_MODELS).as_posix(): absolute_paths(_records(f)) for f in files}
    assert {k: v for k, v in found.items() if v} == {}
    skeleton = _records(PACKAGE_MODELS / "x2b_skeleton.safetensors")["x2recon"]
    assert skeleton["dataset"]["root"] == "all/train_data"  # relative to the study folder it was built in


def test_absolute_paths_are_found_in_values_and_command_lines():
    from x2recon.io.documents import absolute_paths, without_machine_paths

    doc = {"root": "/home/me/study/all/train_data", "cmd": "x2recon train x2b --data /home/me/study/all/train_data "
           "--out=/tmp/run --steps 5", "other": ["C:\\Users\\me\\ct.nii.gz", "~/x.nii.gz", "x2recon.checkpoint/1",
                                                 "rel/ative", "/", 3]}
    assert absolute_paths(doc) == ["/home/me/study/all/train_data", "/home/me/study/all/train_data", "/tmp/run",
                                   "C:\\Users\\me\\ct.nii.gz", "~/x.nii.gz"]
    clean = without_machine_paths(doc, "/home/me/study")
    assert clean == {"root": "all/train_data", "cmd": "x2recon train x2b --data all/train_data --out=run --steps 5",
                     "other": ["ct.nii.gz", "x.nii.gz", "x2recon.checkpoint/1", "rel/ative", "/", 3]}
    assert absolute_paths(clean) == []


def test_the_bundle_step_rewrites_records_and_keeps_the_weights_byte_for_byte(tmp_path):
    """training/bundle.py's make_portable (run by the bundle step, and once on the committed files)."""
    import struct
    import sys

    import torch
    from safetensors.torch import load_file

    from x2recon.nn.checkpoint import read_config, save_checkpoint

    sys.path.insert(0, str(REPO / "training"))
    try:
        import bundle
    finally:
        sys.path.remove(str(REPO / "training"))
    study = tmp_path / "study"
    dest = tmp_path / "models"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
    config = {"network": "x2b", "model": {"hidden": 5}, "dataset": {"root": str(study / "all" / "train_data")},
              "training": {"out": str(study / "all" / "runs" / "x2b"), "pretrained": "/elsewhere/w.safetensors"}}
    ckpt = save_checkpoint(dest / "x2b_skeleton.safetensors", model, config, half=True)
    (dest / "cards.json").write_text(json.dumps({"skeleton": {"command": f"x2recon train x2b --data {study}/all/d"}},
                                                indent=1) + "\n")

    def data_section(p: Path) -> bytes:
        b = p.read_bytes()
        return b[8 + struct.unpack("<Q", b[:8])[0]:]

    before, tensors = data_section(ckpt), load_file(str(ckpt))
    assert sorted(f.name for f in bundle.make_portable(dest, study)) == ["cards.json", "x2b_skeleton.safetensors"]
    assert data_section(ckpt) == before
    after = load_file(str(ckpt))
    assert all(torch.equal(after[k], tensors[k]) and after[k].dtype == torch.float16 for k in tensors)
    cfg = read_config(ckpt)
    assert cfg["dataset"]["root"] == "all/train_data" and cfg["training"]["out"] == "all/runs/x2b"
    assert cfg["training"]["pretrained"] == "w.safetensors"
    assert json.loads((dest / "cards.json").read_text())["skeleton"]["command"] == "x2recon train x2b --data all/d"
    assert bundle.make_portable(dest, study) == []  # nothing left to change
