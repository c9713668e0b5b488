"""``x2recon`` subcommands for X2BR's detector and templates: ``train detector``, ``template build``,
``detect`` (registered by ``x2recon.cli`` and ``x2recon.cli.train``), and the X2BR
input checks and writers that ``reconstruct`` and ``evaluate`` share."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..resources.registry import detector_arg
from .common import (ProgressLines, non_negative_int, output_dir, output_file, positive_int, probability, view_name)


def _progress(lines: bool, quiet: bool, desc: str):
    """The shared progress reporter with its bar named ``desc``."""
    return ProgressLines(lines, quiet, desc)


def need_x2br_inputs(a, allow_ground_truth: bool = False) -> None:
    """--detector and --templates exist (``evaluate`` may name ``ground-truth`` boxes instead of a detector),
    and a detector's ultralytics (the optional x2br extra) imports — checked before any work, not after the
    X2B reconstruction."""
    from ..errors import X2ReconInputError

    for flag in ("detector", "templates"):
        if not getattr(a, flag):
            raise X2ReconInputError(f"--{flag}", f"--refine template needs --{flag}")
        if flag == "detector" and allow_ground_truth and a.detector == "ground-truth":
            continue
        if not Path(getattr(a, flag)).exists():
            raise X2ReconInputError(getattr(a, flag), f"--{flag} not found")
    if not (allow_ground_truth and a.detector == "ground-truth"):
        need_ultralytics("--refine template")


def need_ultralytics(purpose: str, config_dir=None) -> None:
    """Import ultralytics (offline, ``import_ultralytics``) now, or fail with one line naming the x2br extra."""
    from ..deps import DependencyError
    from ..x2br.detection.offline import import_ultralytics

    try:
        import_ultralytics(config_dir)
    except DependencyError as e:
        raise DependencyError(f"{purpose}: {e.problem}") from None


def bundled_x2br_inputs(a) -> list[str]:
    """``reconstruct --refine template``: an unset --detector or --templates becomes the bundled one
    (``x2recon/resources/models``; missing → an error naming the file and the flag that replaces it).
    Returns one line per input saying which file is used and whether it is the bundled one."""
    from ..resources import bundled

    said = []
    for flag in ("detector", "templates"):
        given = getattr(a, flag)
        if not given:
            setattr(a, flag, str(bundled(flag)))
        said.append(f"--{flag}: {getattr(a, flag)}{'' if given else ' (bundled)'}")
    return said


def x2br_outputs(out) -> dict[str, Path]:
    """What ``reconstruct --refine template`` writes beside ``--out``: the parts folder, the coarse X2B
    mesh and the detections (named as ``write_x2br`` writes them)."""
    out = Path(out)
    stem = out.name.split(".")[0]
    return {"the parts folder <stem>_parts/": out.with_name(stem + "_parts"),
            "the X2B mesh <stem>_x2b": out.with_name(stem + "_x2b" + out.suffix),
            "the detections <stem>_detections.json": out.with_name(stem + "_detections.json")}


def write_x2br(res, a, rec, xray) -> None:
    """The refined mesh at --out, one mesh per structure beside it (<stem>_parts/), detections as JSON."""
    from ..io.mesh import write_mesh

    out = Path(a.out)
    parts_dir, x2b_mesh, detections = x2br_outputs(out).values()
    write_mesh(res.mesh, out)
    for name, m in res.parts.items():
        write_mesh(m, parts_dir / f"{name}{out.suffix if out.suffix != '.gz' else '.ply'}")
    write_mesh(rec.mesh, x2b_mesh)
    from ..x2br.detection.detections import write_detections

    write_detections(res.detections, detections, image=a.xray, size=tuple(xray.image.shape[::-1]), weights=a.detector,
                     extra=res.report())
    print(f"{out}: X2BR ({a.registration.upper()}) — {len(res.parts)} structures in {parts_dir}, "
          f"{len(res.detections)} detections, coarse X2B mesh {x2b_mesh}; "
          f"registration {res.registration.seconds:.1f} s, {res.registration.iterations} iterations")
    for line in res.summary_lines():  # what is missing or was rejected, never silent (also in the detections JSON)
        print(f"  {line}")


# ------------------------------------------------------------------------------ train detector
def cmd_train_detector(a) -> int:
    from ..dataset.lock import run_lock

    with run_lock(a.out, "train detector"):  # one run per --out: a second refuses at once, naming this one
        return _train_detector(a)


def _train_detector(a) -> int:
    from ..x2br.detection.yolo import train_detector

    prog = _progress(a.progress_lines, True, "detector")  # ultralytics prints its own bars
    try:
        s = train_detector(a.data, a.out, model=a.model, epochs=a.epochs, imgsz=a.imgsz, batch=a.batch,
                           device=a.device, workers=a.workers, resume=a.resume, progress=prog,
                           views=[v for v in a.views.split(",") if v.strip()] or None, classes=a.classes,
                           patience=a.patience, seed=a.seed, config_dir=a.config_dir, quiet=a.quiet)
    finally:
        prog.close()
    if s.get("stopped"):
        print(f"stopped after epoch {s.get('epochs_completed')}; run the same command again to resume", file=sys.stderr)
        return 130
    keys = ("mAP50", "mAP50-95", "eval_split", "held_out", "epochs_completed", "imgsz", "classes", "images", "weights",
            "seconds", "already_finished")
    print(json.dumps({k: s[k] for k in keys if k in s}, indent=1))
    print(f"summary: {Path(a.out) / 'summary.json'}")
    return 0


def add_detector_train_parser(tsub) -> None:
    """``x2recon train detector`` (added to ``train``'s networks by ``cli.train``)."""
    from ..x2br.detection.yolo import CLASS_MODES, DEFAULT_MODEL, YOLOV9_MODELS

    p = tsub.add_parser("detector", help="YOLOv9 bone detector on the dataset's DRRs and boxes (X2BR §3.2)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Train a YOLOv9 detector (ultralytics, fully offline: built from its yaml, no "
                                    "pretrained download, no analytics) on the dataset's DRRs and the boxes projected "
                                    "from their segmentations. Writes RUN/detector.safetensors and RUN/summary.json "
                                    "(mAP50, mAP50-95 on the test split, else val). Resumes an unfinished RUN.")
    p.add_argument("--data", required=True, help="dataset folder (x2recon build-dataset)")
    p.add_argument("--out", required=True, type=output_dir, help="run folder (detector.safetensors, summary.json)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model yaml ({', '.join(YOLOV9_MODELS)}) or your own .pt")
    p.add_argument("--epochs", type=positive_int, default=100, help="training epochs")
    p.add_argument("--imgsz", type=positive_int, default=512, help="network input size, pixels (the DRRs are 512²)")
    p.add_argument("--batch", type=positive_int, default=16, help="images per batch")
    p.add_argument("--device", default="auto", type=detector_device, help="auto, cpu, cuda, or GPU indices: 0, 0,1 …")
    p.add_argument("--workers", type=non_negative_int, default=2, help="data-loading processes")
    p.add_argument("--views", default="", help="views to train on (default: every view in the dataset)")
    p.add_argument("--classes", default="dataset", choices=CLASS_MODES,
                   help="dataset: the builder's labels (cervical, thoracic, lumbar, ribs); structures: one class per "
                        "vertebra and rib (TotalSegmentator names)")
    p.add_argument("--patience", type=positive_int, default=100, help="epochs without improvement before stopping early")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (data order, augmentation)")
    p.add_argument("--resume", default="auto", help="auto (continue --out), never, or a last.pt to resume")
    p.add_argument("--config-dir", help="ultralytics config folder (default: ~/.cache/x2recon/ultralytics)")
    p.add_argument("--progress-lines", action="store_true", help="print 'X2RECON_PROGRESS <percent> <message>' lines")
    p.add_argument("--quiet", action="store_true", help="only ultralytics' warnings")
    p.set_defaults(func=cmd_train_detector)


# ------------------------------------------------------------------------------ template build
def cmd_template_build(a) -> int:
    from ..errors import X2ReconInputError
    from ..x2br.template.library import build_library

    if a.data is None and a.skel is None:
        raise X2ReconInputError("--data/--skel", "give --data (a dataset with meshes) and/or --skel (a folder of "
                                                 "SKEL bone meshes)")
    prog = _progress(a.progress_lines, a.quiet, "templates")
    try:
        lib = build_library(a.data, a.out, structures=a.structures, reference=a.reference, progress=prog,
                            split=a.split, skel=a.skel,
                            skel_options={"axes": a.skel_axes, "units": a.skel_units} if a.skel else None)
    finally:
        prog.close()
    doc = lib.doc
    srcs = {}
    for info in doc["structures"].values():
        srcs[info.get("source_case") or "SKEL"] = srcs.get(info.get("source_case") or "SKEL", 0) + 1
    print(f"{len(lib)} templates in {a.out} (box {doc['box_size']:g} mm; {doc['selection']}): "
          + ", ".join(f"{k}: {v}" for k, v in sorted(srcs.items())))
    if doc.get("missing"):
        print(f"not in the dataset: {', '.join(doc['missing'])}", file=sys.stderr)
    if doc.get("skel"):
        print(f"SKEL parts: {doc['skel']['parts']}; skipped bodies: {doc['skel']['skipped_bodies']}")
    print(Path(a.out) / "library.json")
    return 0


def add_template_parser(sub) -> None:
    t = sub.add_parser("template", help="template meshes for X2BR (build a library)",
                       description="Template meshes for X2BR's refinement.")
    tsub = t.add_subparsers(dest="template_command", metavar="<action>", required=True)
    p = tsub.add_parser("build", help="one watertight template per structure from a dataset's meshes (+ SKEL)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Build a template library: per structure (TotalSegmentator names) the dataset "
                                    "case's mesh closest to the median volume (or --reference CASE), stored in mm "
                                    "relative to the reconstruction-box centre and in normalised box coordinates, "
                                    "with library.json. --skel adds SKEL bone meshes you exported yourself (SKEL is "
                                    "licensed and never shipped; its thorax is one part, skel_thorax).")
    p.add_argument("--data", help="dataset folder with per-case meshes (x2recon build-dataset)")
    p.add_argument("--out", required=True, type=output_dir, help="library folder (library.json + one mesh per structure)")
    p.add_argument("--structures", help="names and/or groups, comma-separated (default: every structure with meshes)")
    p.add_argument("--reference", default="median", help="median, or a case id to take every template from")
    p.add_argument("--split", default="train", help="cases to draw from: train (default; all cases if no splits) or all")
    p.add_argument("--skel", help="folder of SKEL per-bone meshes (thorax.obj, lumbar_body.obj, …)")
    p.add_argument("--skel-axes", default="smpl", choices=["smpl", "lps"], help="frame of the SKEL files")
    p.add_argument("--skel-units", default="auto", choices=["auto", "m", "mm"],
                   help="length unit of the SKEL files (auto: metres when the whole skeleton spans under 5 units)")
    p.add_argument("--progress-lines", action="store_true", help="print 'X2RECON_PROGRESS <percent> <message>' lines")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_template_build)


# ------------------------------------------------------------------------------------- detect
def cmd_detect(a) -> int:
    from ..x2br.detection.detections import write_detections
    from ..x2br.detection.yolo import Detector
    from ..io.xray import read_xray

    x = read_xray(a.xray, view=a.view, geometry=a.geometry, orient=False)  # boxes in the file's own pixels
    print(f"detector: {a.detector}")
    det = Detector(a.detector, device=a.device, imgsz=a.imgsz or None, config_dir=a.config_dir)
    dets = det.detect(x.image, conf=a.conf, iou=a.iou)
    out = Path(a.out) if a.out else Path(a.xray).with_name(Path(a.xray).name.split(".")[0] + "_boxes.json")
    write_detections(dets, out, image=str(a.xray), size=x.geometry.size, weights=str(a.detector))
    W, H = x.geometry.size
    print(f"{len(dets)} detection(s) in {a.xray} ({W}×{H}, conf ≥ {a.conf}):")
    for d in dets:
        print(f"  {d.name:16s} {d.confidence:.3f}  x {d.x0:7.1f}–{d.x1:7.1f}  y {d.y0:7.1f}–{d.y1:7.1f}")
    print(out)
    return 0


def add_detect_parser(sub) -> None:
    p = sub.add_parser("detect", help="vertebrae and ribs boxes on an X-ray with a trained detector",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Run a trained detector (x2recon train detector) on an X-ray (PNG with its geometry "
                                   "JSON, DICOM, 2D NIfTI/NRRD). Boxes are in the X-ray's own pixels (col, row; pixel "
                                   "centres at integers), written as JSON.")
    p.add_argument("xray", help="the X-ray")
    p.add_argument("--detector", default="detector", type=detector_arg,
                   help="RUN/detector.safetensors (or an ultralytics .pt of your own); default 'detector': the bundled "
                        "one, x2recon/resources/models/detector.safetensors")
    p.add_argument("--out", type=output_file, help="boxes JSON (default: <xray stem>_boxes.json beside the X-ray)")
    p.add_argument("--conf", type=probability, default=0.25, help="confidence threshold, 0–1")
    p.add_argument("--iou", type=probability, default=0.7, help="NMS IoU threshold, 0–1")
    p.add_argument("--imgsz", type=non_negative_int, default=0, help="network input size, pixels (0: the training size)")
    p.add_argument("--view", type=view_name, help="view when the X-ray has no geometry file (default: the DICOM "
                   "ViewPosition, else AP)")
    p.add_argument("--geometry", help="geometry JSON of the X-ray")
    p.add_argument("--device", default="cpu", type=detector_device, help="cpu, cuda, auto, or a GPU index (0)")
    p.add_argument("--config-dir", help="ultralytics config folder (default: ~/.cache/x2recon/ultralytics)")
    p.set_defaults(func=cmd_detect)


def detector_device(s: str) -> str:
    """ultralytics' device strings: auto, cpu, cuda[:N], or GPU indices ``0`` / ``0,1``."""
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|\d+(,\d+)*", s):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or GPU indices such as 0 or 0,1; got {s!r}")
    return s


def add_parsers(sub) -> None:
    add_template_parser(sub)
    add_detect_parser(sub)
