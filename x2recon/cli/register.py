"""``x2recon register``: move a source mesh onto a target with CPD, BCPD or GBCPD (registered by ``x2recon.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (ProgressLines, non_negative_float, non_negative_int, output_file, positive_float, positive_int,
                     probability_below_one)

#: CLI flag → keyword of ``x2recon.registration.register`` (Hirose's names).
_PARAMS = {"w": "w", "lambda_": "lam", "beta": "beta", "gamma": "gamma", "kappa": "kappa", "tau": "tau",
           "nystrom": "nystrom", "downsample": "downsample", "max_iter": "max_iter", "min_iter": "min_iter",
           "tol": "tol", "normalize": "normalize", "seed": "seed", "dtype": "dtype"}


def _write_points(points, path: Path) -> None:
    import numpy as np

    from ..io.atomic import atomic_path

    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, points)
        else:
            np.savetxt(tmp, points, fmt="%.6f", delimiter="," if path.suffix.lower() == ".csv" else "\t")


def cmd_register(a) -> int:
    import numpy as np
    from scipy.spatial import cKDTree

    from ..errors import X2ReconInputError
    from ..errors import X2ReconInputError
    from ..io.mesh import MESH_SUFFIXES, write_mesh
    from ..registration import register
    from ..registration.inputs import POINT_SUFFIXES, load_points

    out = Path(a.out)
    if out.suffix.lower() not in MESH_SUFFIXES + POINT_SUFFIXES:
        raise X2ReconInputError(f"--out {out}", f"use a mesh ({', '.join(MESH_SUFFIXES)}) or points "
                                                f"({', '.join(POINT_SUFFIXES)}) file")
    src = load_points(a.source, "source")
    if a.method == "gbcpd" and src.faces is None:
        raise X2ReconInputError(a.source, "the source is a point cloud (no faces), and GBCPD's geodesic kernel "
                                          "walks along the source mesh's triangles: give the source as a mesh, "
                                          "or use --method bcpd or cpd, which take point clouds")
    tgt = load_points(a.target, "target")
    if src.faces is None and out.suffix.lower() in MESH_SUFFIXES:
        raise X2ReconInputError(a.source, f"the source is a point set (no triangles), so the result is points: "
                                          f"give --out a {'/'.join(POINT_SUFFIXES)} file")
    params = {key: getattr(a, flag) for flag, key in _PARAMS.items() if getattr(a, flag) is not None}
    prog = ProgressLines(a.progress_lines, a.quiet, "register")
    try:
        res = register(src.points, tgt.points, a.method, source_faces=src.faces, device=a.device,
                       progress=prog, **params)
    finally:
        prog.close()
    if src.faces is not None and out.suffix.lower() in MESH_SUFFIXES:
        write_mesh(res.mesh(), out)
    else:
        _write_points(res.Y_hat, out)
    d = cKDTree(tgt.points).query(res.Y_hat, workers=-1)[0]
    summary = res.summary()
    summary.update(out=str(out), source=str(a.source), target=str(a.target),
                   distance_to_target_mean=float(d.mean()), distance_to_target_max=float(d.max()))
    print(json.dumps(summary, indent=1))
    return 0


def _positive_or_inf(s: str) -> float:
    """κ: a number > 0, or ``inf`` (no prior on the mixing coefficients)."""
    return float("inf") if s.strip().lower() in ("inf", "infinity") else positive_float(s)


def add_parsers(sub) -> None:
    from ..registration.methods import METHODS  # light: the package imports torch only when a method runs

    p = sub.add_parser(
        "register", help="register a source mesh onto a target (CPD, BCPD, GBCPD/GBCPD++)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Move SOURCE (a mesh, or points) onto TARGET and write it (the source's triangles kept). "
                    "Methods:\n" + "\n".join(f"  {k:<11} {v}" for k, v in METHODS.items()) +
                    "\nParameters keep Hirose's names (bcpd program letters in brackets). Unset ones: CPD takes "
                    "Myronenko's defaults; BCPD/GBCPD take ours (β 2, λ 200, γ 0.3, GBCPD τ 0.2, ≥ 200 "
                    "iterations: chosen by Testing/benchmarks/bench_registration_sweep.py on real bones with "
                    "partial, noisy targets, where Hirose's β = λ = 2, γ = 1, τ = 1 drag a rib onto its "
                    "neighbour; docs/registration.md). Prints a JSON summary.",
        epilog="example: x2recon register template.ply x2b_bones.ply --method gbcpd --beta 1 --lambda 20 "
               "--downsample 5000 --out registered.ply")
    p.add_argument("source", help="mesh (.stl .ply .obj .off .vtk) or points (a point cloud in those formats, or "
                   ".npy .txt .xyz .csv; not for gbcpd) to move")
    p.add_argument("target", help="mesh, point cloud (.ply .vtk .obj .off without faces) or points to move onto")
    p.add_argument("--method", default="gbcpd", choices=list(METHODS), help="(default: %(default)s)")
    p.add_argument("--out", required=True, type=output_file, help="registered source: mesh file (source faces kept) or points file")
    g = p.add_argument_group("parameters (defaults: x2recon.registration.methods.DEFAULTS for BCPD/GBCPD, "
                             "Myronenko's for CPD)")
    g.add_argument("--w", type=probability_below_one, help="outlier probability ω in [0,1) [-w] (default 0)")
    g.add_argument("--lambda", dest="lambda_", metavar="LAMBDA", type=positive_float,
                   help="λ: stiffness of the deformation [-l] (BCPD/GBCPD 200, CPD 2)")
    g.add_argument("--beta", type=positive_float, help="β: kernel width, normalised units [-b] (BCPD/GBCPD 2, CPD 2)")
    g.add_argument("--gamma", type=positive_float, help="γ: initial σ scale [-g] (BCPD/GBCPD, default 0.3)")
    g.add_argument("--kappa", type=_positive_or_inf, help="κ: mixing-coefficient prior [-k] (BCPD/GBCPD, default inf)")
    g.add_argument("--tau", type=non_negative_float, help="τ: weight of the geodesic term [-G geodesic,τ] "
                   "(GBCPD, default 0.2; 1: geodesic only)")
    g.add_argument("--nystrom", type=non_negative_int, metavar="K", help="rank K of the kernel (Nyström) [-K]; 0: full "
                   "(default: full up to 2000 points, else 300)")
    g.add_argument("--downsample", type=positive_int, metavar="N", help="'++': register N points of each set and "
                   "interpolate the displacement [-D B,N,0.08] (BCPD/GBCPD)")
    g.add_argument("--max-iter", type=positive_int, help="maximum iterations [-n] (BCPD 500, CPD 150)")
    g.add_argument("--min-iter", type=non_negative_int, help="minimum iterations [-N] (BCPD/GBCPD, default 200)")
    g.add_argument("--tol", type=positive_float, help="convergence tolerance [-c] (BCPD: σ change 1e-4; CPD: relative "
                   "likelihood change 1e-5)")
    g.add_argument("--normalize", choices=["e", "x", "y", "n"], help="[-u] each set / by target / by source / none "
                   "(BCPD/GBCPD, default e)")
    g.add_argument("--seed", type=non_negative_int, help="random seed of the Nyström landmarks and downsampling [-r]")
    g = p.add_argument_group("running")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    g.add_argument("--dtype", choices=["float32", "float64"], help="default: float64 on CPU, float32 on CUDA")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--progress-lines", action="store_true",
                   help="print 'X2RECON_PROGRESS <percent> <message>' lines instead of a bar (Slicer panel)")
    p.set_defaults(func=cmd_register)


if __name__ == "__main__":  # pragma: no cover
    from . import main

    sys.exit(main(["register", *sys.argv[1:]]))
