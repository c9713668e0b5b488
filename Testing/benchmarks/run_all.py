"""Every benchmark, each beside its peer in the same process, into one table.

    python Testing/benchmarks/run_all.py [--device cuda|cpu] [--quick] [--out DIR] [--only NAME,...]

Runs each ``bench_*.py`` in its own process with the settings of the chosen profile (``--quick``:
sizes that finish in a few minutes on 2 CPU cores; otherwise the issue's sizes, e.g. 512³ DRRs), collects
the figures each writes with ``--json``, and writes ``DIR/benchmarks.json`` and ``DIR/benchmarks.md``
(figure, ours, peer, ratio, target, device, peak memory; date and commit in the header).  The
performance table of docs/benchmarks.md is that Markdown.  A benchmark that fails or whose peer is not
installed still gets its row, saying so — nothing is left out silently.  Peers are real packages: ``pip install -e ".[bench]"``.
Runs from any folder: the scripts are found beside this file and run from the repository root, ``--out``
is taken relative to the folder it is called from.  Not collected by pytest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def profiles(device: str, quick: bool) -> dict[str, list[str]]:
    """Benchmark name → its command-line arguments for this device and size profile."""
    dev = ["--device", device]
    if device == "cuda":
        small = quick
        return {
            "drr": ["bench_drr.py", *dev, "--size", "256" if small else "512", "--batch-views", "64"],
            "hash_encoding": ["bench_hash_encoding.py", *dev],
            "spider": ["bench_spider.py", *dev] + (["--resolution", "128"] if small else []),
            "x2b_latency": ["bench_x2b.py", "latency", *dev, "--resolution", "256"],
            "x2b_train": ["bench_x2b.py", "train", *dev] + (["--steps", "5", "--e2e-steps", "20"] if small else []),
            "registration": ["bench_registration.py", *dev, "--downsample", "0,5000"],
            "pipeline": ["bench_pipeline.py", *dev, "--threads", str(os.cpu_count())],
            "mise": ["bench_mise.py"],
        }
    if quick:
        return {
            "drr": ["bench_drr.py", *dev, "--size", "128", "--repeats", "3", "--batch-views", "8"],
            "hash_encoding": ["bench_hash_encoding.py", *dev, "--points", "65536", "--repeats", "3", "--no-compile"],
            "spider": ["bench_spider.py", *dev, "--resolution", "64", "--steps", "3", "--repeats", "1", "--batch", "2",
                       "--points", "4096"],
            "x2b_latency": ["bench_x2b.py", "latency", *dev, "--resolution", "256", "--repeats", "1"],
            # the CPU recipe (training/recipes.py, profile cpu): 14 end-to-end steps, the last 4 past the warm-up
            "x2b_train": ["bench_x2b.py", "train", *dev, "--backbone", "convnext_atto", "--image-size", "128",
                          "--batch", "8", "--hidden", "128", "--local-features", "--local-stages", "0,1", "--fourier",
                          "6", "--steps", "3", "--e2e-steps", "14", "--workers", "1"],
            "registration": ["bench_registration.py", *dev, "--points", "5000", "--downsample", "0,2000"],
            "pipeline": ["bench_pipeline.py", *dev],
            "mise": ["bench_mise.py"],
        }
    return {
        "drr": ["bench_drr.py", *dev, "--size", "256", "--batch-views", "16"],
        "hash_encoding": ["bench_hash_encoding.py", *dev, "--points", "262144"],
        "spider": ["bench_spider.py", *dev, "--resolution", "128", "--steps", "5", "--repeats", "1"],
        "x2b_latency": ["bench_x2b.py", "latency", *dev, "--resolution", "256"],
        "x2b_train": ["bench_x2b.py", "train", *dev, "--batch", "8", "--steps", "3", "--e2e-steps", "6",
                      "--workers", "1"],
        "registration": ["bench_registration.py", *dev, "--points", "20000", "--downsample", "0,5000"],
        "pipeline": ["bench_pipeline.py", *dev],
        "mise": ["bench_mise.py"],
    }


def run_one(name: str, args: list[str], out: Path, timeout: float) -> tuple[list[dict], dict]:
    """Run one benchmark; its records, and a run summary (seconds, exit code, log file)."""
    out = Path(out).resolve()  # the benchmark runs in ROOT: every path it gets is absolute
    rec_path, log_path = out / f"{name}.json", out / f"{name}.log"
    rec_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / args[0]), *args[1:], "--json", str(rec_path)]
    env = dict(os.environ)
    if env.get("X2RECON_SHARED_DATA"):  # a relative data folder means the caller's folder, not ROOT
        env["X2RECON_SHARED_DATA"] = str(Path(env["X2RECON_SHARED_DATA"]).resolve())
    t = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = time.perf_counter() - t
    # the table names the command as run in Testing/benchmarks/, without this machine's folders
    run = {"name": name, "command": " ".join([*args, "--json", rec_path.name]), "seconds": round(seconds, 1), "rc": rc,
           "log": log_path.name}
    records = json.loads(rec_path.read_text()) if rec_path.is_file() else []
    if rc != 0 or not records:
        tail = log_path.read_text().strip().splitlines()[-1:] or [""]
        run["error"] = f"exit {rc}: {tail[0][:200]}"
    return records, run


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"


def markdown(report: dict) -> str:
    """The table docs/benchmarks.md shows."""
    lines = [f"Benchmarks — {report['date']}, commit {report['commit']}, profile {report['profile']}",
             "", "| figure | ours | peer | peer's | ratio (> 1: ours better) | target | device | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["figures"]:
        lines.append(f"| {r['figure']} | {fmt(r['ours'])} {r['unit']} | {r['peer'] or '—'} | "
                     f"{fmt(r['peer_value'])} | {fmt(r['ratio'])} | {r['target'] or '—'} | {r['device']} | "
                     f"{fmt(r['peak_gib'])} |")
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"| {run['name']}: FAILED ({run['error']}) | — | — | — | — | — | — | — |")
    notes = [f"- {r['figure']}: {r['notes']}" for r in report["figures"] if r.get("notes")]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", "Commands (in Testing/benchmarks/):", *[f"- `{run['command']}` ({run['seconds']} s)"
                                                         for run in report["runs"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes on 2 CPU cores)")
    ap.add_argument("--out", type=Path, default=Path("benchmark-results"),
                    help="folder for the JSON, Markdown and logs, relative to the current folder (default: %(default)s)")
    ap.add_argument("--only", default="", help="comma list of benchmark names (default: all)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    a = ap.parse_args(argv)
    a.out = a.out.resolve()
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    prof = profiles(a.device, a.quick)
    only = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(prof))
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {unknown}; choose from {sorted(prof)}")
    a.out.mkdir(parents=True, exist_ok=True)
    figures, runs = [], []
    for name, args in prof.items():
        if only and name not in only:
            continue
        print(f"[{name}] {' '.join(args)}", flush=True)
        recs, run = run_one(name, args, a.out, a.timeout)
        print(f"[{name}] {run['seconds']} s" + (f" — {run['error']}" if "error" in run else ""), flush=True)
        figures += recs
        runs.append(run)
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit(),
              "profile": f"{a.device}{' quick' if a.quick else ''}", "figures": figures, "runs": runs}
    (a.out / "benchmarks.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (a.out / "benchmarks.md").write_text(md)
    print(md)
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
