"""``x2recon`` subcommands for the bone networks: ``train x2b|x2b2``, ``reconstruct``, ``evaluate``,
``info`` and ``demo`` (registered by ``x2recon.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _views(s: str) -> list[str]:
    return [v.strip().upper() for v in s.split(",") if v.strip()]


# --------------------------------------------------------------------------------------- train
def cmd_train(a) -> int:
    from .models.x2b import X2BConfig
    from .train.common import TrainSettings
    from .train.x2b import train_x2b

    views = _views(a.views) or (["AP", "LAT"] if a.network == "x2b2" else [])  # X2B: [] = every rendered view
    cfg = X2BConfig(kind=a.network, backbone=a.backbone, image_size=a.image_size, latent_dim=a.latent_dim,
                    hidden=a.hidden, n_blocks=a.blocks, local_features=a.local_features, fourier=a.fourier,
                    local_stages=[int(x) for x in a.local_stages.split(",") if x.strip()],
                    attention_heads=a.heads, views=views, drop_path_rate=a.drop_path)
    settings = TrainSettings(out=a.out, epochs=a.epochs, max_steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                             workers=a.workers, seed=a.seed, device=a.device, amp=a.amp, compile=a.compile,
                             val_every=a.val_every, save_every=a.save_every, resume=a.resume, progress=not a.quiet,
                             threads=a.threads)
    summary = train_x2b(a.data, settings, cfg, n_points=a.points, pretrained=a.pretrained, train_split=a.train_split,
                        val_split=a.val_split, augment=not a.no_augment)
    if summary.get("stopped"):
        print(f"stopped at step {summary['steps']}; run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1))
    return 0


def add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a network on a dataset (X2B, X2B2, SPIDER, the X2BR detector)",
                       description="Train a network (one GPU, many with torchrun, or CPU). Resumes from --out's "
                                   "last checkpoint when it exists.")
    tsub = t.add_subparsers(dest="network", metavar="<network>", required=True)
    for name, helptext in (("x2b", "one X-ray → bone occupancy (X2BR paper §3.1)"),
                           ("x2b2", "two orthogonal X-rays, cross-attention fusion (§6.4)")):
        p = tsub.add_parser(name, help=helptext, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--data", required=True, help="dataset folder (x2recon build-dataset)")
        p.add_argument("--out", required=True, help="run folder: checkpoints, log.jsonl, tensorboard/")
        g = p.add_argument_group("architecture")
        g.add_argument("--backbone", default="convnext_base", help="timm model name (paper: convnext_base)")
        g.add_argument("--pretrained", help="local backbone weights file (nothing is downloaded)")
        g.add_argument("--image-size", type=int, default=224)
        g.add_argument("--latent-dim", type=int, default=0, help="0: the backbone's descriptor size (paper)")
        g.add_argument("--hidden", type=int, default=256)
        g.add_argument("--blocks", type=int, default=5)
        g.add_argument("--local-features", action="store_true",
                       help="add pixel-aligned features sampled at each point's projection (beyond the paper)")
        g.add_argument("--local-stages", default="1,2", help="encoder stages the pixel-aligned features come from")
        g.add_argument("--fourier", type=int, default=0, help="octaves of sin/cos point features (0: raw coordinates, paper)")
        g.add_argument("--heads", type=int, default=8, help="X2B2 cross-attention heads")
        g.add_argument("--drop-path", type=float, default=0.0)
        g.add_argument("--views", default="", help="views to train on (X2B: default every rendered view; "
                                                    "X2B2: frontal,lateral, default AP,LAT)")
        g = p.add_argument_group("optimisation")
        g.add_argument("--epochs", type=int, default=100)
        g.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: epochs decide)")
        g.add_argument("--batch-size", type=int, default=32, help="global batch (split over torchrun processes)")
        g.add_argument("--lr", type=float, default=1e-4)
        g.add_argument("--points", type=int, default=2048, help="occupancy samples per item")
        g.add_argument("--no-augment", action="store_true")
        g.add_argument("--seed", type=int, default=0)
        g = p.add_argument_group("running")
        g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
        g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
        g.add_argument("--compile", action="store_true", help="torch.compile the network")
        g.add_argument("--workers", type=int, default=4, help="data-loading processes per GPU")
        g.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch default)")
        g.add_argument("--train-split", default="train")
        g.add_argument("--val-split", default="val", help="'' to skip validation")
        g.add_argument("--val-every", type=int, default=1, help="epochs between validations")
        g.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
        g.add_argument("--resume", default="auto", help="auto (continue --out), never, or a checkpoint to start from")
        g.add_argument("--quiet", action="store_true")
        p.set_defaults(func=cmd_train)
    from .cli_spider import add_spider_train_parser

    add_spider_train_parser(tsub)
    from .cli_x2br import add_detector_train_parser; add_detector_train_parser(tsub)  # noqa: E702


# --------------------------------------------------------------------------------- reconstruct
class _ProgressLines:
    """tqdm bar, or machine-readable ``X2RECON_PROGRESS <percent> <message>`` lines (Slicer panel)."""

    def __init__(self, lines: bool, quiet: bool):
        self.lines, self.bar, self.last = lines, None, -1
        if not lines and not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc="reconstruct", unit="%", dynamic_ncols=True)

    def __call__(self, fraction: float, message: str) -> None:
        pct = int(round(100 * fraction))
        if self.lines:
            if pct != self.last:
                print(f"X2RECON_PROGRESS {pct} {message}", flush=True)
        elif self.bar is not None:
            self.bar.update(max(0, pct - self.bar.n))
            self.bar.set_postfix_str(message)
        self.last = pct

    def close(self):
        if self.bar is not None:
            self.bar.close()


def cmd_reconstruct(a) -> int:
    from .io.mesh import write_mesh
    from .models.checkpoint import load_model
    from .reconstruct import reconstruct, resolve_device
    from .xray import read_xray

    dev = resolve_device(a.device)
    model, cfg = load_model(a.model, dev, network=("x2b", "x2b2"))
    xrays = [read_xray(a.xray, view=a.view, geometry=a.geometry)]
    if a.lateral:
        xrays.append(read_xray(a.lateral, view=a.lateral_view, geometry=a.lateral_geometry))
    if a.refine == "template":
        _need_x2br_inputs(a)
    prog = _ProgressLines(a.progress_lines, a.quiet)
    x2br = None
    try:
        share = 0.6 if a.refine == "template" else 1.0
        rec = reconstruct(model, xrays, resolution=a.resolution, threshold=a.threshold, device=dev, faces=a.faces,
                          refine_steps=a.refine_steps, network_normals=a.network_normals,
                          progress=lambda f, m: prog(share * f, m))
        if a.refine == "template":
            from .detection import Detector
            from .template import load_library
            from .x2br import refine_with_template

            x2br = refine_with_template(rec.mesh, xrays[0], Detector(a.detector), load_library(a.templates),
                                        method=a.registration, conf=a.conf, device=str(dev),
                                        progress=lambda f, m: prog(0.6 + 0.4 * f, m))
    finally:
        prog.close()
    if x2br is not None:
        _write_x2br(x2br, a, rec, xrays[0])
        return 0
    write_mesh(rec.mesh, a.out)
    print(f"{a.out}: {len(rec.mesh.faces):,} triangles, LPS mm, in {rec.seconds:.1f} s on {dev} "
          f"({rec.evaluations:,} of {rec.dense_evaluations:,} grid points evaluated)")
    if a.render:
        from .mesh.render import render_png

        render_png(rec.mesh, a.render, title=Path(a.xray).name)
        print(a.render)
    return 0


def _need_x2br_inputs(a, allow_ground_truth: bool = False) -> None:
    """--detector and --templates exist (``evaluate`` may name ``ground-truth`` boxes instead of a detector)."""
    from .errors import X2ReconInputError

    for flag in ("detector", "templates"):
        if not getattr(a, flag):
            raise X2ReconInputError(f"--{flag}", f"--refine template needs --{flag}")
        if flag == "detector" and allow_ground_truth and a.detector == "ground-truth":
            continue
        if not Path(getattr(a, flag)).exists():
            raise X2ReconInputError(getattr(a, flag), f"--{flag} not found")


def _write_x2br(res, a, rec, xray) -> None:
    """The refined mesh at --out, one mesh per structure beside it (<stem>_parts/), detections as JSON."""
    from .io.mesh import write_mesh

    out = Path(a.out)
    write_mesh(res.mesh, out)
    stem = out.name.split(".")[0]
    parts_dir = out.with_name(stem + "_parts")
    for name, m in res.parts.items():
        write_mesh(m, parts_dir / f"{name}{out.suffix if out.suffix != '.gz' else '.ply'}")
    write_mesh(rec.mesh, out.with_name(stem + "_x2b" + out.suffix))
    from .detection.detections import write_detections

    write_detections(res.detections, out.with_name(stem + "_detections.json"), image=a.xray,
                     size=tuple(xray.image.shape[::-1]), weights=a.detector)
    print(f"{out}: X2BR ({a.registration.upper()}) — {len(res.parts)} structures in {parts_dir}, "
          f"{len(res.detections)} detections, coarse X2B mesh {out.with_name(stem + '_x2b' + out.suffix)}; "
          f"registration {res.registration.seconds:.1f} s, {res.registration.iterations} iterations")


def add_reconstruct_parser(sub) -> None:
    p = sub.add_parser("reconstruct", help="X-ray(s) → bone mesh with an X2B/X2B2 model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Reconstruct the bones from one X-ray (X2B) or a frontal + lateral pair (X2B2). "
                                   "Inputs: PNG (8/16-bit grey; a <stem>.json beside it gives the geometry), DICOM, "
                                   "2D NIfTI/NRRD/MHA. The mesh is written in LPS millimetres in the X-ray's geometry.")
    p.add_argument("--xray", required=True, help="the (frontal) X-ray")
    p.add_argument("--lateral", help="the lateral X-ray (X2B2 models)")
    p.add_argument("--model", required=True, help="checkpoint (.safetensors)")
    p.add_argument("--out", required=True, help="mesh file: .stl, .ply, .obj, .off or .vtk")
    p.add_argument("--view", default="AP", help="view of --xray when it has no geometry file: AP, PA, LAT or degrees")
    p.add_argument("--lateral-view", default="LAT")
    p.add_argument("--geometry", help="geometry JSON of --xray (overrides <stem>.json)")
    p.add_argument("--lateral-geometry", help="geometry JSON of --lateral")
    p.add_argument("--resolution", type=int, default=256, help="final MISE grid (32·2^k)")
    p.add_argument("--threshold", type=float, default=None, help="occupancy threshold τ (default: the model's, 0.2)")
    p.add_argument("--faces", type=int, default=0, help="simplify to about this many triangles (pyfqmr; 0: off)")
    p.add_argument("--refine-steps", type=int, default=0, help="gradient steps moving vertices onto the level set")
    p.add_argument("--network-normals", action="store_true", help="vertex normals from the network's gradient")
    p.add_argument("--refine", choices=["none", "template"], default="none",
                   help="template: X2BR — detect vertebrae/ribs, assemble their templates, register them onto the "
                        "X2B shape (needs --detector and --templates)")
    p.add_argument("--detector", help="detector weights (x2recon train detector)")
    p.add_argument("--templates", help="template library folder (x2recon template build)")
    p.add_argument("--registration", default="gbcpd", choices=["gbcpd", "bcpd", "cpd"],
                   help="template registration (X2BR: GBCPD++; CPD is the paper's baseline)")
    p.add_argument("--conf", type=float, default=0.25, help="detection confidence threshold")
    p.add_argument("--device", default="auto")
    p.add_argument("--render", help="also write a PNG rendering of the mesh here")
    p.add_argument("--progress-lines", action="store_true", help="print 'X2RECON_PROGRESS <percent> <message>' lines")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reconstruct)


# ------------------------------------------------------------------------------------ evaluate
def cmd_evaluate(a) -> int:
    from .evaluate import evaluate_model, summary_table
    from .models.checkpoint import read_config

    cfg = read_config(a.model)
    out_csv = Path(a.out) if a.out else Path(a.model).with_suffix(f".{a.split}.csv")
    if cfg["network"] == "spider":
        from .evaluate_spider import evaluate_spider, spider_tables

        rows = evaluate_spider(a.model, a.data, split=a.split, device=a.device, out_csv=out_csv,
                               volume_dir=a.meshes, progress=not a.quiet)
        print(spider_tables(rows, method="SPIDER" if cfg["model"]["decoder"] == "shared" else
                            f"SPIDER ({cfg['model']['decoder']})"))
        print(f"per-case results: {out_csv}")
        return 0
    refine = None
    if a.refine == "template":
        _need_x2br_inputs(a, allow_ground_truth=True)
        refine = {"detector": a.detector, "templates": a.templates,
                  "methods": [m.strip() for m in a.registration.split(",") if m.strip()]}
    rows = evaluate_model(a.model, a.data, split=a.split, views=_views(a.views) or None, resolution=a.resolution,
                          device=a.device, n_points=a.points, out_csv=out_csv, mesh_dir=a.meshes, progress=not a.quiet,
                          refine=refine)
    print(summary_table(rows, method=cfg["network"].upper()))
    print(f"per-case results: {out_csv}")
    return 0


def add_evaluate_parser(sub) -> None:
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


# ---------------------------------------------------------------------------------- info, demo
def cmd_info(a) -> int:
    from .models.checkpoint import read_config

    print(json.dumps(read_config(a.model), indent=1))
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    s = run_demo(a.out, model=a.model, data=a.data, resolution=a.resolution, device=a.device)
    m = s["metrics"]
    print()
    print(f"X2B demo — {s['case']}, {s['view']} X-ray, {s['resolution']}³, {s['device']}")
    print("  IoU {iou:.3f} | Chamfer-L1 {chamfer_l1:.4f} | F-score@0.02 {fscore:.3f} | NC {normal_consistency:.3f} | "
          "maxe/maye/maze {maxe:.2f}/{maye:.2f}/{maze:.2f} mm | mean surface distance {mean_surface_distance_mm:.2f} mm"
          .format(**m))
    print(f"  X-ray:     {s['xray']}\n  mesh:      {s['mesh']}\n  rendering: {s['rendering']}")
    print(f"  reconstruction {s['reconstruction_seconds']:.1f} s, demo total {s['total_seconds']:.1f} s")
    print("  (a demo model trained on deformed copies of one patient's CT — not a clinical model)")
    return 0


def add_misc_parsers(sub) -> None:
    p = sub.add_parser("info", help="print a checkpoint's config (architecture, geometry, training, versions)")
    p.add_argument("model")
    p.set_defaults(func=cmd_info)
    d = sub.add_parser("demo", help="build a case from the sample data, reconstruct its bones, score and render them",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", default="x2recon-demo", help="output folder")
    d.add_argument("--model", help="checkpoint (default: the bundled demo model)")
    d.add_argument("--data", help="sample data folder (default: ../shared/data or $X2RECON_SHARED_DATA)")
    d.add_argument("--resolution", type=int, default=256)
    d.add_argument("--device", default="auto")
    d.set_defaults(func=cmd_demo)


def add_parsers(sub) -> None:
    add_train_parser(sub)
    add_reconstruct_parser(sub)
    add_evaluate_parser(sub)
    add_misc_parsers(sub)
