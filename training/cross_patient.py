#!/usr/bin/env python3
"""Leave-one-patient-out study (issue 13 §3): one command, resumable, through ``x2recon``'s CLI.

For each held-out patient: build a training dataset from the other patients and their deformed
variants and a test dataset from the held-out patient's own undeformed scan (never a variant of
it), both with ``--structures skeleton`` (all bone from HU, so unlabelled CTs count) and the same
geometry (``--isocenter thorax`` by default: every patient's box on the lungs); train X2B in the
paper's configuration (``--preset paper``) and in ours, X2B2 and SPIDER; evaluate each with
``x2recon evaluate --split all`` on the test dataset (X2B/X2B2: paper and world protocol;
SPIDER: PSNR/SSIM and skeleton Dice); write ``results.md`` and ``results.json``.

Every step runs ``python -m x2recon.cli ...`` in a subprocess and, once it succeeds, writes
``<out>/steps/<step>.json`` (command, seconds); a step whose record exists is skipped, so running the
same command again resumes (training steps also resume inside themselves: ``--resume auto``).
Profiles size the run: ``smoke`` (minutes, for the test), ``cpu`` (2 CPU cores, about an hour for
two patients), ``gpu`` (the papers' sizes).  See docs/training.md, "Cross-patient study: leave one patient out".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # training/recipes.py, training/bundle.py

from recipes import METHODS, PROFILES, patient_dirs, table_rows, train_args  # noqa: E402

from x2recon.io.atomic import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATIENTS = ["chest_lidc0001", "wholebody_tcga_thca"]

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="study folder (datasets, runs, steps/, results.md/json)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="sizes (default: %(default)s)")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data",
                   help="folder holding the patients' case folders (default: %(default)s)")
    p.add_argument("--patients", default=",".join(DEFAULT_PATIENTS),
                   help="case folders (under --data-root, or paths), at least two (default: %(default)s)")
    p.add_argument("--isocenter", default="thorax", choices=["thorax", "structures", "ct"],
                   help="build-dataset --isocenter for every dataset (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--device", default="auto", help="device of training and evaluation")
    p.add_argument("--bundle", type=Path, metavar="DIR",
                   help="after the folds, train the bundled assets on every patient (X2B skeleton with the recipe "
                        "that held out better, SPIDER, the X2BR detector and template library from the labelled "
                        "patients) and write them with cards.json (held-out figures from the folds) into DIR, "
                        "e.g. x2recon/resources/models")
    p.add_argument("--train-realism", choices=["on", "off"], default="on",
                   help="build-dataset --xray-realism of the training datasets (the test patient's DRRs are always "
                        "clean, as in the papers) (default: %(default)s: the bundled models' recipe)")
    a = p.parse_args(argv)
    a.patients = patient_dirs(p, a.patients, a.data_root)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if not a.methods or set(a.methods) - set(METHODS):
        p.error(f"--methods: choose among {','.join(METHODS)}")
    return a


class Study:
    """Runs named steps once each (records in ``out/steps``) and prints progress."""

    def __init__(self, out: Path, n_steps: int):
        self.out, self.n, self.i = out, n_steps, 0
        (out / "steps").mkdir(parents=True, exist_ok=True)

    def record(self, name: str) -> Path:
        return self.out / "steps" / f"{name}.json"

    def step(self, name: str, args: list[str]) -> dict:
        """Run ``x2recon <args>`` unless step ``name`` is recorded as finished; return its record."""
        self.i += 1
        rec = self.record(name)
        if rec.is_file():
            print(f"[{self.i}/{self.n}] {name}: done before, skipped", flush=True)
            return json.loads(rec.read_text())
        print(f"[{self.i}/{self.n}] {name}: x2recon {' '.join(args)}", flush=True)
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "x2recon.cli", *args], cwd=self.out)
        if r.returncode != 0:
            sys.exit(f"step {name} failed (exit {r.returncode}); fix and run the same command again to resume")
        info = {"step": name, "command": ["x2recon", *args], "seconds": round(time.perf_counter() - t, 1)}
        atomic_write_text(rec, json.dumps(info, indent=1))
        print(f"[{self.i}/{self.n}] {name}: {info['seconds']} s", flush=True)
        return info


def fold_steps(st: Study, a: argparse.Namespace, held, prof: dict) -> list[dict]:
    """Build, train and evaluate every method with patient ``held`` left out; the evaluation rows."""
    others = [str(p) for p in a.patients if p != held]
    fold = a.out / held.name
    common = ["--structures", "skeleton", "--isocenter", a.isocenter, "--quiet", *prof["build"]]
    train_ds, test_ds = fold / "train_data", fold / "test_data"
    st.step(f"{held.name}.build_train", ["build-dataset", "--ct", *others, "--out", str(train_ds), *common,
                                         "--xray-realism", a.train_realism])
    test_build = [x for x in common if x != "--variants"]
    if "--variants" in common:  # the held-out patient's own scan only, never a variant of it
        i = common.index("--variants")
        test_build = common[:i] + ["--variants", "0"] + common[i + 2:]
    st.step(f"{held.name}.build_test", ["build-dataset", "--ct", str(held), "--out", str(test_ds), *test_build])
    rows = []
    for m in a.methods:
        run = fold / "runs" / m
        st.step(f"{held.name}.train_{m}", train_args(m, train_ds, run, prof, a.device))
        csv_path = fold / f"eval_{m}.csv"
        st.step(f"{held.name}.eval_{m}", ["evaluate", "--model", str(run / "best.safetensors"), "--data", str(test_ds),
                                          "--split", "all", "--out", str(csv_path), "--device", a.device, "--quiet",
                                          *(prof["eval"] if m != "spider" else [])])
        rows += table_rows(m, held.name, len(others), csv_path)
    return rows


def write_results(out: Path, rows: list[dict], profile: str) -> None:
    """``results.json`` (rows + step times) and ``results.md`` (one table row per method × patient × protocol)."""
    steps = sorted((json.loads(p.read_text()) for p in (out / "steps").glob("*.json")), key=lambda s: s["step"])
    atomic_write_text(out / "results.json", json.dumps({"profile": profile, "rows": rows, "steps": steps}, indent=1))
    cols = sorted({k for r in rows for k in r["metrics"]})
    lines = [f"Leave-one-patient-out, profile {profile} (means over the held-out patient's cases)", "",
             "| method | held-out patient | n training patients | protocol | " + " | ".join(cols) + " |",
             "|" + "---|" * (4 + len(cols))]
    for r in rows:
        vals = [("" if r["metrics"].get(c) is None else f"{r['metrics'][c]:.4g}") if c in r["metrics"] else "—" for c in cols]
        lines.append(f"| {r['method']} | {r['held_out']} | {r['n_train_patients']} | {r['protocol']} | " + " | ".join(vals) + " |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    a = parse_args(argv)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    prof = PROFILES[a.profile]
    st = Study(a.out, len(a.patients) * (2 + 2 * len(a.methods)) + (7 + len(a.patients) if a.bundle else 0))
    rows = []
    for held in a.patients:
        rows += fold_steps(st, a, held, prof)
    write_results(a.out, rows, a.profile)
    if a.bundle:
        from bundle import bundle_steps  # training/bundle.py: the bundled assets from the same recipes

        bundle_steps(st, a, prof, rows)  # adds the demo model's rows
        write_results(a.out, rows, a.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
