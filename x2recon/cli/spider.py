"""``x2recon`` subcommands for SPIDER: ``train spider`` and ``spider`` (registered by ``x2recon.cli``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..resources import model_arg
from .common import (device, resume, non_negative_float, non_negative_int, output_dir, output_file, positive_float,
                     positive_int, probability)
from .common import ProgressLines, default_workers, ints, views


def cmd_train_spider(a) -> int:
    from ..dataset.spider_data import class_members, default_classes
    from ..spider.hash_encoding import HashEncodingConfig
    from ..spider.network import SpiderConfig
    from ..train.common import TrainSettings
    from ..spider.train import train_spider
    from ..dataset.torch_data import dataset_build_config

    data = Path(a.data)
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
                           augment=not a.no_augment)
    if summary.get("stopped"):
        print(f"stopped at step {summary['steps']}; run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1))
    return 0


def add_spider_train_parser(tsub) -> None:
    """``x2recon train spider`` (added to ``train``'s networks by ``cli_x2b.add_train_parser``)."""
    p = tsub.add_parser("spider", help="two X-rays → CT + segmentation (SPIDER)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Train SPIDER on a dataset's frontal + lateral DRRs and SPIDER targets "
                                    "(spider/ct.nii.gz, spider/labels.nii.gz). Defaults are the paper's recipe "
                                    "(SGD, lr 1e-3 halved every 100 epochs, 500 epochs) except where noted.")
    p.add_argument("--data", required=True, help="dataset folder (x2recon build-dataset)")
    p.add_argument("--out", required=True, type=output_dir, help="run folder: checkpoints, log.jsonl, tensorboard/")
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
    g.add_argument("--epochs", type=positive_int, default=500, help="passes over the training split")
    g.add_argument("--steps", type=non_negative_int, default=0, help="stop after this many steps (0: epochs decide)")
    g.add_argument("--batch-size", type=positive_int, default=4, help="global batch of cases (split over torchrun processes)")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="SGD (momentum 0.9) or Adam")
    g.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate")
    g.add_argument("--lr-step", type=non_negative_int, default=100, help="epochs between learning-rate decays (0: constant)")
    g.add_argument("--lr-gamma", type=positive_float, default=0.5, help="learning-rate factor at each decay")
    g.add_argument("--lambda", dest="lam", type=non_negative_float, default=1.0, help="weight of the Dice loss (paper eq. 26)")
    g.add_argument("--points", type=positive_int, default=8192, help="points per case per step")
    g.add_argument("--foreground-fraction", type=probability, default=0.25,
                   help="share of points drawn from labelled voxels (0: uniform, the paper's sampling)")
    g.add_argument("--no-augment", action="store_true", help="no image augmentation")
    g.add_argument("--seed", type=non_negative_int, default=0, help="random seed (initialisation, sampling)")
    g = p.add_argument_group("running")
    g.add_argument("--device", default="auto", type=device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision (auto: bf16 on CUDA, off on CPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g.add_argument("--workers", type=non_negative_int, default=default_workers(),
                   help="data-loading processes per training process "
                        "(default: CPU cores − 1, at most 4: %(default)s here)")
    g.add_argument("--threads", type=non_negative_int, default=0, help="CPU threads per process (0: torch's default)")
    g.add_argument("--train-split", default="train", help="split to train on (splits/<name>.txt)")
    g.add_argument("--val-split", default="val", help="'' to skip validation")
    g.add_argument("--val-every", type=positive_int, default=10, help="epochs between validations")
    g.add_argument("--save-every", type=non_negative_int, default=500, help="steps between checkpoints (0: at epoch ends only)")
    g.add_argument("--resume", default="auto", type=resume, help="auto (continue --out), never, or a checkpoint to start from")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_spider)


def cmd_spider(a) -> int:
    from ..errors import X2ReconInputError
    from ..nn.checkpoint import load_model
    from ..nn.device import resolve_device
    from ..spider.inference import read_view, reconstruct_ct, write_result

    if a.resolution < 2:
        raise X2ReconInputError("--resolution", f"must be at least 2, got {a.resolution}")
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


def add_parsers(sub) -> None:
    p = sub.add_parser("spider", help="frontal + lateral X-rays → CT volume and labelmap (SPIDER)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Reconstruct a CT (HU) and a labelmap from two orthogonal X-rays with a SPIDER "
                                   "model. Inputs: PNG (+ <stem>.json geometry), DICOM, 2D NIfTI/NRRD/MHA; without "
                                   "a geometry file an X-ray gets the model's training geometry, centred at the "
                                   "origin. Outputs are in LPS millimetres on the reconstruction box.")
    p.add_argument("--pa", required=True, help="frontal X-ray (the model's first view, PA or AP)")
    p.add_argument("--lat", required=True, help="lateral X-ray")
    p.add_argument("--model", required=True, type=model_arg,
                   help="SPIDER checkpoint (.safetensors); no SPIDER model is bundled ('demo' names the X2B demo "
                        "model, which 'reconstruct' uses)")
    p.add_argument("--out", required=True, type=output_file, help="CT volume file (.nii.gz, .nrrd, .mha)")
    p.add_argument("--labels", type=output_file, help="labelmap file; a <name>.labels.json with the class names is written beside it")
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
    p.add_argument("--progress-lines", action="store_true", help="print 'X2RECON_PROGRESS <percent> <message>' lines")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_spider)
