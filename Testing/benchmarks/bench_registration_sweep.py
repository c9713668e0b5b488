"""Registration parameter sweep on real bone surfaces: which BCPD/GBCPD settings recover known deformations.

  python Testing/benchmarks/bench_registration_sweep.py [--quick] [--points N] [--cases ribs,spine,vertebra]
         [--threads 1] [--csv OUT.csv]

Why: Hirose's program defaults (β = λ = 2, γ = 1, τ = 1) fail on neighbouring bones (issue 12 §5: two
ribs, rib 6 moved ~15 mm → 6–16 mm mean vertex error, worse than not registering). This sweep measures,
on several real cases, the mean distance of every registered source vertex to its known true position,
so that ``x2recon register``'s defaults (``x2recon.registration.methods.DEFAULTS``) and X2BR's settings
are chosen from numbers, not from one case.

Cases (the chest CT of ../shared/data, meshes from x2recon's own extraction, each structure simplified
to ``--points`` vertices with pyfqmr; target = 80 % of the moved vertices, shuffled; truth = every
source vertex moved):

- ``ribs``: rib_left_5 + rib_left_6 (two shells); rib 6 pulled away from rib 5 by 12–18 mm, the amount
  varying as one sine period along the rib (so it is also bent);
- ``spine``: T6–T9 (four shells) bent about the left–right axis on a circle of radius 120 mm through
  the segment's centre (the ends move ~8 mm, each vertebra tilts);
- ``vertebra``: T8 scaled by 1.10 about its centroid and shifted 3 mm.

Rows: CPD (Myronenko's defaults) and Hirose's defaults as references, then GBCPD over β × λ × γ
(τ = 1, exact kernel, normalize e, ω = 0), then one-at-a-time changes of τ, K, normalize and ω around
the best of those, then β again at the best τ. Printed per row: mean vertex error (mm) per case, the
worst case, total seconds.
Rows are ranked by the worst case, so the winner is robust over all cases, not tuned to one.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest.shared_data_dir

CASES = ("ribs", "spine", "vertebra")
_STRUCTURES = {"ribs": ["rib_left_5", "rib_left_6"], "spine": [f"vertebrae_T{i}" for i in (6, 7, 8, 9)],
               "vertebra": ["vertebrae_T8"]}


# ------------------------------------------------------------------------------------------- data
def bone_meshes(names: list[str], points: int, case: str = "chest_lidc0001_half") -> list:
    """The named structures' meshes (x2recon's extraction), each simplified to ~``points`` vertices (0: not)."""
    import pyfqmr
    import trimesh
    from conftest import shared_data_dir

    from x2recon.dataset.config import BuildConfig
    from x2recon.dataset.segmentation import segment
    from x2recon.io.volume import read_ct
    from x2recon.mesh.extract import labelmap_to_meshes

    d = shared_data_dir() / case
    seg, labels, _ = segment(read_ct(d / "ct.nii.gz"), d / "labels.nii.gz", BuildConfig(structures=names))
    meshes, _ = labelmap_to_meshes(seg, labels)
    out = []
    for name in names:
        m = meshes[name]
        if 0 < points < len(m.vertices):
            s = pyfqmr.Simplify()
            s.setMesh(np.asarray(m.vertices), np.asarray(m.faces))
            s.simplify_mesh(target_count=2 * points, aggressiveness=5, preserve_border=True, verbose=False)
            v, f, _ = s.getMesh()
            m = trimesh.Trimesh(v, f, process=False)
        out.append(m)
    return out


def _problem(parts: list, truth_of, seed: int):
    """Source = the parts as one mesh; truth = ``truth_of(vertices, part index)``; target = 80 % of it, shuffled."""
    import trimesh

    src = trimesh.util.concatenate(parts)
    v = np.asarray(src.vertices, np.float64)
    part = np.repeat(np.arange(len(parts)), [len(p.vertices) for p in parts])
    gt = truth_of(v, part)
    keep = np.random.default_rng(seed).permutation(len(gt))[:int(0.8 * len(gt))]
    return src, gt[keep], gt


def rib_pair(rib5, rib6, seed: int = 0):
    """(source mesh, target points, truth): rib 6 pulled 12–18 mm away from rib 5, the amount one sine
    period along the rib's long axis (a smooth bend)."""

    def truth(v, part):
        a, b = v[part == 0], v[part == 1]
        u = b.mean(0) - a.mean(0)
        u /= np.linalg.norm(u)
        c = b - b.mean(0)
        p = c @ np.linalg.svd(c, full_matrices=False)[2][0]
        amount = 15.0 + 3.0 * np.sin(2 * np.pi * (p - p.min()) / np.ptp(p))
        out = v.copy()
        out[part == 1] += amount[:, None] * u
        return out

    return _problem([rib5, rib6], truth, seed)


def bent_spine(vertebrae, radius: float = 120.0, seed: int = 0):
    """(source, target, truth): the segment bent about the left–right (x) axis on a circle of ``radius`` mm
    through its centre, lengths along the superior (z) axis kept."""

    def truth(v, part):
        c = v.mean(0)
        y, s = v[:, 1] - c[1], v[:, 2] - c[2]
        k = 1.0 / radius
        out = v.copy()
        out[:, 1] = c[1] + radius - (radius - y) * np.cos(k * s)
        out[:, 2] = c[2] + (radius - y) * np.sin(k * s)
        return out

    return _problem(list(vertebrae), truth, seed)


def scaled_vertebra(vertebra, scale: float = 1.10, seed: int = 0):
    """(source, target, truth): the vertebra scaled about its centroid and shifted 3 mm."""
    return _problem([vertebra], lambda v, part: (v - v.mean(0)) * scale + v.mean(0) + [3.0, -2.0, 1.0], seed)


def make_cases(names, points: int) -> dict:
    build = {"ribs": lambda m: rib_pair(*m), "spine": bent_spine, "vertebra": lambda m: scaled_vertebra(m[0])}
    return {c: build[c](bone_meshes(_STRUCTURES[c], points)) for c in names}


# ------------------------------------------------------------------------------------------- rows
def rows(quick: bool) -> list[tuple[str, str, dict]]:
    """(label, method, params) of the first stage: references and GBCPD over β × λ × γ."""
    out = [("CPD defaults", "cpd", {}),
           ("Hirose's defaults (β 2 λ 2 γ 1 τ 1)", "gbcpd", dict(beta=2.0, lam=2.0, gamma=1.0, tau=1.0, nystrom=0)),
           ("issue 12: τ .2 K 70 normalize x", "gbcpd", dict(beta=2.0, lam=2.0, gamma=1.0, tau=0.2, nystrom=70,
                                                                normalize="x"))]
    betas, lams, gammas = ((0.5, 1.0, 2.0), (2.0, 20.0, 50.0, 200.0), (0.3, 1.0)) if not quick else \
        ((0.5, 1.0, 2.0), (2.0, 50.0, 200.0), (0.3, 1.0))
    for b, lam, g in itertools.product(betas, lams, gammas):
        out.append((f"β {b:g} λ {lam:g} γ {g:g}", "gbcpd", dict(beta=b, lam=lam, gamma=g, tau=1.0, nystrom=0)))
    return out


def variations(best: dict) -> list[tuple[str, str, dict]]:
    """Second stage: τ, K, normalize, ω changed one at a time around ``best`` (and BCPD with it)."""
    base = f"β {best['beta']:g} λ {best['lam']:g} γ {best['gamma']:g}"
    out = [(f"{base} τ {t:g}", "gbcpd", {**best, "tau": t}) for t in (0.2, 0.5)]
    out += [(f"{base} K {k}", "gbcpd", {**best, "nystrom": k}) for k in (70, 300)]
    out += [(f"{base} normalize x", "gbcpd", {**best, "normalize": "x"}),
            (f"{base} ω 0.1", "gbcpd", {**best, "w": 0.1}),
            (f"BCPD (Gaussian) {base}", "bcpd", {k: v for k, v in best.items() if k != "tau"})]
    return out


def refinements(best: dict) -> list[tuple[str, str, dict]]:
    """Third stage: β again, at the τ of the second stage's winner (τ changes how wide the kernel acts)."""
    base = f"λ {best['lam']:g} γ {best['gamma']:g} τ {best['tau']:g}"
    return [(f"β {b:g} {base}", "gbcpd", {**best, "beta": b}) for b in (0.5, 0.7, 1.0, 1.5) if b != best["beta"]]


def run_row(cases: dict, method: str, params: dict) -> dict:
    """Mean vertex error (mm) per case and total seconds of one parameter set."""
    from x2recon.registration import register

    out, seconds = {}, 0.0
    for name, (src, target, gt) in cases.items():
        t0 = time.perf_counter()
        res = register(src, target, method, device="cpu", **params)
        seconds += time.perf_counter() - t0
        out[name] = float(np.linalg.norm(res.Y_hat - gt, axis=1).mean())
    out["worst"] = max(out[c] for c in cases)
    out["seconds"] = seconds
    return out


def print_row(label: str, r: dict, names) -> None:
    print(f"| {label:<40} | " + " | ".join(f"{r[c]:8.3f}" for c in names) + f" | {r['worst']:8.3f} | "
          f"{r['seconds']:7.1f} |", flush=True)


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="400 vertices per structure, a smaller λ grid")
    ap.add_argument("--points", type=int, help="vertices per structure after simplification (default 800; "
                                               "--quick 400; 0: unsimplified)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the timing is per core)")
    ap.add_argument("--csv", help="also write the table here")
    a = ap.parse_args(argv)
    names = [c for c in a.cases.split(",") if c]
    if set(names) - set(CASES):
        ap.error(f"--cases: unknown {sorted(set(names) - set(CASES))}")
    import torch

    torch.set_num_threads(a.threads)
    points = a.points if a.points is not None else (400 if a.quick else 800)
    cases = make_cases(names, points)
    for c, (src, tgt, gt) in cases.items():
        before = np.linalg.norm(np.asarray(src.vertices) - gt, axis=1).mean()
        print(f"{c}: {len(src.vertices)} source vertices, {len(tgt)} target points, {before:.2f} mm before")
    print(f"\n| {'parameters':<40} | " + " | ".join(f"{c:>8}" for c in names) + " |    worst | seconds |")
    print("|" + "---|" * (len(names) + 3))
    table = []
    for label, method, params in rows(a.quick):
        table.append((label, method, params, run_row(cases, method, params)))
        print_row(label, table[-1][3], names)
    best = min((t for t in table if t[1] == "gbcpd" and "τ" not in t[0]), key=lambda t: t[3]["worst"])
    for label, method, params in variations(best[2]):
        table.append((label, method, params, run_row(cases, method, params)))
        print_row(label, table[-1][3], names)
    best = min((t for t in table if t[1] == "gbcpd"), key=lambda t: t[3]["worst"])
    for label, method, params in refinements(best[2]):
        table.append((label, method, params, run_row(cases, method, params)))
        print_row(label, table[-1][3], names)
    ranked = sorted((t for t in table if t[1] == "gbcpd"), key=lambda t: t[3]["worst"])
    print("\nbest GBCPD rows by worst case (the defaults are chosen from these):")
    for label, _, _, r in ranked[:5]:
        print_row(label, r, names)
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["parameters", "method", "params", *names, "worst", "seconds"])
            for label, method, params, r in table:
                w.writerow([label, method, params, *(f"{r[c]:.4f}" for c in names), f"{r['worst']:.4f}",
                            f"{r['seconds']:.2f}"])
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
