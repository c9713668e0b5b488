"""``x2recon evaluate``: score a checkpoint on a dataset split — X2B/X2B2 (+ X2BR rows) or SPIDER."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..resources import model_arg
from .common import device, mise_resolution, output_dir, output_file, positive_int, views
from .x2br import need_x2br_inputs


def default_csv(model: str | Path, split: str) -> Path:
    """``./evaluate_<model stem>_<split>.csv`` in the working directory: never beside the model, which
    for the bundled demo model is inside the installed package."""
    return Path.cwd() / f"evaluate_{Path(model).stem}_{split}.csv"


def cmd_evaluate(a) -> int:
    from ..x2b.evaluate import evaluate_model, summary_table
    from ..nn.checkpoint import read_config

    cfg = read_config(a.model)
    out_csv = Path(a.out) if a.out else default_csv(a.model, a.split)
    if cfg["network"] == "spider":
        from ..spider.evaluate import evaluate_spider, spider_tables

        rows = evaluate_spider(a.model, a.data, split=a.split, device=a.device, out_csv=out_csv,
                               volume_dir=a.meshes, progress=not a.quiet)
        print(spider_tables(rows, method="SPIDER" if cfg["model"]["decoder"] == "shared" else
                            f"SPIDER ({cfg['model']['decoder']})"))
        print(f"per-case results: {out_csv}")
        return 0
    refiners = []
    if a.refine == "template":
        from ..x2br.evaluate import template_refiners

        need_x2br_inputs(a, allow_ground_truth=True)
        refiners = template_refiners(a.detector, a.templates,
                                     [m.strip() for m in a.registration.split(",") if m.strip()], device=a.device)
    rows = evaluate_model(a.model, a.data, split=a.split, views=views(a.views) or None, resolution=a.resolution,
                          device=a.device, n_points=a.points, out_csv=out_csv, mesh_dir=a.meshes, progress=not a.quiet,
                          refiners=refiners)
    print(summary_table(rows, method=cfg["network"].upper()))
    print(f"per-case results: {out_csv}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model on a dataset split (the papers' tables)",
                       description="Reconstruct every case of a dataset split with a model and score it against "
                                   "the case's ground truth: a per-case CSV and the papers' tables (X2B/X2B2: IoU, "
                                   "Chamfer-L1, F-score, normal consistency in the paper's protocol - each ground "
                                   "truth scaled to a longest edge of 1 - and in mm, against the ground truth cut to "
                                   "the reconstruction box, maxe/maye/maze in mm; SPIDER: PSNR, SSIM, Dice, HD95, CD, "
                                   "missed classes counted).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, type=model_arg,
                   help="checkpoint (.safetensors), or 'demo' for the bundled X2B demo model")
    p.add_argument("--data", required=True, help="dataset folder (x2recon build-dataset)")
    p.add_argument("--split", default="test", help="train, val, test or all")
    p.add_argument("--views", default="", help="X2B: views to reconstruct from (default: the model's training views)")
    p.add_argument("--resolution", type=mise_resolution, default=128,
                   help="MISE grid of the evaluation meshes, cells per side (32·2^k)")
    p.add_argument("--points", type=positive_int, default=100_000, help="surface/volume samples per metric")
    p.add_argument("--device", default="auto", type=device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", type=output_file, help="per-case CSV (default: ./evaluate_<model name>_<split>.csv in the working directory)")
    p.add_argument("--meshes", type=output_dir, help="also write each reconstruction (meshes; SPIDER: CT + labelmap) into this folder")
    p.add_argument("--refine", choices=["none", "template"], default="none",
                   help="template: also score X2BR (X2B + detection + template registration) — Tables 1–3")
    p.add_argument("--detector", help="X2BR: detector weights (x2recon train detector), or 'ground-truth' for each "
                                      "case's own boxes (scores the registration alone, Table 3)")
    p.add_argument("--templates", help="X2BR: template library (x2recon template build)")
    p.add_argument("--registration", default="gbcpd,cpd", help="X2BR: registration methods to score (Table 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)
