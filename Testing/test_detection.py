"""YOLOv9 detector (x2recon.x2br.detection): offline ultralytics, training on the tiny dataset's DRRs and box labels,
resume after a stop, inference in the X-ray's pixel grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("ultralytics") is None:  # not importorskip: x2recon must import it first (offline)
    pytest.skip("ultralytics is not installed (pip install 'x2recon[x2br]')", allow_module_level=True)

#: Prelude of every subprocess: a socket layer that records and refuses every connection attempt.
BLOCK_NETWORK = textwrap.dedent("""
    import json, socket, sys
    ATTEMPTS = []
    def _blocked(name):
        def f(*a, **k):
            ATTEMPTS.append(f"{name}{a[1:2] if name == 'connect' else a[:1]}")
            raise OSError(f"network disabled by the test ({name})")
        return f
    socket.socket.connect = _blocked("connect")
    socket.socket.connect_ex = _blocked("connect_ex")
    socket.getaddrinfo = _blocked("getaddrinfo")
    socket.create_connection = _blocked("create_connection")
""")


def _clean_env(config_dir: Path) -> dict:
    """The test process's environment without any YOLO_* variable (x2recon must set them itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env["X2RECON_YOLO_CONFIG_DIR"] = str(config_dir)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(code: str, config_dir: Path, timeout: int = 240) -> dict:
    proc = subprocess.run([sys.executable, "-c", BLOCK_NETWORK + textwrap.dedent(code)], env=_clean_env(config_dir),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_first_import_prints_no_ultralytics_settings_notice(tmp_path):
    """ultralytics' "Creating new Ultralytics Settings … 'yolo settings' …" notice is about x2recon's private
    settings file: the first import (fresh config folder) creates the file without printing it."""
    proc = subprocess.run([sys.executable, "-c", BLOCK_NETWORK + "from x2recon.x2br.detection.offline import "
                           "import_ultralytics\nimport_ultralytics()\nprint('imported')"],
                          env=_clean_env(tmp_path / "cfg"), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "imported"
    assert "Ultralytics Settings" not in out and "yolo settings" not in out, out
    assert (tmp_path / "cfg" / "Ultralytics" / "settings.json").is_file()  # created all the same


@pytest.fixture(scope="module")
def yolo_config(tmp_path_factory) -> Path:
    """The in-process ultralytics config folder (the first import in this process decides it)."""
    d = tmp_path_factory.mktemp("yolo_config")
    from x2recon.x2br.detection.offline import import_ultralytics

    import_ultralytics(d)
    return d


def test_offline_import_in_fresh_process(tmp_path):
    """Importing through import_ultralytics with sockets blocked: no connection attempted, fonts placed,
    settings sync and analytics off, ultralytics believes it is offline."""
    r = _run("""
        import os
        from x2recon.x2br.detection.offline import import_ultralytics
        ul = import_ultralytics()
        from ultralytics import utils as U
        from ultralytics.utils import events
        from ultralytics.utils.checks import check_font
        font = str(check_font("Arial.ttf"))  # would download without the local copy
        print(json.dumps({"attempts": ATTEMPTS, "online": U.ONLINE, "config": str(U.USER_CONFIG_DIR),
                          "env": {k: os.environ.get(k) for k in ("YOLO_OFFLINE", "YOLO_CONFIG_DIR", "YOLO_AUTOINSTALL")},
                          "sync": U.SETTINGS["sync"], "events": events.events.enabled, "font": font}))
    """, tmp_path / "cfg")
    assert r["attempts"] == []
    assert r["online"] is False and r["sync"] is False and r["events"] is False
    assert r["env"]["YOLO_OFFLINE"] == "1" and r["env"]["YOLO_CONFIG_DIR"] == str((tmp_path / "cfg").resolve())
    assert Path(r["config"]).parent == (tmp_path / "cfg").resolve()
    for d in (tmp_path / "cfg", Path(r["config"])):
        assert (d / "Arial.ttf").stat().st_size > 10_000 and (d / "Arial.Unicode.ttf").is_file()
    assert Path(r["font"]) == Path(r["config"]) / "Arial.ttf"


@pytest.mark.slow
def test_ultralytics_reads_16bit_drr_as_high_byte(tiny_x2b_dataset, yolo_config):
    """Our 16-bit PNG DRRs reach ultralytics as their high byte (no 8-bit copy needed), and to_uint8
    gives the same picture from the uint16 array and from the float display image."""
    from ultralytics.utils.patches import imread

    from x2recon.x2br.detection.yolo import to_uint8
    from x2recon.io.image import read_png

    png = tiny_x2b_dataset / "cases" / "chest" / "images" / "AP.png"
    a16 = read_png(png)
    assert a16.dtype == np.uint16 and a16.max() > 255
    seen = imread(str(png))
    assert seen.dtype == np.uint8 and seen.shape == (*a16.shape, 3)
    assert np.array_equal(seen[..., 0], (a16 >> 8).astype(np.uint8))
    assert np.array_equal(to_uint8(a16), seen[..., 0])
    assert np.array_equal(to_uint8(a16 / 65535.0), seen[..., 0])


def test_dataset_yaml_is_what_ultralytics_wants(tiny_x2b_dataset, yolo_config):
    """The builder's dataset.yaml parses with ultralytics' own check; every listed image has its labels."""
    from ultralytics.data.utils import check_det_dataset, img2label_paths

    d = check_det_dataset(str(tiny_x2b_dataset / "dataset.yaml"))
    assert d["nc"] == 4 and list(d["names"].values()) == ["cervical", "thoracic", "lumbar", "ribs"]
    for split in ("train", "val"):
        imgs = [s for s in Path(d[split]).read_text().splitlines() if s.strip()]
        assert imgs and all(Path(p).is_file() for p in imgs)
        assert all(Path(p).is_file() for p in img2label_paths(imgs))


@pytest.fixture(scope="module")
def offline_run(tiny_x2b_dataset, tmp_path_factory):
    """One epoch of training in a fresh process whose sockets refuse every connection."""
    run = tmp_path_factory.mktemp("det_run")
    r = _run(f"""
        import time
        t = time.time()
        from x2recon.x2br.detection import train_detector
        s = train_detector({str(tiny_x2b_dataset)!r}, {str(run)!r}, epochs=1, imgsz=64, batch=4, device="cpu",
                           workers=0, quiet=True)
        print(json.dumps({{"attempts": ATTEMPTS, "summary": s, "seconds": time.time() - t}}))
    """, tmp_path_factory.mktemp("cfg"))
    return run, r


def test_train_one_epoch_offline(offline_run):
    run, r = offline_run
    s = r["summary"]
    assert r["attempts"] == [], r["attempts"]
    assert not s["stopped"] and s["epochs_completed"] == 1
    assert {"mAP50", "mAP50-95"} <= set(s) and 0.0 <= s["mAP50"] <= 1.0 and 0.0 <= s["mAP50-95"] <= s["mAP50"] + 1e-9
    assert s["eval_split"] == "test" and s["held_out"] and s["images"] == {"train": 2, "val": 2, "test": 2}
    assert s["classes"] == ["cervical", "thoracic", "lumbar", "ribs"]
    assert (run / "detector.safetensors").is_file() and (run / "train" / "weights" / "best.pt").is_file()
    assert json.loads((run / "summary.json").read_text())["mAP50-95"] == s["mAP50-95"]
    assert s["offline"]["amp"] is False and s["offline"]["pretrained"] is False and s["offline"]["plots"] is False
    # nothing written into the dataset (ultralytics' label caches stay in the run folder)
    assert not list(Path(s["data"]).glob("cases/*/labels.cache")) and (run / "yolo_data" / "train" / "labels.cache").is_file()


def _dup2(a: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)


def test_detector_boxes_in_xray_pixel_grid(offline_run, tiny_x2b_dataset, yolo_config):
    """Boxes come back in the X-ray's own pixels whatever its size: an image and its 2× pixel-doubled copy
    give the network the same input, so every box must map exactly by x' = 2(x + ½) − ½; and on an
    image of the network's size, our boxes are ultralytics' own predictions shifted by −½ px."""
    from ultralytics import YOLO

    from x2recon.x2br.detection import Detector
    from x2recon.io.image import read_png

    run, _ = offline_run
    det = Detector(run / "detector.safetensors")
    assert det.names == ["cervical", "thoracic", "lumbar", "ribs"] and det.imgsz == 64
    a16 = read_png(tiny_x2b_dataset / "cases" / "chest_v02" / "images" / "AP.png")  # 128²
    d1 = det.detect(a16, conf=0.0, max_det=40)
    d2 = det.detect(_dup2(a16), conf=0.0, max_det=40)
    assert len(d1) == len(d2) > 0
    for a, b in zip(d1, d2):
        assert a.name == b.name and a.confidence == pytest.approx(b.confidence, abs=1e-6)
        np.testing.assert_allclose(b.box, 2 * (a.box + 0.5) - 0.5, atol=1e-3)
        assert -0.5 <= a.x0 < a.x1 <= 127.5 and -0.5 <= a.y0 < a.y1 <= 127.5
    # float display image, uint16 array: the same detections
    df = det.detect(a16 / 65535.0, conf=0.0, max_det=40)
    assert [d.box.tolist() for d in df] == [d.box.tolist() for d in d1]
    # against ultralytics' predictor on a 64² image (no resizing on either side)
    small = (a16[::2, ::2] >> 8).astype(np.uint8)
    ours = det.detect(small, conf=0.0, max_det=20)
    res = YOLO(str(run / "train" / "weights" / "best.pt")).predict(np.stack([small] * 3, -1), imgsz=64, conf=0.0,
                                                                  max_det=20, verbose=False, device="cpu")[0]
    theirs = res.boxes.xyxy.cpu().numpy() - 0.5
    for d in ours[:5]:
        assert np.abs(theirs - d.box).max(axis=1).min() < 0.05


def test_cli_detect_writes_boxes(offline_run, tiny_x2b_dataset, tmp_path, yolo_config):
    from x2recon.cli import main
    from x2recon.x2br.detection import read_detections

    run, _ = offline_run
    out = tmp_path / "boxes.json"
    png = tiny_x2b_dataset / "cases" / "chest_v02" / "images" / "AP.png"
    assert main(["detect", str(png), "--detector", str(run / "detector.safetensors"), "--out", str(out),
                 "--conf", "0.0"]) == 0
    doc = json.loads(out.read_text())
    assert doc["image_size"] == [128, 128] and doc["format"] == "x2recon.detections/1"
    assert len(read_detections(out)) == len(doc["detections"]) > 0


@pytest.mark.slow
def test_stopped_training_resumes(tiny_x2b_dataset, tmp_path, yolo_config):
    """cancel() stops a run after saving last.pt (optimizer kept); the same call resumes it to the end."""
    from x2recon.x2br.detection import train_detector

    run = tmp_path / "run"
    kw = dict(epochs=2, imgsz=64, batch=4, device="cpu", workers=0, quiet=True)
    s1 = train_detector(tiny_x2b_dataset, run, cancel=lambda: True, **kw)
    assert s1["stopped"] and s1["epochs_completed"] == 1
    assert json.loads((run / "state.json").read_text())["status"] == "stopped"
    assert (run / "train" / "weights" / "last.pt").is_file() and not (run / "summary.json").exists()
    seen = []
    s2 = train_detector(tiny_x2b_dataset, run, progress=lambda f, m: seen.append(m), **kw)
    assert not s2["stopped"] and s2["epochs_completed"] == 2 and "mAP50-95" in s2
    assert any("resuming" in m for m in seen)
    rows = [r for r in (run / "train" / "results.csv").read_text().splitlines()[1:] if r.strip()]
    assert [int(float(r.split(",")[0])) for r in rows] == [1, 2]  # epoch 1 was not trained again
    s3 = train_detector(tiny_x2b_dataset, run, **kw)
    assert s3.get("already_finished") and s3["mAP50-95"] == s2["mAP50-95"]


def test_bad_inputs_fail_clearly(tmp_path, yolo_config):
    from x2recon.x2br.detection import Detector, train_detector
    from x2recon.x2br.detection.yolo import to_uint8
    from x2recon.errors import X2ReconInputError

    with pytest.raises(X2ReconInputError, match="not an x2recon dataset"):
        train_detector(tmp_path, tmp_path / "run", epochs=1)
    with pytest.raises(X2ReconInputError, match="not found"):
        Detector(tmp_path / "missing.safetensors")
    with pytest.raises(X2ReconInputError, match=r"\[0, 1\]"):
        to_uint8(np.full((8, 8), 2.0))


def test_stage_per_level_classes(tiny_x2b_dataset, tmp_path):
    """classes="structures": one class per vertebra, rows recomputed from the per-structure boxes."""
    from x2recon.x2br.detection.yolo import stage_dataset
    from x2recon.drr.boxes import read_yolo_labels

    st = stage_dataset(tiny_x2b_dataset, tmp_path, views=["AP"], classes="structures")
    assert st["images"] == {"train": 1, "val": 1, "test": 1} and st["views"] == ["AP"]
    assert st["classes"][:3] == ["vertebrae_L3", "vertebrae_L2", "vertebrae_L1"] and "vertebrae_T7" in st["classes"]
    rows = read_yolo_labels(tmp_path / "yolo_data" / "train" / "labels" / "chest__AP.txt")
    grouped = read_yolo_labels(tiny_x2b_dataset / "cases" / "chest" / "labels" / "AP.txt")
    np.testing.assert_allclose(np.sort(rows[:, 1:], 0), np.sort(grouped[:, 1:], 0), atol=1e-6)  # same boxes
    assert len(set(rows[:, 0])) == len(rows)  # one level each
    assert (tmp_path / "yolo_data" / "train" / "images" / "chest__AP.png").resolve() == \
        (tiny_x2b_dataset / "cases" / "chest" / "images" / "AP.png").resolve()
    assert f"nc: {len(st['classes'])}\n" in (tmp_path / "data.yaml").read_text()
