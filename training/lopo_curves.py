#!/usr/bin/env python3
"""What more data buys: the leave-one-patient-out curves of X2B over every shared patient, one command.

For each held-out patient the skeleton network (our recipe, ``recipes.OURS`` + the profile's X2B flags) is
trained on the *other* patients and scored on the held-out patient's undeformed scan (clean AP DRR, both
protocols, predicted/true bone volume):

* vs **training steps** — one run with all other patients, evaluated at each of ``--steps`` (the run resumes
  from its last checkpoint to the next budget; the learning rate is constant, so a stage is the same as a
  run of that length);
* vs **number of training patients** — runs on the first 1, 2, … of the other patients (in ``--patients``
  order, rotated per fold) to ``--curve-steps``;
* the **no-learning baseline** (``x2recon evaluate --atlas``): the best-matching training case's bones aligned
  to the X-ray (``x2b.atlas``).

Each patient's cases are built once (``pools/<patient>``: the CT + ``--variants`` deformed copies, AP/PA/LAT,
X-ray realism on; ``tests/<patient>``: the scan alone, clean AP) and hard-linked into each fold's datasets,
split by variant (every training patient trains; the highest-numbered variants validate, which calibrates
the surface threshold). ``--bundle DIR`` then trains the bundled ``skeleton`` model on every patient to the
largest step budget and writes it with its card (held-out rows from the folds).

Every step is ``python -m x2recon.cli ...`` in a subprocess, recorded in ``<out>/steps/<step>.json`` once it
succeeds: running the same command again resumes.  ``results.md`` / ``results.json``: every row, the means
over folds per (method, patients, steps), and a power-law extrapolation of the patients curve.
See docs/training.md, "What more patients buy".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # training/recipes.py, cross_patient.py, bundle.py

from bundle import geometry_line, machine, merge_datasets, make_portable, save_half  # noqa: E402
from cross_patient import Study  # noqa: E402
from recipes import OURS, PROFILES, patient_dirs, table_rows  # noqa: E402

from x2recon.io.atomic import atomic_write_text  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: Method label of the rows scored at a fixed threshold (followed by τ).
FIXED = "x2b τ="
PATIENTS = ["chest_lidc0001", "wholebody_tcga_thca", "chest_lungdx_a0001", "abdomen_pancreas_cb001"]
#: The figures the curves and the card report (world protocol unless prefixed), lower or higher better.
KEY_METRICS = [("world", "chamfer_l1", "Chamfer-L1 (mm) ↓"), ("world", "fscore", "F@7.68 mm ↑"),
               ("world", "volume_ratio", "volume pred/true"), ("paper", "iou", "paper IoU ↑"),
               ("paper", "chamfer_l1", "paper Chamfer-L1 ↓"), ("paper", "fscore", "paper F@0.02 ↑")]


def _data_root() -> Path:
    env = os.environ.get("X2RECON_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="study folder (pools, tests, folds, steps/, results.md/json)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu", help="sizes (default: %(default)s)")
    p.add_argument("--data-root", type=Path, default=_data_root(),
                   help="folder of the patients' folders (default: $X2RECON_SHARED_DATA or %(default)s)")
    p.add_argument("--patients", default=",".join(PATIENTS), help="folders under --data-root, or paths (default: %(default)s)")
    p.add_argument("--variants", type=int, default=2, help="deformed copies per patient in its pool (default: %(default)s)")
    p.add_argument("--build-flags", default="", help="extra build-dataset flags of the pools (e.g. augmentation ranges)")
    p.add_argument("--steps", default="100,300,900", help="step budgets of the steps curve (default: %(default)s)")
    p.add_argument("--curve-steps", type=int, default=300,
                   help="step budget of the patients curve (one of --steps; default: %(default)s)")
    p.add_argument("--no-atlas", action="store_true", help="leave out the no-learning baseline")
    p.add_argument("--thresholds", default="0.15,0.25",
                   help="fixed surface thresholds the final model of each fold is also scored at, beside the one its "
                        "validation calibrated (default: %(default)s); --bundle keeps the one with the best mean held-out "
                        "figures")
    p.add_argument("--bundle", type=Path, metavar="DIR", help="then train the bundled skeleton model on every patient "
                   "to the largest --steps and write it with its card into DIR (e.g. x2recon/resources/models)")
    p.add_argument("--device", default="auto")
    p.add_argument("--folds", help="held-out patients to run (default: every one; e.g. two commands with halves "
                   "run folds side by side — each writes results.md from every fold finished so far)")
    p.add_argument("--threads", type=int, help="torch threads of each training (default: the profile's)")
    a = p.parse_args(argv)
    a.patients = patient_dirs(p, a.patients, a.data_root)
    a.thresholds = sorted({float(t) for t in a.thresholds.split(",") if t.strip()})
    if any(not 0 < t < 1 for t in a.thresholds):
        p.error("--thresholds: occupancy probabilities between 0 and 1")
    a.steps = sorted({int(s) for s in a.steps.split(",") if s.strip()})
    if not a.steps or min(a.steps) <= 0:
        p.error("--steps: positive step budgets, e.g. 100,300,900")
    if a.curve_steps not in a.steps:
        p.error(f"--curve-steps {a.curve_steps} must be one of --steps {a.steps}")
    names = [d.name for d in a.patients]
    a.folds = names if a.folds is None else [x.strip() for x in a.folds.split(",") if x.strip()]
    if set(a.folds) - set(names):
        p.error(f"--folds: {sorted(set(a.folds) - set(names))} not among --patients")
    return a


def _without(args: list[str], *names: str) -> list[str]:
    """``args`` without the options ``names`` and their values."""
    out, skip = [], False
    for x in args:
        if skip:
            skip = False
        elif x in names:
            skip = True
        else:
            out.append(x)
    return out


class Curves:
    """The study's steps, in the order they run."""

    def __init__(self, a: argparse.Namespace):
        self.a, self.prof = a, PROFILES[a.profile]
        self.build = ["--structures", "skeleton", "--isocenter", "thorax", "--quiet", "--split-by", "variant",
                      *_without(self.prof["build"], "--variants")]
        n, k = len(a.patients), len(a.steps)
        self.st = Study(a.out, 2 * n + len(a.folds) * (1 + 2 * k + len(a.thresholds) + 3 * (n - 2) + (0 if a.no_atlas else 1))
                        + (3 if a.bundle else 0))

    @property
    def rows(self) -> list[dict]:
        """Every evaluated row of the study so far (``rows/*.json``: also other commands' folds)."""
        return [r for f in sorted((self.a.out / "rows").glob("*.json")) for r in json.loads(f.read_text())]

    # -- data
    def pools(self) -> None:
        a = self.a
        for p in a.patients:
            self.st.step(f"pool.{p.name}", ["build-dataset", "--ct", str(p), "--out", str(a.out / "pools" / p.name),
                                            *self.build, "--variants", str(a.variants), "--views", "AP,PA,LAT",
                                            "--xray-realism", "on", *a.build_flags.split()])
            self.st.step(f"test.{p.name}", ["build-dataset", "--ct", str(p), "--out", str(a.out / "tests" / p.name),
                                            *self.build, "--variants", "0", "--views", "AP", "--xray-realism", "off"])

    def compose(self, name: str, patients: list[Path]) -> Path:
        """A training dataset of ``patients``' pools (hard links), split by variant; made once."""
        out = self.a.out / "sets" / name
        if not (out / "manifest.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            merge_datasets([self.a.out / "pools" / p.name for p in patients], out)
            self.st.step(f"manifest.{name}", ["manifest", str(out), "--split-by", "variant"])
        return out

    # -- training and scoring
    def train_to(self, tag: str, data: Path, steps: int) -> Path:
        run = self.a.out / "runs" / tag
        x2b = _without(self.prof["x2b"], "--steps", *(["--threads"] if self.a.threads else []))
        x2b += ["--threads", str(self.a.threads)] if self.a.threads else []
        self.st.step(f"train.{tag}.s{steps}", ["train", "x2b", "--data", str(data), "--out", str(run), "--device",
                                               self.a.device, "--quiet", *OURS, *x2b, "--steps", str(steps)])
        return run / "best.safetensors"

    def evaluate(self, tag: str, held: Path, args: list[str], method: str, n_train: int, steps: int | None) -> None:
        csv_path = self.a.out / "eval" / f"{tag}.csv"
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        net = ["--device", self.a.device, *self.prof["eval"]] if "--model" in args else _without(self.prof["eval"], "--resolution")
        self.st.step(f"eval.{tag}", ["evaluate", *args, "--data", str(self.a.out / "tests" / held.name), "--split", "all",
                                     "--out", str(csv_path), "--quiet", *net])
        rows = [{**r, "method": method, "steps": steps} for r in table_rows("x2b", held.name, n_train, csv_path)]
        atomic_write_text(self.a.out / "rows" / f"{tag}.json", json.dumps(rows, indent=1))

    def fold(self, held: Path) -> None:
        a = self.a
        others = [p for p in a.patients if p != held]
        k = a.patients.index(held)
        others = others[k % len(others):] + others[:k % len(others)]  # a different first patient per fold
        full = self.compose(f"{held.name}.n{len(others)}", others)
        for s in a.steps:
            ckpt = self.train_to(f"{held.name}.n{len(others)}", full, s)
            self.evaluate(f"{held.name}.n{len(others)}.s{s}", held, ["--model", str(ckpt)], "x2b", len(others), s)
        for t in a.thresholds:  # the final model at fixed thresholds: is the calibrated one right for new patients?
            self.evaluate(f"{held.name}.n{len(others)}.s{s}.t{t:g}", held, ["--model", str(ckpt), "--threshold", f"{t:g}"],
                          f"{FIXED}{t:g}", len(others), s)
        for n in range(1, len(others)):
            data = self.compose(f"{held.name}.n{n}", others[:n])
            ckpt = self.train_to(f"{held.name}.n{n}", data, a.curve_steps)
            self.evaluate(f"{held.name}.n{n}.s{a.curve_steps}", held, ["--model", str(ckpt)], "x2b", n, a.curve_steps)
        if not a.no_atlas:
            lib = ",".join(str(a.out / "pools" / p.name) for p in others)
            self.evaluate(f"{held.name}.atlas", held, ["--atlas", lib], "atlas (no learning)", len(others), None)

    def bundle(self) -> None:
        a = self.a
        data = self.compose("all", a.patients)
        top = max(a.steps)
        ckpt = self.train_to("all", data, top)
        tau = choose_threshold(self.rows, top, len(a.patients) - 1)
        install_skeleton(a, ckpt, data, self.rows, top, self.st.record(f"train.all.s{top}"), tau)


def choose_threshold(rows: list[dict], steps: int, n_train: int) -> dict:
    """The surface threshold of the bundled model, chosen on the folds (patients the fold models never saw): among
    the calibrated one ("x2b") and the fixed ones, the lowest mean held-out world Chamfer-L1 whose mean volume ratio
    is within 0.67–1.5 (or, if none is, the mean volume ratio nearest 1)."""
    cands = {}
    for s in summarise([r for r in rows if r["steps"] == steps and r["n_train_patients"] == n_train]):
        if s["method"] == "x2b" or s["method"].startswith(FIXED):
            cands[s["method"]] = (s["stats"]["world_chamfer_l1"][0], s["stats"]["world_volume_ratio"][0], s["folds"])
    ok = {m: v for m, v in cands.items() if 0.67 <= v[1] <= 1.5}
    best = min(ok, key=lambda m: ok[m][0]) if ok else min(cands, key=lambda m: abs(math.log(max(cands[m][1], 1e-6))))
    tau = None if best == "x2b" else float(best[len(FIXED):])
    return {"threshold": tau, "method": best, "chamfer_mm": cands[best][0], "volume_ratio": cands[best][1],
            "folds": cands[best][2], "candidates": {m: {"chamfer_mm": v[0], "volume_ratio": v[1]} for m, v in cands.items()}}


def install_skeleton(a, ckpt: Path, data: Path, rows: list[dict], steps: int, record: Path, tau: dict) -> None:
    """The bundled skeleton model (float16) at the threshold ``choose_threshold`` chose, and its card: training
    patients, command, held-out rows at ``steps``."""
    from x2recon.nn.checkpoint import load_model, read_config, save_checkpoint

    dest = a.bundle
    dest.mkdir(parents=True, exist_ok=True)
    if tau["threshold"] is None:
        save_half(ckpt, dest / "x2b_skeleton.safetensors")
    else:  # a fixed τ the folds chose: the model's own threshold, no calibrated one
        model, _ = load_model(ckpt)
        config = {k: v for k, v in read_config(ckpt).items() if k not in ("format", "versions")}
        config["model"]["threshold"] = tau["threshold"]
        config["training"] = {**config["training"], "calibrate_threshold": False,
                              "threshold_chosen_by": "leave-one-patient-out folds (training/lopo_curves.py)"}
        save_checkpoint(dest / "x2b_skeleton.safetensors", model, config, half=True)
    manifest = json.loads((data / "manifest.json").read_text())
    meta = json.loads((data / "cases" / manifest["cases"][0]["case_id"] / "meta.json").read_text())
    rec = json.loads(record.read_text())
    chosen = "x2b" if tau["threshold"] is None else tau["method"]
    folds = [r for r in rows if r["method"] == chosen and r["steps"] == steps and r["n_train_patients"] == len(a.patients) - 1]
    card = {"what": "X2B: one frontal X-ray → all-bone occupancy mesh (x2recon reconstruct --model skeleton)",
            "recipe": "x2b_ours", "command": " ".join(rec["command"]),
            "trained_on": {"patients": [p.name for p in a.patients], "cases": len(manifest.get("cases", [])),
                           "variants_per_patient": a.variants, "xray_realism": "on"},
            "structures": "skeleton: all bone from Hounsfield units (--structures skeleton)",
            "geometry": geometry_line(meta.get("config") or {}),
            "threshold": ("calibrated on the validation variants (x2recon train --calibrate-threshold)"
                          if tau["threshold"] is None else
                          f"τ = {tau['threshold']:g}, chosen on the leave-one-patient-out folds (lowest mean held-out "
                          f"Chamfer-L1 with the volume ratio in 0.67–1.5; the validation-calibrated one: "
                          f"{tau['candidates'].get('x2b')})"),
            "held_out": {"protocol_note": "leave-one-patient-out over the patients above: the same recipe trained "
                                          "without the scored patient, scored on its undeformed scan's clean AP DRR "
                                          "(training/lopo_curves.py)", "folds": folds},
            "train_seconds": rec["seconds"], "stored": "float16 weights (loaded as float32)",
            "file": "x2b_skeleton.safetensors", "not_clinical": True,
            "note": "Research demo trained on very few patients on a CPU; not a clinical model.",
            "profile": a.profile, "measured_on": machine()}
    path = dest / "cards.json"
    cards = json.loads(path.read_text()) if path.is_file() else {}
    cards["skeleton"] = card
    atomic_write_text(path, json.dumps(cards, indent=1) + "\n")
    make_portable(dest, a.out)
    print(f"bundled skeleton model and its card written to {dest}", flush=True)


# ---------------------------------------------------------------------------------------------- results
def _stat(vals: list[float]) -> tuple[float, float]:
    v = [x for x in vals if x is not None and not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def summarise(rows: list[dict]) -> list[dict]:
    """Means ± sd over folds for each (method, training patients, steps)."""
    keys = sorted({(r["method"], r["n_train_patients"], r["steps"] or 0) for r in rows}, key=lambda k: (k[0] != "x2b", k))
    out = []
    for method, n, steps in keys:
        sel = [r for r in rows if (r["method"], r["n_train_patients"], r["steps"] or 0) == (method, n, steps)]
        folds = sorted({r["held_out"] for r in sel})
        stats = {}
        for proto, key, _ in KEY_METRICS:
            stats[f"{proto}_{key}"] = _stat([r["metrics"].get(key) for r in sel if r["protocol"] == proto])
        out.append({"method": method, "n_train_patients": n, "steps": steps or None, "folds": len(folds), "stats": stats})
    return out


def extrapolate(rows: list[dict], steps: int) -> dict | None:
    """Power law e(n) = a·n^(−b) of the held-out world Chamfer-L1 vs training patients at ``steps``, fitted per fold
    (least squares in log–log); the prediction at 100 and 1 000 patients as the median and range over folds."""
    by_fold: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["method"] == "x2b" and r["steps"] == steps and r["protocol"] == "world":
            v = r["metrics"].get("chamfer_l1")
            if v is not None and not math.isnan(v):
                by_fold.setdefault(r["held_out"], []).append((r["n_train_patients"], v))
    fits = []
    for pts in by_fold.values():
        if len({n for n, _ in pts}) < 2:
            continue
        xs, ys = [math.log(n) for n, _ in pts], [math.log(v) for _, v in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = -sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = math.exp(my + b * mx)
        fits.append((a, b))
    if not fits:
        return None
    pred = {n: sorted(a * n ** -b for a, b in fits) for n in (100, 1000)}
    return {"steps": steps, "folds": len(fits), "exponents": sorted(round(b, 3) for _, b in fits),
            "chamfer_mm": {n: {"median": round(v[len(v) // 2], 2), "min": round(v[0], 2), "max": round(v[-1], 2)}
                           for n, v in pred.items()}}


def write_results(out: Path, rows: list[dict], a) -> None:
    steps = sorted((json.loads(p.read_text()) for p in (out / "steps").glob("*.json")), key=lambda s: s["step"])
    summary = summarise(rows)
    ext = extrapolate(rows, a.curve_steps)
    atomic_write_text(out / "results.json", json.dumps({"profile": a.profile, "patients": [p.name for p in a.patients],
                                                        "rows": rows, "summary": summary, "extrapolation": ext,
                                                        "steps": steps}, indent=1))
    head = " | ".join(label for _, _, label in KEY_METRICS)
    lines = [f"Leave-one-patient-out over {len(a.patients)} patients ({', '.join(p.name for p in a.patients)}), "
             f"profile {a.profile}: mean ± sd over the held-out folds (each fold: the held-out patient's undeformed "
             "scan, clean AP DRR; world protocol in mm unless 'paper')", "",
             f"| method | training patients | steps | folds | {head} |", "|" + "---|" * (4 + len(KEY_METRICS))]
    for s in summary:
        vals = []
        for proto, key, _ in KEY_METRICS:
            m, sd = s["stats"][f"{proto}_{key}"]
            d = 2 if proto == "world" and key in ("chamfer_l1", "volume_ratio") else 3
            vals.append("—" if math.isnan(m) else f"{m:.{d}f} ± {sd:.{d}f}")
        lines.append(f"| {s['method']} | {s['n_train_patients']} | {s['steps'] or '—'} | {s['folds']} | " + " | ".join(vals) + " |")
    if ext:
        c = ext["chamfer_mm"]
        lines += ["", f"Power law of the held-out Chamfer-L1 vs training patients at {ext['steps']} steps, fitted per fold "
                  f"({ext['folds']} folds, exponents {ext['exponents']}): 100 patients → {c[100]['median']} mm "
                  f"(range {c[100]['min']}–{c[100]['max']}), 1 000 → {c[1000]['median']} mm (range {c[1000]['min']}–"
                  f"{c[1000]['max']})"]
    lines += ["", "Per fold:", "", "| method | held-out patient | training patients | steps | protocol | IoU | Chamfer-L1 | F | "
              "volume pred/true |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        f = lambda k: "—" if m.get(k) is None else f"{m[k]:.4g}"  # noqa: E731
        lines.append(f"| {r['method']} | {r['held_out']} | {r['n_train_patients']} | {r['steps'] or '—'} | {r['protocol']} | "
                     f"{f('iou')} | {f('chamfer_l1')} | {f('fscore')} | {f('volume_ratio')} |")
    secs = {s["step"]: s["seconds"] for s in steps}
    lines += ["", "Seconds per step: " + ", ".join(f"{k} {v}" for k, v in secs.items())]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines[: 5 + len(summary) + (2 if ext else 0)]))


def main(argv=None) -> int:
    a = parse_args(argv)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    c = Curves(a)
    c.pools()
    for held in a.patients:
        if held.name in a.folds:
            c.fold(held)
            write_results(a.out, c.rows, a)
    if a.bundle:
        c.bundle()
    write_results(a.out, c.rows, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
