"""The cross-patient study's recipes, shared by ``cross_patient.py`` (the folds) and ``bundle.py`` (the
bundled assets, trained with the same recipes): the profiles' flags, each method's ``x2recon train``
command, and the table rows of an ``x2recon evaluate`` CSV."""

from __future__ import annotations

import csv
import math
from pathlib import Path

#: Per profile: dataset build flags, training flags shared by X2B/X2B2, X2B-ours extras, SPIDER flags, eval flags.
PROFILES = {
    "smoke": {
        "build": ["--variants", "1", "--drr-size", "64", "--x2b-size", "32", "--points", "2000", "--spider-grid", "16"],
        "x2b": ["--backbone", "convnext_atto", "--image-size", "32", "--hidden", "32", "--blocks", "1", "--batch-size", "2",
                "--steps", "2", "--epochs", "1000", "--points", "256", "--workers", "0", "--threads", "2"],
        "spider": ["--image-size", "32", "--unet-channels", "8,16", "--features", "8", "--hash-levels", "4",
                   "--hash-log2-size", "12", "--hash-finest", "32", "--hidden", "16", "--layers", "2", "--points", "512",
                   "--batch-size", "1", "--steps", "2", "--epochs", "1000", "--workers", "0", "--threads", "2"],
        "eval": ["--resolution", "32", "--points", "2000"],
        "detector": ["--epochs", "1", "--imgsz", "64", "--batch", "2", "--workers", "0"],
    },
    "cpu": {
        "build": ["--variants", "4", "--drr-size", "256", "--x2b-size", "128", "--spider-grid", "64"],
        "x2b": ["--backbone", "convnext_atto", "--image-size", "128", "--hidden", "128", "--batch-size", "8",
                "--steps", "150", "--epochs", "100000", "--val-every", "10", "--lr", "1e-3", "--workers", "1",
                "--threads", "2"],
        "spider": ["--image-size", "64", "--unet-channels", "16,32,64", "--features", "16", "--hash-levels", "8",
                   "--hash-log2-size", "16", "--hash-finest", "64", "--batch-size", "2", "--steps", "150",
                   "--epochs", "100000", "--val-every", "10", "--workers", "1", "--threads", "2"],
        "eval": ["--resolution", "64", "--points", "20000"],
        "detector": ["--epochs", "120", "--imgsz", "192", "--batch", "8", "--workers", "1"],
        # the detector's data: more variants and views (9 images of 3 cases overfit: mAP50 0.05 → 0)
        "labelled": ["--variants", "8", "--angles=-15,15,75,105", "--drr-size", "256", "--x2b-size", "128",
                     "--spider-grid", "64"],
    },
    "gpu": {
        "build": ["--variants", "15", "--angles=-20,-10,10,20", "--spider-grid", "128", "--workers", "8"],
        "x2b": ["--batch-size", "64", "--epochs", "400"],
        "spider": ["--batch-size", "8", "--epochs", "500"],
        "eval": ["--resolution", "256"],
        "detector": ["--epochs", "100", "--imgsz", "512", "--batch", "16", "--workers", "8"],
    },
}
#: What makes X2B "ours" rather than the paper's (the bundled demo model's additions).
OURS = ["--preset", "ours", "--local-features", "--local-stages", "0,1", "--fourier", "6"]
METHODS = ("x2b_paper", "x2b_ours", "x2b2", "spider")


def patient_dirs(parser, spec: str, data_root: Path) -> list[Path]:
    """``--patients`` (comma-separated folders under ``data_root``, or paths) as folders, each holding a
    ``ct.nii.gz``; at least two (leave-one-out), else the parser's usage error."""
    dirs = [Path(x) if Path(x).is_dir() else data_root / x for x in spec.split(",") if x.strip()]
    if len(dirs) < 2:
        parser.error("--patients: leave-one-out needs at least two patients")
    for d in dirs:
        if not (d / "ct.nii.gz").is_file():
            parser.error(f"--patients: {d} holds no ct.nii.gz")
    return dirs


def train_args(method: str, data: Path, run: Path, prof: dict, device: str) -> list[str]:
    """``x2recon train ...`` arguments of one method."""
    base = ["--data", str(data), "--out", str(run), "--device", device, "--quiet"]
    if method == "spider":
        return ["train", "spider", *base, "--structures", "skeleton", "--optimizer", "adam", "--lr", "1e-3", *prof["spider"]]
    if method == "x2b_paper":
        return ["train", "x2b", *base, "--preset", "paper", *prof["x2b"]]
    if method == "x2b_ours":
        return ["train", "x2b", *base, *OURS, *prof["x2b"]]
    return ["train", "x2b2", *base, "--views", "AP,LAT", *prof["x2b"]]


def _mean(vals: list[float]) -> float | None:
    ok = [v for v in vals if not math.isnan(v)]
    return round(sum(ok) / len(ok), 4) if ok else None


def table_rows(method: str, held: str, n_train: int, csv_path: Path) -> list[dict]:
    """One row per protocol from an evaluate CSV: X2B's ``paper_*``/``world_*`` columns, SPIDER's intensity + Dice."""
    with open(csv_path, newline="") as f:
        cases = list(csv.DictReader(f))

    def num(r, k):
        try:
            return float(r[k])
        except (TypeError, ValueError):
            return math.nan

    keys = list(cases[0]) if cases else []
    groups = {"paper": [k for k in keys if k.startswith("paper_")], "world": [k for k in keys if k.startswith("world_")]}
    if method == "spider":
        groups = {"intensity + skeleton Dice": [k for k in ("psnr", "ssim", "dice", "hd95", "chamfer") if k in keys]}
    out = []
    for protocol, cols in groups.items():
        metrics = {k.split("_", 1)[1] if protocol in ("paper", "world") else k: _mean([num(r, k) for r in cases]) for k in cols}
        out.append({"method": method, "held_out": held, "n_train_patients": n_train, "n_test_cases": len(cases),
                    "protocol": protocol, "metrics": metrics})
    return out
