"""``x2recon evaluate``: score a checkpoint on a dataset split — X2B/X2B2 (+ X2BR rows) or SPIDER."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..resources import model_arg
from .common import device, mise_resolution, output_dir, output_file, positive_int, probability, views
from .x2br import need_x2br_inputs


def default_csv(model: str | Path, split: str) -> Path:
    """``./evaluate_<model stem>_<split>.csv`` in the working directory: never beside the model, which
    for the bundled demo model is inside the installed package."""
    return Path.cwd() / f"evaluate_{Path(model).stem}_{split}.csv"


def cmd_evaluate(a) -> int:
    from ..dataset.lock import dataset_read_lock
    from ..errors import X2ReconInputError
    from ..nn.checkpoint import read_config

    if (a.model is None) == (a.atlas is None):
        raise X2ReconInputError("--model" if a.model else None, "give one of --model (a network) or --atlas "
                                                                "DIR[,DIR] (the no-learning atlas)")
    if a.atlas is not None:
        return _evaluate_atlas(a)
    cfg = read_config(a.model)
    root = Path(a.data)
    # a build, shard or manifest rewrite still writing the dataset: refuse (or wait) rather than score part of it;
    # the shared lock then keeps builds out while the cases are scored
    waiting = lambda holder: print(f"x2recon evaluate: {root}: waiting for {holder} to finish writing it",
                                   file=sys.stderr, flush=True)
    with dataset_read_lock(root, wait=a.wait, on_wait=waiting):
        return _evaluate(a, cfg, root)


def _evaluate(a, cfg: dict, root: Path) -> int:
    from ..dataset.model_fit import check_fit
    from ..dataset.torch_data import read_split
    from ..x2b.evaluate import evaluate_model, summary_table

    # the model against the data, before any work: structures, geometry, which cases it trained on
    fit = check_fit(cfg, root, read_split(root, a.split), allow_mismatch=a.allow_mismatch)
    fit.trained_on = _card_patients(a.model)
    for line in (fit.warning(), fit.seen_note()):
        if line:
            print(line, file=sys.stderr, flush=True)
    out_csv = Path(a.out) if a.out else default_csv(a.model, a.split)
    if cfg["network"] == "spider":
        from ..spider.evaluate import evaluate_spider, spider_tables

        rows = evaluate_spider(a.model, root, split=a.split, device=a.device, out_csv=out_csv,
                               volume_dir=a.meshes, progress=not a.quiet, fit=fit)
        print(spider_tables(rows, method="SPIDER" if cfg["model"]["decoder"] == "shared" else
                            f"SPIDER ({cfg['model']['decoder']})", note=fit.title()))
        print(f"per-case results: {out_csv}")
        return 0
    refiners = []
    if a.refine == "template":
        from ..x2br.evaluate import template_refiners

        need_x2br_inputs(a, allow_ground_truth=True)
        refiners = template_refiners(a.detector, a.templates,
                                     [m.strip() for m in a.registration.split(",") if m.strip()], device=a.device)
    rows = evaluate_model(a.model, root, split=a.split, views=views(a.views) or None, resolution=a.resolution,
                          device=a.device, n_points=a.points, out_csv=out_csv, mesh_dir=a.meshes, progress=not a.quiet,
                          refiners=refiners, fit=fit, threshold=a.threshold)
    print(summary_table(rows, method=cfg["network"].upper(), note=fit.title()))
    print(f"per-case results: {out_csv}")
    return 0


#: ``evaluate`` options of a network alone, with their defaults: --atlas refuses any other value.
NETWORK_ONLY = {"--resolution": 128, "--threshold": None, "--device": "auto", "--refine": "none", "--detector": None, "--templates": None,
                "--registration": "gbcpd,cpd", "--allow-mismatch": False}


def _evaluate_atlas(a) -> int:
    """``evaluate --atlas DIR[,DIR]``: the atlas (x2b.atlas) scored like X2B — the same CSV columns and tables,
    method "atlas"; a library case from a scored patient's CT is refused before any work."""
    import contextlib

    from ..dataset.lock import dataset_read_lock
    from ..errors import X2ReconInputError
    from ..x2b.atlas import METHOD, evaluate_atlas, load_library
    from ..x2b.evaluate import summary_table

    given = [o for o, d in NETWORK_ONLY.items() if getattr(a, o[2:].replace("-", "_")) != d]
    if given:
        raise X2ReconInputError(given[0], "is not used by --atlas (no network); leave it out")
    cases = load_library(a.atlas)
    roots = [Path(a.data)] + list(dict.fromkeys(c.root for c in cases))
    out_csv = Path(a.out) if a.out else Path.cwd() / f"evaluate_atlas_{a.split}.csv"
    with contextlib.ExitStack() as locks:  # neither the scored data nor the library may change while scored
        for r in roots:
            locks.enter_context(dataset_read_lock(r, wait=a.wait, on_wait=lambda holder, r=r: print(
                f"x2recon evaluate: {r}: waiting for {holder} to finish writing it", file=sys.stderr, flush=True)))
        rows = evaluate_atlas(cases, roots[0], split=a.split, views=views(a.views) or None, n_points=a.points,
                              out_csv=out_csv, mesh_dir=a.meshes, progress=not a.quiet,
                              log=None if a.quiet else lambda line: print(line, file=sys.stderr, flush=True))
    note = (f"library: {len(cases)} cases of {', '.join(str(r) for r in roots[1:])}, none from a scored "
            "patient's CT")
    print(summary_table(rows, method=METHOD, note=note))
    print(f"per-case results: {out_csv}")
    return 0


def _card_patients(model) -> str:
    """A bundled model's training patients as its card names them ("" for any other model): what evaluate can
    still say about a model that predates recorded training cases."""
    from ..resources.registry import alias_of, card
    from ..sample_data import BUNDLED_CASES

    alias = alias_of(model)
    patients = ((card(alias).get("trained_on") or {}).get("patients") or []) if alias else []
    return ", ".join(f"{p} (the sample CT)" if p in BUNDLED_CASES else str(p) for p in patients)


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model on a dataset split (the papers' tables)",
                       description="Reconstruct every case of a dataset split with a model and score it against "
                                   "the case's ground truth: a per-case CSV and the papers' tables (X2B/X2B2: IoU, "
                                   "Chamfer-L1, F-score, normal consistency in the paper's protocol - each ground "
                                   "truth scaled to a longest edge of 1 - and in mm, against the ground truth cut to "
                                   "the reconstruction box, maxe/maye/maze in mm; SPIDER: PSNR, SSIM, Dice, HD95, CD, "
                                   "missed classes counted). First the model is checked against the data: structures "
                                   "and geometry that differ from its training data's are an error (--allow-mismatch: "
                                   "a warning in every table title), and the titles and the CSV's seen_in_training "
                                   "column say which cases the model trained on.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=model_arg,
                   help="checkpoint (.safetensors), or 'demo' for the bundled X2B demo model")
    p.add_argument("--atlas", help="instead of --model: score the no-learning atlas with this library, dataset "
                                   "folder(s) built with x2recon build-dataset, comma-separated (rows labelled "
                                   "'atlas'; a library case from a scored case's CT is refused)")
    p.add_argument("--data", required=True, help="dataset folder (x2recon build-dataset)")
    p.add_argument("--split", default="test", help="train, val, test or all")
    p.add_argument("--views", default="", help="X2B: views to reconstruct from (default: the model's training views)")
    p.add_argument("--threshold", type=probability, default=None,
                   help="occupancy threshold τ of every reconstruction (default: the model's — calibrated on validation "
                   "where its training recorded one, else 0.2)")
    p.add_argument("--resolution", type=mise_resolution, default=128,
                   help="MISE grid of the evaluation meshes, cells per side (32·2^k)")
    p.add_argument("--points", type=positive_int, default=100_000, help="surface/volume samples per metric")
    p.add_argument("--device", default="auto", type=device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", type=output_file, help="per-case CSV (default: ./evaluate_<model name>_<split>.csv, with --atlas "
                                                       "./evaluate_atlas_<split>.csv, in the working directory)")
    p.add_argument("--meshes", type=output_dir, help="also write each reconstruction (meshes; SPIDER: CT + labelmap) into this folder")
    p.add_argument("--refine", choices=["none", "template"], default="none",
                   help="template: also score X2BR (X2B + detection + template registration) — Tables 1–3")
    p.add_argument("--detector", help="X2BR: detector weights (x2recon train detector), or 'ground-truth' for each "
                                      "case's own boxes (scores the registration alone, Table 3)")
    p.add_argument("--templates", help="X2BR: template library (x2recon template build)")
    p.add_argument("--registration", default="gbcpd,cpd", help="X2BR: registration methods to score (Table 3)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="score a model on data built with other structures or geometry than it was trained on (by "
                        "default an error naming each difference); every table title then carries a warning")
    p.add_argument("--wait", action="store_true", help="if a build or manifest rewrite is writing the dataset, wait "
                   "for it instead of stopping (scoring a dataset while it is written scores part of it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)
