"""X2B training on CPU: the network overfits one case (IoU ≥ 0.8), runs resume where they stopped,
a mismatching run folder is refused, and X2B2 trains on its view pair."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from x2recon.dataset.torch_data import OccupancyDataset, ValidationDataset
from x2recon.nn.checkpoint import CheckpointError, load_model, read_config
from x2recon.x2b.network import X2BConfig
from x2recon.train.common import TrainSettings
from x2recon.x2b.train import train_x2b, validate

SMALL = dict(backbone="convnext_atto", image_size=64, hidden=64, n_blocks=3, local_features=True, local_stages=[0, 1],
             fourier=6)


def _settings(out, **kw):
    base = dict(out=str(out), epochs=100000, batch_size=4, lr=2e-3, workers=0, save_every=0, progress=False,
                val_every=100000, threads=0)
    return TrainSettings(**{**base, **kw})


def test_dataset_items_follow_the_geometry(tiny_x2b_dataset):
    ds = OccupancyDataset(tiny_x2b_dataset, "train", image_size=64, n_points=512, augment=True)
    a, b = ds[0], ds[0]
    assert a["images"].shape == (1, 1, 64, 64) and a["grid"].shape == (1, 3, 4) and a["points"].shape == (512, 3)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["points"], b["points"])  # seeded per item
    assert not torch.equal(ds[(0, 1)]["points"], a["points"])  # the epoch travels with the index
    assert torch.equal(ds[(0, 1)]["points"], ds[(0, 1)]["points"])
    pair = OccupancyDataset(tiny_x2b_dataset, "train", kind="x2b2", views=["AP", "LAT"], image_size=64)[0]
    assert pair["images"].shape == (2, 1, 64, 64)
    with pytest.raises(Exception, match="X2B2 needs views"):
        OccupancyDataset(tiny_x2b_dataset, "train", kind="x2b2", views=["AP", "PA"])


def test_overfits_one_case_on_cpu(tiny_x2b_dataset, tiny_x2b_model):
    """A short CPU run memorises one case: IoU ≥ 0.8 on the case's own occupancy samples (what it
    trained on), and the field between the samples is the shape too: IoU ≥ 0.5 on 50 000 fresh uniform
    box points (Occupancy Networks' IoU; vertebrae fill ~1 % of the box, so this is the strict one)."""
    import math

    from conftest import TINY_X2B_STEPS

    from x2recon.dataset.occupancy import load_points

    from x2recon.io.documents import absolute_paths

    model, conf = load_model(tiny_x2b_model)
    assert conf["dataset"]["build"]["x2b_size"] == 64 and conf["training"]["step"] == TINY_X2B_STEPS
    # the checkpoint names its dataset and run folder, never this machine's paths (a checkpoint travels)
    assert conf["dataset"]["root"] == tiny_x2b_dataset.name and absolute_paths(conf) == []
    item = ValidationDataset(tiny_x2b_dataset, "train", views=["AP"], image_size=64, n_uniform=50_000)[0]
    pts, occ = load_points(tiny_x2b_dataset / "cases" / "chest" / "points.npz")
    with torch.no_grad():
        logits = model(item["images"][None], item["grid"][None], torch.from_numpy(pts)[None])[0]
    pred = (logits >= math.log(0.2 / 0.8)).numpy()
    assert (pred & occ).sum() / (pred | occ).sum() >= 0.8
    val = ValidationDataset(tiny_x2b_dataset, "train", views=["AP"], image_size=64, n_uniform=50_000)
    iou = validate(model, torch.utils.data.DataLoader(val, batch_size=1), torch.device("cpu"), 0.2,
                   contextlib.nullcontext)["val/iou"]
    assert iou >= 0.5, iou


def test_threshold_calibration_is_the_best_validation_iou(tiny_x2b_dataset, tiny_x2b_model):
    """The calibrated τ is the grid's argmax of the mean IoU (computed here with numpy), and the
    volume ratio is the occupied points over the true ones at that τ."""
    import numpy as np

    from x2recon.x2b.train import CALIBRATION_THRESHOLDS

    model, _ = load_model(tiny_x2b_model)
    val = ValidationDataset(tiny_x2b_dataset, "train", image_size=64, n_uniform=5000)
    loader = torch.utils.data.DataLoader(val, batch_size=2)
    v = validate(model, loader, torch.device("cpu"), 0.2, contextlib.nullcontext, calibrate=True)
    model.eval()  # validate leaves the model training (batch statistics), as the loop needs it
    with torch.no_grad():
        p = np.concatenate([torch.sigmoid(model(b["images"], b["grid"], b["points"])).numpy() for b in loader])
    gt = np.concatenate([b["occupancies"].numpy() for b in loader]) > 0.5
    ious = {t: np.mean(((p >= t) & gt).sum(1) / np.maximum(1, ((p >= t) | gt).sum(1))) for t in CALIBRATION_THRESHOLDS}
    best = max(ious.values())
    assert v["val/threshold"] in CALIBRATION_THRESHOLDS and abs(ious[v["val/threshold"]] - best) < 1e-6
    assert abs(v["val/iou_calibrated"] - best) < 1e-5 and v["val/iou_calibrated"] >= v["val/iou"] - 1e-6
    assert abs(v["val/volume_ratio"] - (p >= v["val/threshold"]).sum() / gt.sum()) < 1e-4


def test_resume_continues_and_mismatch_is_refused(tiny_x2b_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = X2BConfig(views=["AP"], **{**SMALL, "hidden": 32})
    train_x2b(tiny_x2b_dataset, _settings(out, max_steps=3), cfg, val_split="val")
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    s = train_x2b(tiny_x2b_dataset, _settings(out, max_steps=5), cfg, val_split="val")
    assert s["steps"] == 5  # continued from 3, not restarted
    assert read_config(out / "last.safetensors")["training"]["step"] == 5
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any("val/iou" in x for x in lines)
    other = X2BConfig(views=["AP"], **{**SMALL, "hidden": 48})
    with pytest.raises(CheckpointError, match="hidden: 32 vs 48"):
        train_x2b(tiny_x2b_dataset, _settings(out, max_steps=6), other)


def test_x2b2_trains_on_the_view_pair(tiny_x2b_dataset, tmp_path):
    cfg = X2BConfig(kind="x2b2", views=["AP", "LAT"], attention_heads=4, **SMALL)
    s = train_x2b(tiny_x2b_dataset, _settings(tmp_path / "r2", max_steps=2), cfg, val_split="val")
    assert s["steps"] == 2 and 0.0 <= s["best_val_iou"] <= 1.0
    model, conf = load_model(tmp_path / "r2" / "best.safetensors")
    assert conf["network"] == "x2b2" and model.cfg.views == ["AP", "LAT"]


def test_persistent_workers_see_new_epochs(tiny_x2b_dataset):
    """The epoch travels with each index, so persistent loader workers draw fresh samples."""
    from x2recon.dataset.torch_data import EpochSampler

    ds = OccupancyDataset(tiny_x2b_dataset, "train", image_size=64, n_points=256)
    sampler = EpochSampler(torch.utils.data.SequentialSampler(ds))
    loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=sampler, num_workers=1, persistent_workers=True)
    first = next(iter(loader))["points"]
    sampler.set_epoch(1)
    second = next(iter(loader))["points"]
    assert not torch.equal(first, second)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tiny_x2b_dataset, tmp_path):
    """torchrun with two Gloo processes: one global batch split between them, one checkpoint."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "x2recon.cli",
           "train", "x2b", "--data", str(tiny_x2b_dataset), "--out", str(out), "--steps", "2", "--batch-size", "4",
           "--workers", "0", "--threads", "1", "--backbone", "convnext_atto", "--image-size", "64", "--hidden", "32",
           "--blocks", "1", "--val-split", "", "--quiet", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == 2 and summary["steps"] == 2
    load_model(out / "last.safetensors")


@pytest.mark.parametrize("every_s, all_epochs", [(1e9, False), (0.0, True)])
def test_epoch_ends_save_last_only_when_due(tiny_x2b_dataset, tmp_path, monkeypatch, every_s, all_epochs):
    """A tiny dataset's epochs are one step long: ``last.*`` is written at an epoch end only when the
    previous write is EPOCH_SAVE_SECONDS old (or the epoch validated / ended the run), not every step."""
    import x2recon.train.loop as loop

    writes = []
    real = loop.save_state
    monkeypatch.setattr(loop, "save_state", lambda out, opt, step, *a, **k: (writes.append(step), real(out, opt, step, *a, **k)))
    monkeypatch.setattr(loop, "EPOCH_SAVE_SECONDS", every_s)
    cfg = X2BConfig(views=["AP"], **{**SMALL, "hidden": 32})
    s = train_x2b(tiny_x2b_dataset, _settings(tmp_path / "run", max_steps=4, batch_size=64), cfg, val_split="val")
    assert s["steps"] == 4
    assert writes == ([1, 2, 3, 4] if all_epochs else [4]), writes  # one step per epoch
    assert read_config(tmp_path / "run" / "last.safetensors")["training"]["step"] == 4


# ------------------------------------------------------------------ what `x2recon train x2b` says and keeps
TINY_CLI = ["--backbone", "convnext_atto", "--image-size", "64", "--hidden", "32", "--blocks", "1", "--workers", "0",
            "--quiet", "--device", "cpu", "--local-stages", "0,1"]


def test_cli_run_keeps_one_last_one_best_says_the_batch_and_measures_steady_rate(tiny_x2b_dataset, tmp_path, capsys):
    import os

    from x2recon.cli import main

    out = tmp_path / "run"
    assert main(["train", "x2b", "--data", str(tiny_x2b_dataset), "--out", str(out), "--steps", "4",
                 "--batch-size", "64", "--val-every", "1", *TINY_CLI]) == 0
    std = capsys.readouterr()
    summary = json.loads(std.out[std.out.index("{"):])
    # the training split has one case: the batch of 64 is cut to it, and the run says so
    assert "note: --batch-size 64 is more than the 1 training item: each step trains on 1" in std.out
    assert summary["steps"] == 4 and summary["steady_after_steps"] == 2  # warm-up ≤ half the steps
    assert summary["samples_per_s_steady"] > 0 and summary["samples_per_s"] > 0
    # one last (+ the previous pair, hard links) and one best, whatever the number of epochs (4 here)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["best.safetensors", "last.prev.safetensors",
                                                                 "last.safetensors"]
    assert sorted(p.name for p in out.glob("*.pt")) == ["last.prev.state.pt", "last.state.pt"]
    assert os.path.samefile(out / "last.safetensors", out / "last.prev.safetensors")  # no second copy on disk
    # our preset calibrates the surface threshold only on other patients: this validation split is a variant of
    # the one training CT, so the run says so and keeps τ 0.2
    assert "1 of the 'val' cases are scans or variants of training patients" in std.out
    tr = read_config(out / "best.safetensors")["training"]
    assert tr["calibrate_threshold"] is False and load_model(out / "best.safetensors")[0].cfg.threshold == 0.2


def test_a_checkpoint_with_a_calibrated_threshold_loads_with_it(tiny_x2b_model, tmp_path):
    """A model whose training calibrated its surface threshold (validation on other patients) reconstructs at
    it; the same record without the calibration flag, or out of (0, 1), leaves the model's τ."""
    import shutil

    from x2recon.nn.checkpoint import META_KEY, rewrite_metadata

    def with_training(**kw):
        f = tmp_path / f"m{len(list(tmp_path.iterdir()))}.safetensors"
        shutil.copyfile(tiny_x2b_model, f)

        def change(meta):
            cfg = json.loads(meta[META_KEY])
            cfg["training"].update(kw)
            return {**meta, META_KEY: json.dumps(cfg)}

        return rewrite_metadata(f, change)

    assert load_model(with_training(calibrate_threshold=True, **{"val/threshold": 0.35}))[0].cfg.threshold == 0.35
    assert load_model(with_training(calibrate_threshold=False, **{"val/threshold": 0.35}))[0].cfg.threshold == 0.2
    assert load_model(with_training(calibrate_threshold=True, **{"val/threshold": 1.5}))[0].cfg.threshold == 0.2


def test_steady_rate_is_absent_with_its_reason_when_too_few_steps():
    from x2recon.train.loop import _Throughput

    for steps, present in ((1, False), (2, False), (3, True), (40, True)):
        t = _Throughput(0, 1)
        for i in range(steps):
            t.add(i + 1, 4)
        s = t.summary("samples")
        assert ("samples_per_s_steady" in s) == present and ("samples_per_s_steady_note" in s) != present, steps
        if present:
            assert s["steady_after_steps"] == min(10, steps // 2) and s["samples_per_s_steady"] > 0
        else:
            assert s["samples_per_s_steady_note"].startswith(f"not measured: {steps} step")


def test_resume_takes_the_checkpoints_architecture_unless_one_is_given(tiny_x2b_dataset, tmp_path, capsys):
    """--resume FILE with the command line's defaults (convnext_base) trains the checkpoint's architecture
    (convnext_atto) and says so; an architecture option given that differs is refused naming both values."""
    from x2recon.cli import main

    first = tmp_path / "first"
    base = ["train", "x2b", "--data", str(tiny_x2b_dataset), "--batch-size", "2", "--val-split", "", "--steps", "1"]
    assert main([*base, "--out", str(first), *TINY_CLI]) == 0
    capsys.readouterr()
    ckpt = first / "last.safetensors"
    second = tmp_path / "second"
    assert main([*base, "--out", str(second), "--resume", str(ckpt), "--workers", "0", "--quiet", "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "--resume: the architecture not given is last.safetensors's: --backbone convnext_atto --image-size 64" in said
    assert read_config(second / "last.safetensors")["model"] == read_config(ckpt)["model"]
    assert main([*base, "--out", str(tmp_path / "third"), "--resume", str(ckpt), "--backbone", "resnet18",
                 "--workers", "0", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--backbone 'resnet18' (the checkpoint's: 'convnext_atto')" in err and "leave these options out" in err
    # resuming --out itself (--resume auto): the same
    assert main([*base[:-1], "2", "--out", str(first), "--workers", "0", "--quiet", "--device", "cpu"]) == 0
    assert "--out's last.safetensors: the architecture not given" in capsys.readouterr().out
    assert read_config(first / "last.safetensors")["training"]["step"] == 2


def test_a_preset_sized_run_on_a_cpu_says_so_first_and_prints_the_cpu_recipe(tmp_path, monkeypatch, capsys):
    """No GPU and the preset's convnext_base: one line before anything else, with the CPU recipe's flags (those
    of training/recipes.py's cpu profile, our preset); an architecture the user chose gets no note."""
    import sys
    from pathlib import Path

    import x2recon.cli.x2b as cli_x2b
    from x2recon.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = tmp_path / "no_dataset"
    assert main(["train", "x2b", "--data", str(missing), "--out", str(tmp_path / "run")]) == 2  # fails after the note
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("note: no GPU: training convnext_base at 224² on the CPU takes tens of seconds a step")
    assert err[0].endswith(cli_x2b.CPU_RECIPE) and "training/cross_patient.py --profile cpu" in err[0]
    assert "x2recon train x2b: error:" in err[-1]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    try:
        import recipes
    finally:
        sys.path.pop(0)
    flags = [*recipes.OURS, *recipes.PROFILES["cpu"]["x2b"]]
    pairs = {(f, flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else None)
             for i, f in enumerate(flags) if f.startswith("--")}
    shown = cli_x2b.CPU_RECIPE.split()
    for i, f in enumerate(shown):
        if f.startswith("--"):
            value = shown[i + 1] if i + 1 < len(shown) and not shown[i + 1].startswith("--") else None
            assert (f, value) in pairs, (f, value)  # the line is the study's recipe, not a private copy
    assert main(["train", "x2b", "--data", str(missing), "--out", str(tmp_path / "run2"),
                 "--backbone", "convnext_base"]) == 2
    assert "note: no GPU" not in capsys.readouterr().err


def test_missing_tensorboard_is_one_plain_line(tmp_path, monkeypatch, capsys):
    import sys
    import warnings

    from x2recon.train.common import Logger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # "not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Python warning (with its source line) any more
        log = Logger(tmp_path, enabled=True)
    log.scalars(1, {"train/loss": 0.5})
    log.close()
    assert capsys.readouterr().err == ("note: tensorboard is not installed (pip install 'x2recon[train]'): logging to "
                                       "log.jsonl only\n")
    assert json.loads((tmp_path / "log.jsonl").read_text())["train/loss"] == 0.5
