"""``x2recon`` subcommands for SPIDER: ``train spider`` and ``spider`` (registered by ``x2recon.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..io.volume import WRITABLE_VOLUME_SUFFIXES
from ..resources import model_arg
from .common import (device, non_negative_float, non_negative_int, output_dir, output_file, positive_float,
                     positive_int, probability)
from .common import output_file_of, refuse_colliding_paths
from .common import ProgressLines, add_preset_option, add_training_run_options, apply_preset, ints, preset_help, views

#: ``train spider`` options a preset sets.  Paper (spider-paper §3.4, §4.2): SGD, lr 1e-3 halved every 100
#: epochs, 500 epochs; points drawn uniformly from the target domain; no augmentation (none is mentioned).
#: Its λ, hash levels/features and image size are symbols lost from the text we have: not set.
TRAIN_PRESETS = {
    "optimizer": {"ours": "sgd", "paper": "sgd"},
    "lr": {"ours": 1e-3, "paper": 1e-3},
    "lr_step": {"ours": 100, "paper": 100},
    "lr_gamma": {"ours": 0.5, "paper": 0.5},
    "epochs": {"ours": 500, "paper": 500},
    "foreground_fraction": {"ours": 0.25, "paper": 0.0},
    "augment": {"ours": True, "paper": False},
}


def cmd_train_spider(a) -> int:
    from ..dataset.lock import run_lock

    with run_lock(a.out, "train spider"):  # one run per --out: a second refuses at once, naming this one
        return _train_spider(a)


def _train_spider(a) -> int:
    from ..dataset.spider_data import class_members, default_classes
    from ..spider.hash_encoding import HashEncodingConfig
    from ..spider.network import SpiderConfig
    from ..train.common import TrainSettings
    from ..spider.train import train_spider
    from ..dataset.torch_data import dataset_build_config

    apply_preset(a, TRAIN_PRESETS)
    data = Path(a.data)
    beam = dataset_build_config(data).get("beam")
    if a.preset == "paper" and beam != "parallel":
        print(f"warning: {data} has {beam}-beam DRRs; the paper projects with a parallel beam "
              "(x2recon build-dataset --beam parallel)", file=sys.stderr)
    if a.decoder == "volume-only":
        classes = []
    elif a.structures:
        classes = [c.strip() for c in a.structures.split(",") if c.strip()]
    else:
        classes = default_classes(dataset_build_config(data)["structures"])
    hash_cfg = HashEncodingConfig(n_levels=a.hash_levels, n_features_per_level=a.hash_features,
                                  log2_hashmap_size=a.hash_log2_size, base_resolution=a.hash_base,
                                  per_level_scale=None, finest_resolution=a.hash_finest)
    cfg = SpiderConfig(views=views(a.views), image_size=a.image_size, unet_channels=ints(a.unet_channels),
                       feature_channels=a.features, hash=hash_cfg.to_dict(), hidden=a.hidden, layers=a.layers,
                       decoder=a.decoder, classes=classes, members=class_members(classes) if classes else {},
                       prefer_tcnn=not a.no_tcnn)
    settings = TrainSettings(out=a.out, epochs=a.epochs, max_steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                             workers=a.workers, seed=a.seed, device=a.device, amp=a.amp, compile=a.compile,
                             val_every=a.val_every, save_every=a.save_every, resume=a.resume, progress=not a.quiet,
                             threads=a.threads, channels_last=False)
    summary = train_spider(data, settings, cfg, n_points=a.points, lam=a.lam, optimizer=a.optimizer,
                           lr_step_epochs=a.lr_step, lr_gamma=a.lr_gamma, foreground_fraction=a.foreground_fraction,
                           train_split=a.train_split, val_split=a.val_split,
                           augment=a.augment, preset=a.preset)
    if summary.get("stopped"):
        print(f"stopped at step {summary['steps']}; run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1))
    return 0


def add_spider_train_parser(tsub) -> None:
    """``x2recon train spider`` (added to ``train``'s networks by ``cli.train``)."""
    p = tsub.add_parser("spider", help="two X-rays → CT + segmentation (SPIDER)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Train SPIDER on a dataset's frontal + lateral DRRs and SPIDER targets "
                                    "(spider/ct.nii.gz, spider/labels.nii.gz). The optimiser and schedule are the "
                                    "paper's (SGD, lr 1e-3 halved every 100 epochs, 500 epochs); point sampling and "
                                    "augmentation are ours unless --preset paper.")
    p.add_argument("--data", required=True, help="dataset folder (x2recon build-dataset)")
    p.add_argument("--out", required=True, type=output_dir, help="run folder: checkpoints, log.jsonl, tensorboard/")
    add_preset_option(p, "the SPIDER paper states (§4.2: SGD, lr 1e-3 halved every 100 epochs, 500 epochs; "
                      "uniform points; no augmentation)")
    pre, keep = TRAIN_PRESETS, argparse.SUPPRESS
    g = p.add_argument_group("architecture")
    g.add_argument("--views", default="PA,LAT", help="frontal,lateral views (rendered in the dataset)")
    g.add_argument("--structures", default="", help="classes, comma-separated: groups (ribs, thoracic, lumbar, "
                   "cervical, vertebrae, …) or TotalSegmentator names; default: the dataset's structures by group")
    g.add_argument("--decoder", default="shared", choices=["shared", "volume-only", "two-branch", "two-stage"],
                   help="shared = SPIDER; the others are the ablations of §5.3")
    g.add_argument("--image-size", type=positive_int, default=128, help="network input size, pixels per side")
    g.add_argument("--unet-channels", default="32,64,128,256", help="UNet widths, finest level first")
    g.add_argument("--features", type=positive_int, default=32, help="feature channels per view")
    g.add_argument("--hash-levels", type=positive_int, default=16, help="hash encoding: resolution levels")
    g.add_argument("--hash-features", type=positive_int, default=2, help="hash encoding: features per level")
    g.add_argument("--hash-log2-size", type=positive_int, default=19, help="hash encoding: log2 of the table entries per level")
    g.add_argument("--hash-base", type=positive_int, default=16, help="hash encoding: coarsest grid, cells per side")
    g.add_argument("--hash-finest", type=positive_float, default=512, help="hash encoding: finest grid, cells per side")
    g.add_argument("--hidden", type=positive_int, default=128, help="decoder MLP width, neurons")
    g.add_argument("--layers", type=positive_int, default=4, help="decoder MLP hidden layers")
    g.add_argument("--no-tcnn", action="store_true", help="use x2recon's hash encoding even where tinycudann imports")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=keep, help=preset_help(pre, "epochs"))
    g.add_argument("--steps", type=non_negative_int, default=0, help="stop after this many steps (0: epochs decide)")
    g.add_argument("--batch-size", type=positive_int, default=4, help="global batch of cases (split over torchrun processes)")
    g.add_argument("--optimizer", default=keep, choices=["sgd", "adam"],
                   help=preset_help(pre, "optimizer", "SGD has momentum 0.9 (the paper does not state it)"))
    g.add_argument("--lr", type=positive_float, default=keep, help=preset_help(pre, "lr"))
    g.add_argument("--lr-step", type=non_negative_int, default=keep,
                   help=preset_help(pre, "lr_step", "epochs between learning-rate decays (0: constant)"))
    g.add_argument("--lr-gamma", type=positive_float, default=keep, help=preset_help(pre, "lr_gamma"))
    g.add_argument("--lambda", dest="lam", type=non_negative_float, default=1.0,
                   help="weight of the Dice loss (paper eq. 26; its value is not legible in the text we have)")
    g.add_argument("--points", type=positive_int, default=8192, help="points per case per step")
    g.add_argument("--foreground-fraction", type=probability, default=keep,
                   help=preset_help(pre, "foreground_fraction", "share of points drawn from labelled voxels "
                                    "(0: uniform)"))
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=keep,
                   help=preset_help(pre, "augment", "image augmentation (gamma, contrast, noise, in-plane shift "
                                    "that the geometry follows)"))
    g.add_argument("--seed", type=non_negative_int, default=0, help="random seed (initialisation, sampling)")
    add_training_run_options(p, val_every=10)
    p.set_defaults(func=cmd_train_spider)


def cmd_spider(a) -> int:
    from ..errors import X2ReconInputError
    from ..nn.checkpoint import load_model
    from ..nn.device import resolve_device
    from ..spider.inference import read_view, reconstruct_ct, write_result

    if a.resolution < 2:
        raise X2ReconInputError("--resolution", f"must be at least 2, got {a.resolution}")
    _refuse_colliding_outputs(a)
    print(f"model: {a.model}")  # the bundled one unless --model was given: never silent
    if a.from_ct:
        _render_pair_from_ct(a)
    dev = resolve_device(a.device)
    model, cfg = load_model(a.model, dev, network="spider")
    fv, lv = model.cfg.views
    xrays = [read_view(a.pa, fv, cfg, a.pa_geometry), read_view(a.lat, lv, cfg, a.lat_geometry)]
    prog = ProgressLines(a.progress_lines, a.quiet)
    try:
        if a.fit_ct:
            from ..io.volume import read_ct
            from ..spider.inference import fit_to_ct

            model = fit_to_ct(model, xrays, read_ct(a.fit_ct), steps=a.fit_steps,
                              progress=lambda f, m: prog(0.5 * f, m))
            inner = lambda f, m: prog(0.5 + 0.5 * f, m)
        else:
            inner = prog
        res = reconstruct_ct(model, xrays, resolution=a.resolution, chunk=a.chunk, precision=a.precision, progress=inner)
    finally:
        prog.close()
    files = write_result(res, a.out, a.labels)
    n = a.resolution
    print(f"{', '.join(map(str, files))}: {n}³ at {res.ct.spacing[0]:.2f} mm, LPS, in {res.seconds:.2f} s on {res.device}")
    return 0


def _refuse_colliding_outputs(a) -> None:
    """Every file ``spider`` writes (the CT, the labelmap and its names, with --from-ct the X-ray pair and
    their geometry), none the same as another or as an input, checked before any work."""
    from ..spider.inference import labels_sidecar

    outputs = {"--out": a.out, "--labels": a.labels,
               "the label names <labels>.labels.json": labels_sidecar(a.labels) if a.labels else None}
    inputs = {"--model": a.model, "--fit-ct": a.fit_ct, "--from-ct": a.from_ct, "--from-ct-labels": a.from_ct_labels}
    pair = {"--pa": a.pa, "--lat": a.lat, "--pa-geometry": a.pa_geometry, "--lat-geometry": a.lat_geometry}
    if a.from_ct:  # --pa and --lat are written, each with its geometry JSON beside it
        outputs.update({"--pa": a.pa, "--lat": a.lat, "the geometry of --pa": Path(a.pa).with_suffix(".json"),
                        "the geometry of --lat": Path(a.lat).with_suffix(".json")})
    else:
        inputs.update(pair)
    refuse_colliding_paths(outputs, inputs)


def _render_pair_from_ct(a) -> None:
    """``--from-ct``: the model's DRR pair of the CT (the dataset builder's renderer and geometry), written
    to ``--pa`` and ``--lat`` with their geometry JSON beside them."""
    from ..errors import X2ReconInputError
    from ..io.volume import read_ct, read_labelmap
    from ..nn.checkpoint import read_config
    from ..spider.inference import render_pair_from_ct, write_xray

    cfg = read_config(a.model)
    if not cfg.get("dataset", {}).get("build"):
        raise X2ReconInputError(a.model, "the checkpoint does not record its dataset's geometry, so its DRRs "
                                         "cannot be rendered from a CT; give the X-ray pair")
    if a.progress_lines:
        views = " and ".join(str(v).upper() for v in cfg["model"]["views"])
        print(f"X2RECON_PROGRESS 0 rendering the {views} DRRs of the CT", flush=True)
    labels = read_labelmap(a.from_ct_labels) if a.from_ct_labels else None
    pair = render_pair_from_ct(read_ct(a.from_ct), cfg, labels, device=a.device)
    for xray, path in zip(pair, (a.pa, a.lat)):
        write_xray(xray, path)


def add_parsers(sub) -> None:
    p = sub.add_parser("spider", help="frontal + lateral X-rays → CT volume and labelmap (SPIDER)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Reconstruct a CT (HU) and a labelmap from two orthogonal X-rays with a SPIDER "
                                   "model. Inputs: PNG (+ <stem>.json geometry), DICOM, 2D NIfTI/NRRD/MHA; without "
                                   "a geometry file an X-ray gets the model's training geometry, centred at the "
                                   "origin. Outputs are in LPS millimetres on the reconstruction box.")
    p.add_argument("--pa", required=True, help="frontal X-ray (the model's first view, PA or AP); with --from-ct, "
                                               "where the rendered one is written")
    p.add_argument("--lat", required=True, help="lateral X-ray (with --from-ct: written)")
    p.add_argument("--model", default="spider", type=model_arg,
                   help="SPIDER checkpoint (.safetensors); default 'spider': the bundled SPIDER model "
                        "(x2recon/resources/models/spider_skeleton.safetensors, skeleton labels, trained on the shared "
                        "patients, not clinical; x2recon info spider prints its card)")
    p.add_argument("--out", required=True, type=output_file_of("volume", WRITABLE_VOLUME_SUFFIXES),
                   help="CT volume file (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--labels", type=output_file_of("volume", WRITABLE_VOLUME_SUFFIXES), help="labelmap file; a <name>.labels.json with the class names is written beside it")
    p.add_argument("--resolution", type=positive_int, default=128, help="voxels per edge of the box")
    p.add_argument("--pa-geometry", help="geometry JSON of --pa (overrides <stem>.json)")
    p.add_argument("--lat-geometry", help="geometry JSON of --lat")
    p.add_argument("--device", default="auto", type=device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--chunk", type=positive_int, default=1 << 18, help="points evaluated at a time (memory)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--fit-ct", help="segment this CT (paper §6.1): fit the model's intensities to it with the "
                   "decoder frozen, then write the labels it predicts (the CT must lie in the X-rays' box)")
    p.add_argument("--fit-steps", type=positive_int, default=200, help="--fit-ct: optimisation steps")
    p.add_argument("--from-ct", help="research: render the model's DRR pair from this CT first (the dataset "
                   "builder's renderer and geometry) and write it to --pa and --lat (+ <stem>.json)")
    p.add_argument("--from-ct-labels", help="--from-ct: labelmap (TotalSegmentator ids on the CT's grid); the "
                   "centre of the model's structures in it is the isocentre, as the builder chooses it "
                   "(default: the CT's centre)")
    p.add_argument("--progress-lines", action="store_true", help="print 'X2RECON_PROGRESS <percent> <message>' lines")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_spider)
