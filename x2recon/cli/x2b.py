"""``x2recon train x2b|x2b2`` and ``x2recon reconstruct``: the bone occupancy networks (X2BR paper §3.1, §6.4)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..resources import model_arg
from .common import (device, mise_resolution, non_negative_float, non_negative_int, output_dir, output_file,
                     positive_float, positive_int, probability, view_name)
from .common import ProgressLines, add_preset_option, add_training_run_options, apply_preset, preset_help, views
from .common import refuse_colliding_paths
from .x2br import bundled_x2br_inputs, need_x2br_inputs, write_x2br, x2br_outputs

#: ``train x2b|x2b2`` options a preset sets.  Paper (X2BR §3.1, §3.3, §3.4, §4.3): ConvNeXt-B (1024-d latent)
#: on 224² DRRs, no pixel-aligned or Fourier features (ONet's raw coordinates), Adam lr 1e-4 (PyTorch's
#: betas/ε, no weight decay), 2 048 points per sample, τ = 0.2, no augmentation (none is mentioned).
#: Batch size and epochs are not stated.
TRAIN_PRESETS = {
    "backbone": {"ours": "convnext_base", "paper": "convnext_base"},
    "image_size": {"ours": 224, "paper": 224},
    "latent_dim": {"ours": 0, "paper": 0},
    "local_features": {"ours": False, "paper": False},
    "fourier": {"ours": 0, "paper": 0},
    "lr": {"ours": 1e-4, "paper": 1e-4},
    "points": {"ours": 2048, "paper": 2048},
    "threshold": {"ours": 0.2, "paper": 0.2},
    "augment": {"ours": True, "paper": False},
    # ours: the surface threshold with the best validation IoU, recorded and used by reconstruct (the paper's τ is fixed)
    "calibrate_threshold": {"ours": True, "paper": False},
}


def _warn_dataset_sampling(data, preset: str) -> None:
    """The occupancy samples are the dataset's: say so when ``--preset paper`` trains on near-surface ones."""
    from ..dataset.torch_data import dataset_build_config

    frac = float(dataset_build_config(Path(data)).get("near_surface_fraction", 0.0))
    if preset == "paper" and frac > 0:
        print(f"warning: {data} was built with {frac:.0%} near-surface occupancy samples; the paper samples "
              "uniformly (x2recon build-dataset --preset paper)", file=sys.stderr)


def cmd_train(a) -> int:
    from ..dataset.lock import run_lock

    with run_lock(a.out, f"train {a.network}"):  # one run per --out: a second refuses at once, naming this one
        return _train(a)


#: Architecture options (argparse dest → X2BConfig field): on resume, those not given are the checkpoint's.
ARCHITECTURE = {"backbone": "backbone", "image_size": "image_size", "latent_dim": "latent_dim", "hidden": "hidden",
                "blocks": "n_blocks", "local_features": "local_features", "local_stages": "local_stages",
                "fourier": "fourier", "heads": "attention_heads", "views": "views", "drop_path": "drop_path_rate",
                "threshold": "threshold"}
#: Defaults of the architecture options no preset sets (SUPPRESSed in the parser, so "given" can be told).
ARCHITECTURE_DEFAULTS = {"hidden": 256, "blocks": 5, "local_stages": "1,2", "heads": 8, "drop_path": 0.0, "views": ""}
#: The CPU recipe (training/recipes.py, profile cpu, our preset): what a machine without a GPU can train.
CPU_RECIPE = ("--backbone convnext_atto --image-size 128 --hidden 128 --local-features --local-stages 0,1 --fourier 6 "
              "--batch-size 8 --lr 1e-3")


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _cli_value(dest: str, value):
    """A checkpoint's config value as the option holds it (lists as comma text)."""
    return ",".join(str(v) for v in value) if dest in ("local_stages", "views") else value


def _resume_source(a) -> Path | None:
    """The checkpoint a run resumes or starts from: ``--resume FILE``, or ``--out``'s last weights."""
    if a.resume not in ("auto", "never"):
        return Path(a.resume)
    if a.resume == "auto":
        for name in ("last.safetensors", "last.prev.safetensors"):
            if (Path(a.out) / name).is_file():
                return Path(a.out) / name
    return None


def _architecture_from_resume(a) -> None:
    """On resume, the architecture options not given are the checkpoint's (the command line's defaults are
    not a request for another network); one given that differs is an error naming both values."""
    from ..errors import X2ReconInputError
    from ..nn.checkpoint import read_config

    src = _resume_source(a)
    if src is None:
        return
    cfg = read_config(src)
    what = "--resume" if a.resume not in ("auto", "never") else f"--out's {src.name}"
    if cfg["network"] != a.network:
        raise X2ReconInputError(src, f"{what} is a {cfg['network']} checkpoint; this is 'train {a.network}' (use "
                                     f"'train {cfg['network']}', or another --out / --resume never)")
    model, given = cfg["model"], {d for d in ARCHITECTURE if getattr(a, d, None) is not None}
    differ = [f"{_option(d)} {getattr(a, d)!r} (the checkpoint's: {_cli_value(d, model[f])!r})"
              for d, f in ARCHITECTURE.items() if d in given and f in model
              and _cli_value(d, _normalised(d, getattr(a, d))) != _cli_value(d, model[f])]
    if differ:
        raise X2ReconInputError(src, f"cannot resume from {what}: the command line asks for another architecture: "
                                     + "; ".join(differ) + "; leave these options out to take the checkpoint's, or "
                                     "use another --out / --resume never")
    taken = [d for d, f in ARCHITECTURE.items() if d not in given and f in model]
    for d in taken:
        setattr(a, d, _cli_value(d, model[ARCHITECTURE[d]]))
    shown = [(_option(d) if getattr(a, d) else "--no-" + _option(d)[2:]) if isinstance(getattr(a, d), bool)
             else f"{_option(d)} {getattr(a, d)}" for d in taken if getattr(a, d) != ""]
    if shown:
        print(f"{what}: the architecture not given is {src.name}'s: {' '.join(shown)}")


def _normalised(dest: str, value):
    """An option's value as the config stores it (views upper case, stages as ints)."""
    if dest == "views":
        return views(value)
    if dest == "local_stages":
        return [int(x) for x in str(value).split(",") if x.strip()]
    return value


def _cpu_note(a) -> str | None:
    """The line to print before training a preset-sized network on a machine without a GPU."""
    import os

    import torch

    if a.device not in ("auto", "cpu") or (a.device == "auto" and torch.cuda.is_available()):
        return None
    if a.backbone != TRAIN_PRESETS["backbone"][a.preset] or os.environ.get("RANK", "0") != "0":
        return None  # an architecture the user chose, or not torchrun's first process
    return (f"note: no GPU: training {a.backbone} at {a.image_size}² on the CPU takes tens of seconds a step and "
            f"writes checkpoints of hundreds of MB. The CPU recipe (training/cross_patient.py --profile cpu; "
            f"docs/training.md): x2recon train {a.network} --data {a.data} --out {a.out} {CPU_RECIPE}")


def _train(a) -> int:
    from ..x2b.network import X2BConfig
    from ..train.common import TrainSettings
    from ..x2b.train import train_x2b

    explicit_backbone = getattr(a, "backbone", None) is not None
    _architecture_from_resume(a)
    apply_preset(a, TRAIN_PRESETS)
    for dest, value in ARCHITECTURE_DEFAULTS.items():
        if getattr(a, dest, None) is None:
            setattr(a, dest, value)
    if not explicit_backbone and _resume_source(a) is None:
        note = _cpu_note(a)
        if note:
            print(note, file=sys.stderr, flush=True)
    _warn_dataset_sampling(a.data, a.preset)
    view_list = views(a.views) or (["AP", "LAT"] if a.network == "x2b2" else [])  # X2B: [] = every rendered view
    cfg = X2BConfig(kind=a.network, backbone=a.backbone, image_size=a.image_size, latent_dim=a.latent_dim,
                    hidden=a.hidden, n_blocks=a.blocks, local_features=a.local_features, fourier=a.fourier,
                    local_stages=[int(x) for x in a.local_stages.split(",") if x.strip()],
                    attention_heads=a.heads, views=view_list, drop_path_rate=a.drop_path, threshold=a.threshold)
    settings = TrainSettings(out=a.out, epochs=a.epochs, max_steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                             workers=a.workers, seed=a.seed, device=a.device, amp=a.amp, compile=a.compile,
                             val_every=a.val_every, save_every=a.save_every, resume=a.resume, progress=not a.quiet,
                             threads=a.threads)
    summary = train_x2b(a.data, settings, cfg, n_points=a.points, pretrained=a.pretrained, train_split=a.train_split,
                        val_split=a.val_split, augment=a.augment, preset=a.preset,
                        calibrate_threshold=a.calibrate_threshold)
    if summary.get("stopped"):
        print(f"stopped at step {summary['steps']}; run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1))
    return 0


def add_x2b_train_parsers(tsub) -> None:
    """``train x2b`` and ``train x2b2`` (the ``train`` group is built in ``cli.train``)."""
    for name, helptext in (("x2b", "one X-ray → bone occupancy (X2BR paper §3.1)"),
                           ("x2b2", "two orthogonal X-rays, cross-attention fusion (§6.4)")):
        p = tsub.add_parser(name, help=helptext, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--data", required=True, help="dataset folder (x2recon build-dataset)")
        p.add_argument("--out", required=True, type=output_dir, help="run folder: checkpoints, log.jsonl, tensorboard/")
        add_preset_option(p, "the X2BR paper states (§3.1–3.4, §4.3: ConvNeXt-B at 224², no local or Fourier "
                          "features, Adam 1e-4, 2 048 points, τ 0.2, no augmentation)")
        pre, keep = TRAIN_PRESETS, argparse.SUPPRESS
        g = p.add_argument_group("architecture", "resuming (--resume FILE, or --out's last checkpoint), the options "
                                                 "not given are the checkpoint's")
        g.add_argument("--backbone", default=keep, help=preset_help(pre, "backbone", "timm model name"))
        g.add_argument("--pretrained", help="local backbone weights file (nothing is downloaded)")
        g.add_argument("--image-size", type=positive_int, default=keep, help=preset_help(pre, "image_size"))
        g.add_argument("--latent-dim", type=non_negative_int, default=keep,
                       help=preset_help(pre, "latent_dim", "0: the backbone's descriptor size"))
        g.add_argument("--hidden", type=positive_int, default=keep, help="decoder width, neurons (default: 256)")
        g.add_argument("--blocks", type=positive_int, default=keep, help="decoder residual blocks (default: 5)")
        g.add_argument("--local-features", action=argparse.BooleanOptionalAction, default=keep,
                       help=preset_help(pre, "local_features", "pixel-aligned features sampled at each point's "
                                        "projection (beyond the paper)"))
        g.add_argument("--local-stages", default=keep,
                       help="encoder stages the pixel-aligned features come from (default: 1,2)")
        g.add_argument("--fourier", type=non_negative_int, default=keep,
                       help=preset_help(pre, "fourier", "octaves of sin/cos point features (0: raw coordinates)"))
        g.add_argument("--heads", type=positive_int, default=keep, help="X2B2 cross-attention heads (default: 8)")
        g.add_argument("--drop-path", type=probability, default=keep,
                       help="stochastic depth rate of the backbone, 0–1 (default: 0)")
        g.add_argument("--views", default=keep, help="views to train on (X2B: default every rendered view; "
                                                      "X2B2: frontal,lateral, default AP,LAT)")
        g = p.add_argument_group("optimisation")
        g.add_argument("--epochs", type=positive_int, default=100, help="passes over the training split")
        g.add_argument("--steps", type=non_negative_int, default=0, help="stop after this many steps (0: epochs decide)")
        g.add_argument("--batch-size", type=positive_int, default=32, help="global batch (split over torchrun processes)")
        g.add_argument("--lr", type=positive_float, default=keep, help=preset_help(pre, "lr", "Adam learning rate"))
        g.add_argument("--points", type=positive_int, default=keep, help=preset_help(pre, "points", "occupancy samples per item"))
        g.add_argument("--threshold", type=float, default=keep,
                       help=preset_help(pre, "threshold", "occupancy probability τ of the surface (validation IoU; "
                                        "reconstruct's default)"))
        g.add_argument("--calibrate-threshold", action=argparse.BooleanOptionalAction, default=keep,
                       help=preset_help(pre, "calibrate_threshold", "choose the surface threshold with the best IoU "
                                        "on the validation split at each validation; the checkpoint records it and "
                                        "reconstruct uses it unless --threshold is given"))
        g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=keep,
                       help=preset_help(pre, "augment", "image augmentation (gamma, contrast, noise, in-plane shift "
                                        "that the geometry follows)"))
        g.add_argument("--seed", type=non_negative_int, default=0, help="random seed (initialisation, sampling)")
        add_training_run_options(p, val_every=1)
        p.set_defaults(func=cmd_train)


def _threshold_text(a, model, cfg: dict) -> str:
    """Which surface threshold the mesh is at, and where it came from."""
    from ..nn.checkpoint import calibrated_threshold

    if a.threshold is not None:
        return f"threshold {a.threshold:g} (--threshold)"
    why = "calibrated on validation" if calibrated_threshold(cfg) is not None else "the model's"
    return f"threshold {model.cfg.threshold:g} ({why})"


#: ``reconstruct`` options of the network alone, with their defaults: --method atlas refuses any other value.
NETWORK_ONLY = {"--model": None, "--lateral": None, "--lateral-geometry": None, "--resolution": 256,
                "--threshold": None, "--faces": 0, "--refine-steps": 0, "--network-normals": False, "--refine": "none",
                "--detector": None, "--templates": None, "--registration": "gbcpd", "--conf": 0.25, "--device": "auto",
                "--precision": "auto", "--no-watertight": False, "--render-confidence": False}


def cmd_reconstruct(a) -> int:
    from ..errors import X2ReconInputError

    if a.method == "atlas":
        return _reconstruct_atlas(a)
    if a.model is None:
        raise X2ReconInputError("--model", "is required (a checkpoint or a bundled model), or use --method atlas "
                                           "--library DIR")
    if a.library:
        raise X2ReconInputError("--library", "is used by --method atlas only; leave it out or add --method atlas")
    return _reconstruct_network(a)


def _reconstruct_atlas(a) -> int:
    """``reconstruct --method atlas``: the library's best-matching skeleton placed on the X-ray (x2b.atlas)."""
    from ..errors import X2ReconInputError
    from ..io.mesh import MESH_SUFFIXES, write_mesh
    from ..io.xray import read_xray
    from ..x2b.atlas import library_geometry, load_library, reconstruct_atlas

    given = [o for o, d in NETWORK_ONLY.items() if getattr(a, o[2:].replace("-", "_")) != d]
    if given:
        raise X2ReconInputError(given[0], "is not used by --method atlas (one X-ray, no network, no occupancy); "
                                          "leave it out")
    if not a.library:
        raise X2ReconInputError("--library", "--method atlas needs --library DIR[,DIR] (datasets built with "
                                             "x2recon build-dataset)")
    if Path(a.out).suffix.lower() not in MESH_SUFFIXES:
        raise X2ReconInputError(a.out, f"--out: x2recon cannot write a mesh in this format; use one of "
                                       f"{', '.join(MESH_SUFFIXES)}")
    refuse_colliding_paths({"--out": a.out, "--render": a.render}, {"--xray": a.xray, "--geometry": a.geometry})
    cases = load_library(a.library)
    x = read_xray(a.xray, view=a.view, geometry=a.geometry, pixel_spacing=a.pixel_spacing, sdd=a.sdd, sod=a.sod,
                  model_geometry=library_geometry(cases))
    if x.placement is not None and (x.placement.assumed or x.placement.warnings or not a.quiet):
        print(f"{Path(a.xray).name}: {x.placement.text()}")
    prog = ProgressLines(a.progress_lines, a.quiet)
    try:
        res = reconstruct_atlas(x, cases, progress=prog)
    finally:
        prog.close()
    write_mesh(res.mesh, a.out)
    print(f"{a.out}: {len(res.mesh.faces):,} triangles, LPS mm, in {res.seconds:.1f} s: {res.text()}")
    if a.render:
        from ..mesh.render import render_png

        render_png(res.mesh, a.render, title=Path(a.xray).name)
        print(a.render)
    return 0


def _reconstruct_network(a) -> int:
    from ..io.mesh import write_mesh
    from ..nn.checkpoint import load_model
    from ..x2b.reconstruct import reconstruct, resolve_device
    from ..io.xray import read_xray
    from ..errors import X2ReconInputError
    from ..io.mesh import MESH_SUFFIXES

    if Path(a.out).suffix.lower() not in MESH_SUFFIXES:  # before the work, not when writing its result
        raise X2ReconInputError(a.out, f"--out: x2recon cannot write a mesh in this format; use one of "
                                       f"{', '.join(MESH_SUFFIXES)}")
    if a.render_confidence and not a.render:
        raise X2ReconInputError("--render-confidence", "needs --render PNG (where to write the rendering)")
    if a.refine == "template":
        for line in bundled_x2br_inputs(a):  # which detector and templates, never silent
            print(line)
    refuse_colliding_paths(_reconstruct_outputs(a), {"--xray": a.xray, "--lateral": a.lateral, "--model": a.model,
                                                     "--geometry": a.geometry, "--lateral-geometry": a.lateral_geometry})
    if a.refine == "template":
        need_x2br_inputs(a)  # the detector's ultralytics (an optional extra) too: before any work, not after X2B's
    dev = resolve_device(a.device)
    from ..x2b.decoder import resolve_precision

    resolve_precision(a.precision, dev)  # int8 on a GPU: refused before any work
    from ..io.xray import model_geometry
    from ..nn.checkpoint import read_config

    try:  # the header only: an X-ray without geometry is placed in the model's training geometry
        header = read_config(a.model)
        trained = model_geometry(header)
    except Exception:  # an unreadable model is reported by load_model below, after the inputs are checked
        header, trained = None, None
    xrays = [read_xray(a.xray, view=a.view, geometry=a.geometry, pixel_spacing=a.pixel_spacing, sdd=a.sdd,
                       sod=a.sod, model_geometry=trained)]  # inputs first: cheap, before the model loads
    if a.lateral:
        xrays.append(read_xray(a.lateral, view=a.lateral_view, geometry=a.lateral_geometry, model_geometry=trained))
    for path, x in zip((a.xray, a.lateral), xrays):  # what the geometry is and where it came from, never silent
        if x.placement is not None and (x.placement.assumed or x.placement.warnings or not a.quiet):
            print(f"{Path(path).name}: {x.placement.text()}")
        _warn_geometry_misfit(header, path, x)
    model, cfg = load_model(a.model, dev, network=("x2b", "x2b2"))
    prog = ProgressLines(a.progress_lines, a.quiet)
    x2br = None
    try:
        share = 0.6 if a.refine == "template" else 1.0
        rec = reconstruct(model, xrays, resolution=a.resolution, threshold=a.threshold, device=dev, faces=a.faces,
                          refine_steps=a.refine_steps, network_normals=a.network_normals,
                          watertight=not a.no_watertight, precision=a.precision,
                          progress=lambda f, m: prog(share * f, m))
        if a.refine == "template":
            from ..x2br.detection import Detector
            from ..x2br.template import load_library
            from ..x2br.refine import refine_with_template

            x2br = refine_with_template(rec.mesh, xrays[0], Detector(a.detector), load_library(a.templates),
                                        method=a.registration, conf=a.conf, device=str(dev),
                                        progress=lambda f, m: prog(0.6 + 0.4 * f, m))
    finally:
        prog.close()
    if a.faces and len(rec.mesh.faces) > a.faces and not a.no_watertight:
        print(f"note: --faces {a.faces}: {len(rec.mesh.faces):,} triangles is the fewest that keep every piece "
              "of the surface closed (--no-watertight simplifies the raw surface further)", file=sys.stderr)
    _report_confidence(a, rec, header, xrays)
    if x2br is not None:
        write_x2br(x2br, a, rec, xrays[0])
        return 0
    write_mesh(rec.mesh, a.out)
    print(f"{a.out}: {len(rec.mesh.faces):,} triangles, LPS mm, in {rec.seconds:.1f} s on {dev}, {rec.precision} decoder "
          f"({rec.evaluations:,} of {rec.dense_evaluations:,} grid points evaluated), {_threshold_text(a, model, cfg)}")
    if a.render:
        from ..mesh.render import render_png

        if a.render_confidence:
            from ..mesh.render import render_confidence

            render_confidence(rec.mesh, rec.confidence, a.render, title=Path(a.xray).name)
        else:
            render_png(rec.mesh, a.render, title=Path(a.xray).name)
        print(a.render)
    return 0


def _confidence_json(out) -> Path:
    out = Path(out)
    return out.with_name(out.name.split(".")[0] + "_confidence.json")


def _report_confidence(a, rec, header, xrays) -> None:
    """Print the mean per-vertex confidence and any out-of-distribution warning (a thorax-framed model given
    an X-ray that does not look like a frontal chest), and write both to ``<stem>_confidence.json`` — with the
    per-vertex values when ``--out``'s format cannot carry them (STL, OBJ, OFF)."""
    import numpy as np

    from ..io.atomic import atomic_write_bytes
    from ..io.mesh import SCALAR_SUFFIXES
    from ..x2b.confidence import CONFIDENCE_ARRAY, training_likeness_warnings

    thorax = (((header or {}).get("dataset") or {}).get("build") or {}).get("isocenter") == "thorax"
    warnings = training_likeness_warnings(xrays[0]) if thorax else []
    c = rec.confidence
    summary = {"mean_confidence": round(rec.mean_confidence, 4),
               "confidence_quantiles": {q: round(float(np.quantile(c, float(q))), 4) for q in ("0.1", "0.5", "0.9")},
               "measure": "|p(v + h n) - p(v - h n)|, h = 1/128 of the box along the vertex normal (0: flat "
                          "occupancy near the threshold, 1: a decisive boundary)",
               "ood_checked": thorax, "ood_warnings": warnings}
    if Path(a.out).suffix.lower() not in SCALAR_SUFFIXES:
        summary["vertex_confidence"] = [round(float(v), 4) for v in c]  # the mesh file's vertex order
    where = (f" (its vertex scalar '{CONFIDENCE_ARRAY}')" if Path(a.out).suffix.lower() in SCALAR_SUFFIXES
             else " (per vertex: in the JSON, not in the mesh)")
    if a.refine == "template":  # the refined mesh is the templates': the confidence is the coarse X2B mesh's
        where = f" of the coarse X2B mesh {x2br_outputs(a.out)['the X2B mesh <stem>_x2b'].name}" + where
    print(f"confidence: mean {rec.mean_confidence:.3f} per vertex{where}")
    for w in warnings:
        print(f"WARNING: {Path(a.xray).name} may be outside what the model was trained on: {w}", file=sys.stderr)
    path = _confidence_json(a.out)
    atomic_write_bytes(path, (json.dumps(summary, indent=1) + "\n").encode())
    print(path)


def _reconstruct_outputs(a) -> dict:
    """Every file ``reconstruct`` writes, by what names it (checked for collisions before any work)."""
    outputs = {"--out": a.out, "--render": a.render, "the confidence summary <stem>_confidence.json":
               _confidence_json(a.out)}
    if a.refine == "template":
        outputs.update(x2br_outputs(a.out))
    return outputs


def _warn_geometry_misfit(cfg: dict | None, path, xray) -> None:
    """One warning line when an X-ray's geometry (its JSON, or where placement put it) is not the one the model
    was trained with: which values differ and what that does to the mesh."""
    from ..dataset.model_fit import xray_differences

    diffs = xray_differences(cfg, xray.geometry) if cfg else []
    if diffs:
        print(f"warning: {Path(path).name}: geometry differs from the model's training geometry — "
              + "; ".join(diffs), file=sys.stderr, flush=True)


def add_parsers(sub) -> None:
    p = sub.add_parser("reconstruct", help="X-ray(s) → bone mesh with an X2B/X2B2 model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Reconstruct the bones from one X-ray (X2B) or a frontal + lateral pair (X2B2). "
                                   "Inputs: PNG (8/16-bit grey; a <stem>.json beside it gives the geometry), DICOM, "
                                   "2D NIfTI/NRRD/MHA. The mesh is written in LPS millimetres in the X-ray's geometry.")
    p.add_argument("--xray", required=True, help="the (frontal) X-ray")
    p.add_argument("--lateral", help="the lateral X-ray (X2B2 models)")
    p.add_argument("--model", type=model_arg,
                   help="checkpoint (.safetensors), or a bundled X2B model (not clinical; x2recon info --bundled): "
                        "'demo' (x2recon/resources/models/x2b_demo.safetensors, trained on one patient) or 'skeleton' "
                        "(x2b_skeleton.safetensors, the whole skeleton, trained on every shared patient); needed by "
                        "--method network")
    p.add_argument("--method", choices=["network", "atlas"], default="network",
                   help="network: the X2B/X2B2 model (--model); atlas: no learning — the --library case whose DRR "
                        "of the X-ray's view matches best after a 2D scale + shift alignment, its bones placed on "
                        "the X-ray (docs/models.md)")
    p.add_argument("--library", help="--method atlas: dataset folder(s) built with x2recon build-dataset, "
                                     "comma-separated (every case, scans and variants, is a candidate)")
    p.add_argument("--out", required=True, type=output_file, help="mesh file: .stl, .ply, .obj, .off or .vtk")
    p.add_argument("--view", type=view_name, help="view of --xray when it has no geometry file: AP, PA, LAT or degrees "
                   "(default: the DICOM ViewPosition, else AP; printed)")
    p.add_argument("--lateral-view", type=view_name, default="LAT",
                   help="view of --lateral when it has no geometry file: LAT or degrees")
    p.add_argument("--geometry", help="geometry JSON of --xray (overrides <stem>.json)")
    p.add_argument("--lateral-geometry", help="geometry JSON of --lateral")
    p.add_argument("--pixel-spacing", type=positive_float, help="detector pixel spacing of --xray, mm (default: "
                   "DICOM ImagerPixelSpacing, else estimated from the lung fields; printed)")
    p.add_argument("--sdd", type=positive_float, help="source–detector distance of --xray, mm (default: DICOM, else 1800)")
    p.add_argument("--sod", type=positive_float, help="source–patient (isocentre) distance of --xray, mm (default: "
                   "DICOM, else 1600)")
    p.add_argument("--resolution", type=mise_resolution, default=256, help="final MISE grid, cells per side (32·2^k)")
    p.add_argument("--threshold", type=probability, default=None,
                   help="occupancy threshold τ (default: the model's — calibrated on validation where its training "
                   "recorded one, else 0.2)")
    p.add_argument("--faces", type=non_negative_int, default=0, help="simplify to about this many triangles (pyfqmr; 0: off)")
    p.add_argument("--refine-steps", type=non_negative_int, default=0, help="gradient steps moving vertices onto the level set")
    p.add_argument("--network-normals", action="store_true", help="vertex normals from the network's gradient")
    p.add_argument("--refine", choices=["none", "template"], default="none",
                   help="template: X2BR — detect vertebrae/ribs, assemble their templates, register them onto the "
                        "X2B shape (with --detector and --templates, by default the bundled ones)")
    p.add_argument("--detector", help="detector weights (x2recon train detector); default: the bundled detector, "
                                      "x2recon/resources/models/detector.safetensors")
    p.add_argument("--templates", help="template library folder (x2recon template build); default: the bundled "
                                       "library, x2recon/resources/models/templates")
    p.add_argument("--registration", default="gbcpd", choices=["gbcpd", "bcpd", "cpd"],
                   help="template registration (X2BR: GBCPD++; CPD is the paper's baseline)")
    p.add_argument("--conf", type=probability, default=0.25, help="detection confidence threshold, 0–1")
    p.add_argument("--device", default="auto", type=device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                   help="the occupancy decoder's matrix products during MISE: auto is bf16 on a CPU that multiplies "
                        "bf16 natively (AVX-512 BF16, AMX), else fp32 (also on a GPU); int8 (CPU only, dynamic "
                        "quantisation) is faster on some CPUs but moves the surface by up to a few voxels")
    p.add_argument("--no-watertight", action="store_true",
                   help="keep marching cubes' raw surface (open at the box border, every speck); by default the "
                        "mesh is closed, manifold and without pieces under 50 mm³")
    p.add_argument("--render", type=output_file, help="also write a PNG rendering of the mesh here")
    p.add_argument("--render-confidence", action="store_true",
                   help="with --render: colour the rendering by the per-vertex confidence (0 blue: the occupancy is "
                        "flat near the threshold, the surface is a guess; 1 red: a decisive boundary). The "
                        "confidence is always computed: a vertex scalar in .ply/.vtk meshes (.stl/.obj/.off cannot "
                        "carry it: its values go to <stem>_confidence.json, with the mean and any warning that the "
                        "X-ray does not look like what the model was trained on)")
    p.add_argument("--progress-lines", action="store_true", help="print 'X2RECON_PROGRESS <percent> <message>' lines")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reconstruct)
