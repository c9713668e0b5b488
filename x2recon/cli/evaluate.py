"""``x2recon evaluate``: score a checkpoint on a dataset split — X2B/X2B2 (+ X2BR rows) or SPIDER."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import views
from .x2br import need_x2br_inputs


def cmd_evaluate(a) -> int:
    from ..x2b.evaluate import evaluate_model, summary_table
    from ..nn.checkpoint import read_config

    cfg = read_config(a.model)
    out_csv = Path(a.out) if a.out else Path(a.model).with_suffix(f".{a.split}.csv")
    if cfg["network"] == "spider":
        from ..spider.evaluate import evaluate_spider, spider_tables

        rows = evaluate_spider(a.model, a.data, split=a.split, device=a.device, out_csv=out_csv,
                               volume_dir=a.meshes, progress=not a.quiet)
        print(spider_tables(rows, method="SPIDER" if cfg["model"]["decoder"] == "shared" else
                            f"SPIDER ({cfg['model']['decoder']})"))
        print(f"per-case results: {out_csv}")
        return 0
    refine = None
    if a.refine == "template":
        need_x2br_inputs(a, allow_ground_truth=True)
        refine = {"detector": a.detector, "templates": a.templates,
                  "methods": [m.strip() for m in a.registration.split(",") if m.strip()]}
    rows = evaluate_model(a.model, a.data, split=a.split, views=views(a.views) or None, resolution=a.resolution,
                          device=a.device, n_points=a.points, out_csv=out_csv, mesh_dir=a.meshes, progress=not a.quiet,
                          refine=refine)
    print(summary_table(rows, method=cfg["network"].upper()))
    print(f"per-case results: {out_csv}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model on a dataset split (the papers' tables)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", help="train, val, test or all")
    p.add_argument("--views", default="", help="X2B: views to reconstruct from (default: the model's training views)")
    p.add_argument("--resolution", type=int, default=128, help="MISE grid for the evaluation meshes")
    p.add_argument("--points", type=int, default=100_000, help="surface/volume samples per metric")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="per-case CSV (default: beside the model)")
    p.add_argument("--meshes", help="also write each reconstruction (meshes; SPIDER: CT + labelmap) into this folder")
    p.add_argument("--refine", choices=["none", "template"], default="none",
                   help="template: also score X2BR (X2B + detection + template registration) — Tables 1–3")
    p.add_argument("--detector", help="X2BR: detector weights (x2recon train detector), or 'ground-truth' for each "
                                      "case's own boxes (scores the registration alone, Table 3)")
    p.add_argument("--templates", help="X2BR: template library (x2recon template build)")
    p.add_argument("--registration", default="gbcpd,cpd", help="X2BR: registration methods to score (Table 3)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)
