"""Benchmark: seconds per case of the whole dataset pipeline on the shared chest CT.

Target: ≤ 10 s per case on 2 CPU cores with default settings (issue 22; issue 15 asked 15 s, issue 2 60 s); ≤ 3 s
with a GPU.  Prints the DRR tracer that ran (numba, or torch where numba is missing).
Usage: python Testing/benchmarks/bench_pipeline.py [--ct CT --labels LABELS] [--device cpu|cuda]
Prints per-stage seconds and the ratio to the target.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _record
import _record  # noqa: E402
from conftest import shared_data_dir  # noqa: E402

from x2recon.dataset.case import CaseInput, build_case  # noqa: E402
from x2recon.dataset.config import BuildConfig  # noqa: E402

TARGET_S = 10.0  # 2 CPU cores


def _tracer(device: str) -> str:
    """The DRR tracer ``backend="auto"`` takes on ``device`` (numba on CPU where it imports)."""
    import torch

    from x2recon.drr.siddon import auto_backend

    return auto_backend(torch.zeros(1, 1, 1, device=device))


def main() -> int:
    d = shared_data_dir() / "chest_lidc0001"
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ct", default=str(d / "ct.nii.gz"))
    ap.add_argument("--labels", default=str(d / "labels.nii.gz"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    _record.add_json_arg(ap)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    cfg = BuildConfig(device=a.device)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cpu0 = time.process_time()
        res = build_case(CaseInput("bench", a.ct, a.labels), tmp, config=cfg)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu0
    if res.status != "done":
        print("FAILED:", res.reason)
        return 1
    print(f"machine: {os.cpu_count()} cores, torch threads {a.threads}, device {a.device}")
    print(f"settings: default BuildConfig (views {cfg.view_names()}, {cfg.drr_size}² DRRs, {cfg.n_points} points, "
          f"{cfg.spider_grid}³ SPIDER grid)")
    cpu_stage = res.meta.get("cpu_seconds", {})
    for k, v in res.meta["seconds"].items():
        print(f"  {k:10s} {v:7.2f} s wall {cpu_stage.get(k, float('nan')):7.2f} s CPU")
    print(f"DRR tracer: {_tracer(a.device)}")
    print(f"case total: {wall:.1f} s wall, {cpu:.1f} s CPU ({_record.load_note()}); target {TARGET_S:.0f} s → "
          f"ratio {wall / TARGET_S:.2f} of target")
    tracer = _tracer(a.device)
    stages = ", ".join(f"{k} {v:.1f}/{cpu_stage.get(k, float('nan')):.1f}" for k, v in res.meta["seconds"].items())
    _record.write(a.json, [_record.figure(
        "dataset case (CT → meshes, occupancy, DRRs, boxes)", wall, "s", device=a.device,
        target="≤ 10 s on 2 CPU cores, ≤ 3 s with a GPU (issue 22)",
        notes=f"{cpu:.1f} CPU-s, {_record.load_note()}; stages (wall/CPU s): {stages}; DRR tracer {tracer}")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
