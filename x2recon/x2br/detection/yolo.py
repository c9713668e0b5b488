"""YOLOv9 (ultralytics) on the dataset's DRRs and their automatic box labels: training and inference.

X2BR (x2br-paper §3.2, §4.2) detects vertebrae (cervical, thoracic, lumbar) and ribs with a fine-tuned
YOLOv9.  Here the boxes come from the CT segmentation projected through each DRR's geometry (the
dataset's ``labels/<view>.txt``; a deliberate deviation from hand annotation, DESIGN.md) and the
network is trained from its yaml (no pretrained weights: nothing is downloaded; ``pretrained`` is
the user's own ``.pt`` if they have one).

Training (:func:`train_detector`) works in a run folder::

    RUN/
      data.yaml                  ultralytics dataset: the staged splits below, class names
      yolo_data/<split>/images/  <case>__<view>.png → links to the dataset's 16-bit DRRs (copies where
                                 links are impossible); ultralytics reads them as their high byte
      yolo_data/<split>/labels/  <case>__<view>.txt, the dataset's YOLO rows (or per-level rows)
      train/                     ultralytics' run: weights/last.pt (resume), weights/best.pt, results.csv
      detector.safetensors       the trained network for x2recon: weights + JSON config (nothing unpickled)
      state.json                 progress (epochs done, stopped/finished), rewritten every epoch
      summary.json               mAP50 and mAP50-95 on the held-out split (test, else val), timings

Why stage: ultralytics finds labels by replacing ``/images/`` with ``/labels/`` in each image path
and writes a ``labels.cache`` beside them; staging keeps every write inside the run folder and
lets a run pick views or per-level classes.  16-bit PNGs: ultralytics 8.4 decodes them with OpenCV
and keeps the high byte (``v >> 8``), a faithful 8-bit rendering of the full range (checked
pixel-for-pixel in Testing/test_detection.py), so no 8-bit copy is needed; :func:`to_uint8` is
that same mapping for inference.

Inference (:class:`Detector`) rebuilds the network from the yaml stored in ``detector.safetensors``
and runs letterbox → network → NMS itself, so boxes come back in the X-ray's own pixel grid whatever
``imgsz`` the network was trained at.  An ultralytics ``.pt`` also loads (it is a pickle: load only
your own).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import X2ReconInputError
from ...io.atomic import atomic_write_text
from ...io.documents import recorded_path
from .detections import Detection
from .offline import TRAIN_OVERRIDES, import_ultralytics, strip_online_callbacks

#: The smallest YOLOv9 (ultralytics ships t, s, m, c, e yamls).
DEFAULT_MODEL = "yolov9t.yaml"
YOLOV9_MODELS = ("yolov9t.yaml", "yolov9s.yaml", "yolov9m.yaml", "yolov9c.yaml", "yolov9e.yaml")
WEIGHTS_FORMAT = "x2recon.detector/1"
SUMMARY_FORMAT = "x2recon.detector-run/1"
CLASS_MODES = ("dataset", "groups", "structures")

Progress = Callable[[float, str], None]


# ------------------------------------------------------------------------------------------ images
def to_uint8(image) -> np.ndarray:
    """An X-ray display image as the 8-bit picture the detector was trained on.

    uint16 → high byte (what ultralytics makes of our 16-bit PNGs); float in [0, 1] → the uint16 the
    dataset would store (``round(x · 65535)``), then its high byte; uint8 unchanged.  An ``XRay`` is
    accepted (its ``image``).
    """
    a = np.asarray(getattr(image, "image", image))
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    if a.ndim != 2:
        raise X2ReconInputError(None, f"the detector needs one 2D greyscale image, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return (a >> 8).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < -1e-6 or a.max() > 1 + 1e-6:
            raise X2ReconInputError(None, "float X-ray images must be display intensities in [0, 1]")
        u16 = np.round(np.clip(a.astype(np.float64), 0, 1) * 65535.0).astype(np.uint16)
        return (u16 >> 8).astype(np.uint8)
    raise X2ReconInputError(None, f"unsupported pixel type {a.dtype} (use uint8, uint16 or float in [0, 1])")


# ----------------------------------------------------------------------------------------- staging
def _link_or_copy(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    try:
        os.symlink(src, dst)
    except (OSError, NotImplementedError):  # e.g. Windows without developer mode
        shutil.copy2(src, dst)


def _dataset_classes(root: Path) -> tuple[list[str], list[str]]:
    """(classes, views) of a built dataset (manifest.json, else the first case's meta.json)."""
    man = root / "manifest.json"
    if man.is_file():
        m = json.loads(man.read_text())
        if m.get("classes") and m.get("views"):
            return list(m["classes"]), list(m["views"])
    for meta in sorted((root / "cases").glob("*/meta.json")):
        d = json.loads(meta.read_text())
        return list(d["classes"]), list(d["views"])
    raise X2ReconInputError(root, "the dataset has no finished case (cases/*/meta.json); build it with "
                                  "'x2recon build-dataset'")


def _split_ids(root: Path, split: str) -> list[str]:
    f = root / "splits" / f"{split}.txt"
    if not f.is_file():
        return []
    return [s.strip() for s in f.read_text().splitlines() if s.strip()]


def stage_dataset(data_dir: str | Path, run_dir: str | Path, *, views: list[str] | None = None,
                  classes: str = "dataset") -> dict:
    """Link the dataset's DRRs and write their labels under ``run_dir/yolo_data``; write ``data.yaml``.

    ``classes``: ``dataset`` (the builder's labels — the paper's groups), ``groups`` (the same,
    recomputed from the boxes), or ``structures`` (one class per TotalSegmentator name: per-level
    vertebrae and ribs, from ``labels/<view>.json``).  Returns ``{classes, views, images, splits}``.
    """
    from ...drr.boxes import write_dataset_yaml

    root, run = Path(data_dir), Path(run_dir)
    if not (root / "cases").is_dir():
        raise X2ReconInputError(root, "not an x2recon dataset (no cases/ folder); build one with 'x2recon build-dataset'")
    if classes not in CLASS_MODES:
        raise ValueError(f"classes must be one of {CLASS_MODES}, got {classes!r}")
    ds_classes, ds_views = _dataset_classes(root)
    use_views = [v.upper() for v in views] if views else ds_views
    missing_v = [v for v in use_views if v not in ds_views]
    if missing_v:
        raise X2ReconInputError(root, f"views {missing_v} are not in the dataset (it has {ds_views})")
    splits = {s: _split_ids(root, s) for s in ("train", "val", "test")}
    if not splits["train"]:
        raise X2ReconInputError(root / "splits" / "train.txt", "no training cases (run 'x2recon manifest' on the dataset)")

    names = _class_names(root, classes, ds_classes, splits["train"], use_views)
    out = run / "yolo_data"
    counts = {split: _stage_split(root, out / split, ids, use_views, classes, names) for split, ids in splits.items()}
    val = "yolo_data/val/images" if counts["val"] else "yolo_data/train/images"
    test = "yolo_data/test/images" if counts["test"] else None
    write_dataset_yaml(run / "data.yaml", names, "yolo_data/train/images", val, run.resolve(), test=test)
    return {"classes": names, "views": use_views, "images": counts, "splits": {k: len(v) for k, v in splits.items()},
            "val_is_train": not counts["val"]}


def _boxes_of(root: Path, case: str, view: str) -> list:
    from ...drr.boxes import Box

    f = root / "cases" / case / "labels" / f"{view}.json"
    if not f.is_file():
        raise X2ReconInputError(f, "box file missing (the dataset predates per-structure box files?)")
    return [Box(**b) for b in json.loads(f.read_text())]


def _class_names(root: Path, classes: str, ds_classes: list[str], train_ids: list[str], views: list[str]) -> list[str]:
    """The detector's classes for ``classes`` mode: the dataset's, the paper's groups, or every structure
    boxed in the training cases (TotalSegmentator's order)."""
    from ...drr.boxes import class_names

    if classes == "dataset":
        return ds_classes
    if classes == "groups":
        return class_names("groups", [])
    from ...structures import totalseg_v2

    seen = set()
    for case in train_ids:
        for v in views:
            seen.update(b.name for b in _boxes_of(root, case, v))
    order = {n: i for i, n in enumerate(totalseg_v2().values())}
    names = sorted(seen, key=lambda n: order.get(n, 10**6))
    if not names:
        raise X2ReconInputError(root, "no boxes in the training cases' labels")
    return names


def _stage_split(root: Path, d: Path, ids: list[str], views: list[str], classes: str, names: list[str]) -> int:
    """Link one split's DRRs into ``d/images`` and write their YOLO labels into ``d/labels``; the image count."""
    from ...drr.boxes import yolo_rows
    from ...geometry import ProjectionGeometry

    if d.exists():
        shutil.rmtree(d)
    if not ids:
        return 0
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir(parents=True)
    n = 0
    for case in ids:
        cdir = root / "cases" / case
        if not (cdir / "meta.json").is_file():
            raise X2ReconInputError(cdir, "case listed in the splits is not built (no meta.json)")
        for v in views:
            img = cdir / "images" / f"{v}.png"
            if not img.is_file():
                raise X2ReconInputError(img, "DRR missing")
            stem = f"{case}__{v}"
            _link_or_copy(img.resolve(), d / "images" / f"{stem}.png")
            lbl = d / "labels" / f"{stem}.txt"
            if classes == "dataset":
                src = cdir / "labels" / f"{v}.txt"
                if not src.is_file():
                    raise X2ReconInputError(src, "YOLO label file missing")
                shutil.copyfile(src, lbl)
            else:
                geom = ProjectionGeometry.from_json(cdir / "images" / f"{v}.json")
                rows = yolo_rows(_boxes_of(root, case, v), names, geom)
                lbl.write_text("".join(f"{int(r[0])} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f} {r[4]:.6f}\n" for r in rows))
            n += 1
    return n


# ---------------------------------------------------------------------------------------- training
class _Stopped(Exception):
    """Raised from a callback after last.pt is saved, so ultralytics does not strip its optimizer."""


def _resolve_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        import torch

        return "0" if torch.cuda.is_available() else "cpu"
    d = str(device)
    return d.split(":", 1)[1] if d.startswith("cuda:") else ("0" if d == "cuda" else d)


@contextmanager
def _ultralytics_log_level(quiet: bool):
    log = logging.getLogger("ultralytics")
    old = log.level
    if quiet:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(old)


def _versions() -> dict:
    import importlib.metadata as md

    from ... import __version__

    out = {"x2recon": __version__}
    for p in ("ultralytics", "torch", "torchvision", "opencv-python", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except json.JSONDecodeError:
        return None


def train_detector(
    data_dir: str | Path,
    out_dir: str | Path,
    model: str = DEFAULT_MODEL,
    epochs: int = 100,
    imgsz: int = 512,
    batch: int = 16,
    device: str = "auto",
    workers: int = 2,
    resume: str | bool = "auto",
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    *,
    views: list[str] | None = None,
    classes: str = "dataset",
    patience: int = 100,
    seed: int = 0,
    fliplr: float | None = None,
    config_dir: str | Path | None = None,
    quiet: bool = False,
    yolo_args: dict | None = None,
) -> dict:
    """Train a YOLOv9 detector on a dataset's DRRs and boxes; returns (and writes) ``summary.json``.

    ``model``: a YOLOv9 yaml (``yolov9t.yaml`` … ``yolov9e.yaml``, built from scratch) or the user's
    own ``.pt`` to start from.  ``resume``: ``auto`` continues an unfinished run in ``out_dir`` (a
    finished one returns its summary), ``never`` starts over (deletes ``out_dir/train``), or a
    ``last.pt`` path.  ``cancel()`` is polled after every batch: the run then saves ``last.pt``
    (the interrupted epoch counts as done) and returns ``{"stopped": True, ...}``; call again to
    resume.  ``fliplr``: horizontal-flip probability (default 0.5, or 0 when a class is sided,
    e.g. ``rib_left_3``).  ``yolo_args``: further ultralytics training arguments (``lr0``,
    ``warmup_epochs``, ``mosaic``, ``cache``…; not the offline ones).  The summary holds ``mAP50`` and ``mAP50-95`` of the best weights on the
    held-out split: ``test`` if the dataset has one, else ``val`` (else ``train``, flagged).
    """
    import_ultralytics(config_dir)
    t_start = time.time()
    report = progress or (lambda f, m: None)
    root, run = Path(data_dir), Path(out_dir)
    run.mkdir(parents=True, exist_ok=True)
    last = run / "train" / "weights" / "last.pt"
    state = _open_run(run, resume)
    if state.get("status") == "finished":  # resume auto on a finished run: its summary
        report(1.0, "already finished")
        return state["summary"]
    if not (isinstance(model, str) and (model.endswith((".yaml", ".yml")) or Path(model).is_file())):
        raise X2ReconInputError(model, f"model must be a YOLOv9 yaml ({', '.join(YOLOV9_MODELS)}) or a local .pt file")
    resume_from = _resume_source(resume, last, state)
    if resume_from == last and state.get("classes_mode"):  # a resumed run keeps its own data choices
        classes, views = state["classes_mode"], state.get("views") or views
    report(0.0, "staging the dataset")
    staged = stage_dataset(root, run, views=views, classes=classes)
    if fliplr is None:
        fliplr = 0.0 if any(("left" in n or "right" in n) for n in staged["classes"]) else 0.5
    resumed = resume_from is not None
    callbacks = _Callbacks(run / "state.json", report, cancel, model=state.get("model", model) if resumed else model,
                           classes=classes, views=staged["views"], epochs=epochs,
                           prior_seconds=float(state.get("train_seconds", 0.0)) if resumed else 0.0)
    dev = _resolve_device(device)
    fit = dict(data=str(run / "data.yaml"), device=dev, workers=workers, batch=batch)
    fresh = dict(epochs=epochs, imgsz=imgsz, project=str(run.resolve()), name="train", exist_ok=True, seed=seed,
                 deterministic=True, patience=patience, fliplr=fliplr, verbose=not quiet, val=True,
                 **(yolo_args or {}))
    if not _fit(model, resume_from, callbacks, fit, fresh, quiet, report):
        st = _read_json(run / "state.json") or {}
        report(1.0, "stopped")
        return {"format": SUMMARY_FORMAT, "stopped": True, "epochs_completed": st.get("epoch"),
                "epochs": st.get("epochs"), "last": str(last), "out": str(run)}
    train_seconds = callbacks.seconds()
    evaluation = _evaluate_best(run, staged, imgsz, fit, quiet, report)
    summary = _finish(run, root, staged, evaluation, callbacks, classes=classes, imgsz=imgsz, batch=batch, dev=dev,
                      train_seconds=train_seconds, t_start=t_start)
    report(1.0, "done")
    return summary


def _open_run(run: Path, resume) -> dict:
    """The run's recorded state (``state.json``); ``resume == "never"`` clears the run first, and a
    finished run under ``resume == "auto"`` comes back as ``{"status": "finished", "summary": …}``."""
    state_path, summary_path = run / "state.json", run / "summary.json"
    if resume == "never" or resume is False:
        for p in (run / "train", state_path, summary_path, run / "detector.safetensors"):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return {}
    state = _read_json(state_path) or {}
    if (resume == "auto" or resume is True) and state.get("status") == "finished" and summary_path.is_file():
        s = json.loads(summary_path.read_text())
        s["already_finished"] = True
        return {"status": "finished", "summary": s}
    return state


def _resume_source(resume, last: Path, state: dict) -> Path | None:
    """The ultralytics ``last.pt`` to continue from: a path the caller named, or (``auto``) the run's own
    unfinished one; None for a fresh run."""
    if resume not in ("auto", "never", True, False, None, ""):
        resume_from = Path(resume)
        if not resume_from.is_file():
            raise X2ReconInputError(resume_from, "checkpoint to resume from not found")
        return resume_from
    if resume in ("auto", True) and last.is_file() and state.get("status") in ("running", "stopped"):
        return last
    return None


class _Callbacks:
    """ultralytics callbacks: progress per batch, ``cancel()`` polled per batch, ``state.json`` per saved
    epoch (raising ``_Stopped`` there when cancelled, before ultralytics strips ``last.pt``'s optimizer)."""

    def __init__(self, state_path: Path, report, cancel, *, model: str, classes: str, views: list, epochs: int,
                 prior_seconds: float):
        self.state_path, self.report, self.cancel = state_path, report, cancel
        self.model, self.classes, self.views, self.epochs = model, classes, views, epochs
        self.prior_seconds, self.t0 = prior_seconds, time.time()
        self.cancelled, self.batch, self.nb = False, 0, 1

    def seconds(self) -> float:
        """Training seconds of the run so far, earlier calls included."""
        return self.prior_seconds + time.time() - self.t0

    def attach(self, y) -> None:
        self.t0 = time.time()
        y.add_callback("on_pretrain_routine_start", self.on_pretrain)
        y.add_callback("on_train_epoch_start", self.on_epoch_start)
        y.add_callback("on_train_batch_end", self.on_batch_end)
        y.add_callback("on_model_save", self.on_model_save)

    def on_pretrain(self, trainer):
        strip_online_callbacks(trainer)
        self.epochs = trainer.epochs

    def on_epoch_start(self, trainer):
        self.batch = 0
        try:
            self.nb = max(1, len(trainer.train_loader))
        except TypeError:
            self.nb = 1

    def on_batch_end(self, trainer):
        self.batch += 1
        f = (trainer.epoch + min(1.0, self.batch / self.nb)) / max(1, trainer.epochs)
        self.report(0.95 * f, f"epoch {trainer.epoch + 1}/{trainer.epochs}")
        if self.cancel is not None and self.cancel():
            self.cancelled = True
            trainer.stop = True

    def on_model_save(self, trainer):
        m = trainer.metrics or {}
        rec = {"status": "stopped" if self.cancelled else "running", "epoch": int(trainer.epoch) + 1,
               "epochs": int(trainer.epochs), "mAP50(val)": float(m.get("metrics/mAP50(B)", float("nan"))),
               "mAP50-95(val)": float(m.get("metrics/mAP50-95(B)", float("nan"))), "model": self.model,
               "classes_mode": self.classes, "views": self.views,
               "train_seconds": self.seconds(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_text(self.state_path, json.dumps(rec, indent=1))
        if self.cancelled:
            raise _Stopped()


def _fit(model: str, resume_from: Path | None, callbacks: _Callbacks, fit: dict, fresh: dict, quiet: bool,
         report) -> bool:
    """ultralytics training, continued from ``resume_from`` or fresh; False when cancelled."""
    from ultralytics import YOLO

    with _ultralytics_log_level(quiet):
        try:
            if resume_from is not None:
                report(0.0, f"resuming from {resume_from}")
                y = YOLO(str(resume_from))
                callbacks.attach(y)
                y.train(resume=str(resume_from), **fit, **TRAIN_OVERRIDES)
            else:
                y = YOLO(model)
                callbacks.attach(y)
                y.train(**fit, **{**fresh, **TRAIN_OVERRIDES})
        except _Stopped:
            return False
    return True


def _evaluate_best(run: Path, staged: dict, imgsz: int, fit: dict, quiet: bool, report) -> dict:
    """The best weights on the held-out split (``test``, else ``val``, else ``train``): ultralytics'
    metrics, per-class mAP50-95, the weights used and the seconds it took."""
    from ultralytics import YOLO

    best = run / "train" / "weights" / "best.pt"
    if not best.is_file():
        best = run / "train" / "weights" / "last.pt"
    if not best.is_file():
        raise RuntimeError(f"{run}: ultralytics finished without writing weights")
    report(0.96, "evaluating on the held-out split")
    split = "test" if staged["images"]["test"] else ("val" if staged["images"]["val"] else "train")
    t1 = time.time()
    with _ultralytics_log_level(quiet):
        m = YOLO(str(best)).val(split=split, imgsz=_train_imgsz(run, imgsz), plots=False, verbose=not quiet,
                                project=str(run.resolve()), name="eval", exist_ok=True, **fit)
    maps = np.asarray(m.box.maps, float)
    present = {int(i) for i in np.asarray(getattr(m.box, "ap_class_index", []), int).ravel()}
    per_class = {n: {"mAP50-95": float(maps[i])} for i, n in enumerate(staged["classes"]) if i in present}
    return {"split": split, "box": m.box, "per_class": per_class, "best": best, "seconds": time.time() - t1}


def _finish(run: Path, root: Path, staged: dict, ev: dict, callbacks: _Callbacks, *, classes: str, imgsz: int,
            batch: int, dev: str, train_seconds: float, t_start: float) -> dict:
    """Export ``detector.safetensors``, write ``summary.json`` and mark the run finished in ``state.json``."""
    box, state_path = ev["box"], run / "state.json"
    st = _read_json(state_path) or {}
    weights = export_weights(ev["best"], run / "detector.safetensors", extra={
        "imgsz": _train_imgsz(run, imgsz), "classes_mode": classes, "views": staged["views"],
        "dataset": recorded_path(root), "eval": {"split": ev["split"], "mAP50": float(box.map50),
                                                 "mAP50-95": float(box.map)}})
    summary = {
        "format": SUMMARY_FORMAT, "stopped": False, "model": callbacks.model, "data": str(root.resolve()),
        "classes": staged["classes"], "classes_mode": classes, "views": staged["views"], "images": staged["images"],
        "cases": staged["splits"], "val_is_train": staged["val_is_train"],
        "epochs": st.get("epochs", callbacks.epochs), "epochs_completed": st.get("epoch"),
        "imgsz": _train_imgsz(run, imgsz), "batch": batch, "device": dev,
        "eval_split": ev["split"], "held_out": ev["split"] != "train",
        "mAP50": float(box.map50), "mAP50-95": float(box.map), "precision": float(box.mp), "recall": float(box.mr),
        "per_class": ev["per_class"], "weights": str(weights),
        "ultralytics_weights": {"best": str(run / "train" / "weights" / "best.pt"),
                                "last": str(run / "train" / "weights" / "last.pt")},
        "image_input": "16-bit DRR PNGs linked unchanged; ultralytics reads them as their high byte (v >> 8)",
        "seconds": {"train": round(train_seconds, 2), "eval": round(ev["seconds"], 2),
                    "total_this_call": round(time.time() - t_start, 2)},
        "offline": {"YOLO_OFFLINE": os.environ.get("YOLO_OFFLINE"), "YOLO_CONFIG_DIR": os.environ.get("YOLO_CONFIG_DIR"),
                    **TRAIN_OVERRIDES},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=1))
    st.update(status="finished", train_seconds=train_seconds, model=callbacks.model)
    atomic_write_text(state_path, json.dumps(st, indent=1))
    return summary


def _train_imgsz(run: Path, default: int) -> int:
    """The image size of the run's ultralytics args (a resumed run keeps its own)."""
    args = run / "train" / "args.yaml"
    if args.is_file():
        for line in args.read_text().splitlines():
            if line.startswith("imgsz:"):
                try:
                    return int(line.split(":", 1)[1].strip())
                except ValueError:
                    break
    return int(default)


# ------------------------------------------------------------------------------------ weights file
def export_weights(pt_path: str | Path, out_path: str | Path, extra: dict | None = None) -> Path:
    """An ultralytics checkpoint → ``.safetensors`` (float32 weights) + JSON config in its metadata:
    the model yaml, class names, stride, image size and ``extra``."""
    import_ultralytics()
    import torch
    from safetensors.torch import save_file
    from ultralytics.nn.tasks import load_checkpoint

    model, _ = load_checkpoint(str(pt_path))
    names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
    cfg = {
        "format": WEIGHTS_FORMAT,
        "network": "yolo",
        "model_yaml": model.yaml,
        "names": [names[i] for i in range(len(names))],
        "stride": [float(s) for s in torch.as_tensor(model.stride).flatten()],
        "source": recorded_path(pt_path),
        "versions": _versions(),
        **(extra or {}),
    }
    tensors = {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.detach().contiguous().clone()
               for k, v in model.state_dict().items()}
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"x2recon": json.dumps(cfg)})
    os.replace(tmp, out_path)
    return out_path


def read_detector_config(path: str | Path) -> dict:
    """The JSON config of a ``detector.safetensors`` (no tensors loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise X2ReconInputError(path, "detector weights not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise X2ReconInputError(path, f"not a safetensors file ({e})") from None
    try:
        cfg = json.loads(meta["x2recon"])
    except (KeyError, json.JSONDecodeError):
        raise X2ReconInputError(path, "no x2recon config in the file's metadata") from None
    if cfg.get("format") != WEIGHTS_FORMAT:
        raise X2ReconInputError(path, f"not an x2recon detector (format {cfg.get('format')!r}, expected {WEIGHTS_FORMAT!r}); "
                                      "is it an X2B/SPIDER checkpoint?")
    return cfg


# --------------------------------------------------------------------------------------- inference
class Detector:
    """A trained detector: ``Detector("RUN/detector.safetensors").detect(image) -> list[Detection]``.

    ``image``: an X-ray display image (float in [0, 1], uint16 or uint8, or an ``XRay``) of any
    size; boxes come back in its pixel grid (see ``x2recon.x2br.detection.detections``).
    """

    def __init__(self, weights: str | Path, device: str = "cpu", imgsz: int | None = None,
                 config_dir: str | Path | None = None):
        import_ultralytics(config_dir)
        import torch

        self.path = Path(weights)
        if not self.path.is_file():
            raise X2ReconInputError(self.path, "detector weights not found")
        self.device = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else
                                   (device if device not in ("auto", "cuda") else "cpu"))
        if self.path.suffix.lower() == ".pt":
            from ultralytics.nn.tasks import load_checkpoint

            model, ckpt = load_checkpoint(str(self.path))
            names = model.names if isinstance(model.names, dict) else dict(enumerate(model.names))
            self.names = [names[i] for i in range(len(names))]
            self.config = {"format": "ultralytics", "imgsz": int((ckpt.get("train_args") or {}).get("imgsz", 640))}
        else:
            from safetensors.torch import load_file
            from ultralytics.nn.tasks import DetectionModel

            self.config = read_detector_config(self.path)
            self.names = list(self.config["names"])
            model = DetectionModel(cfg=self.config["model_yaml"], ch=3, nc=len(self.names), verbose=False)
            sd = load_file(str(self.path))
            missing, unexpected = model.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise X2ReconInputError(self.path, f"weights do not fit the stored model yaml: {len(missing)} missing "
                                                   f"({missing[:3]}…), {len(unexpected)} unexpected ({unexpected[:3]}…)")
            model.stride = torch.tensor(self.config.get("stride", [8.0, 16.0, 32.0]))
        self.model = model.float().eval().to(self.device)
        self.stride = int(max(float(s) for s in torch.as_tensor(self.model.stride).flatten()))
        self.imgsz = int(imgsz or self.config.get("imgsz", 640))

    def _prepare(self, img8: np.ndarray):
        """Resize the long side to ``imgsz`` (as ultralytics' loader does) and pad to the stride."""
        import cv2
        import torch

        H, W = img8.shape
        r = self.imgsz / max(H, W)
        if r != 1:
            w2, h2 = min(math.ceil(W * r), self.imgsz), min(math.ceil(H * r), self.imgsz)
            im = cv2.resize(img8, (w2, h2), interpolation=cv2.INTER_LINEAR)
        else:
            im, w2, h2 = img8, W, H
        Hp, Wp = math.ceil(h2 / self.stride) * self.stride, math.ceil(w2 / self.stride) * self.stride
        top, left = (Hp - h2) // 2, (Wp - w2) // 2
        canvas = np.full((Hp, Wp), 114, np.uint8)
        canvas[top:top + h2, left:left + w2] = im
        x = torch.from_numpy(canvas).to(self.device).float().div_(255.0)
        x = x[None, None].expand(1, 3, Hp, Wp).contiguous()
        return x, (W / w2, H / h2), (left, top)

    def detect(self, image, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list[Detection]:
        """Detections with ``confidence ≥ conf`` (class-wise NMS at ``iou``), best first."""
        import torch

        try:
            from ultralytics.utils.nms import non_max_suppression
        except ImportError:  # ultralytics < 8.3.160 kept it in ops
            from ultralytics.utils.ops import non_max_suppression

        img8 = to_uint8(image)
        H, W = img8.shape
        x, (sx, sy), (left, top) = self._prepare(img8)
        with torch.inference_mode():
            pred = self.model(x)
        pred = pred[0] if isinstance(pred, (list, tuple)) else pred
        out = non_max_suppression(pred, conf_thres=conf, iou_thres=iou, max_det=max_det, nc=len(self.names))[0]
        out = out.float().cpu().numpy()
        dets = []
        for x0, y0, x1, y1, c, k in out[:, :6]:
            # network pixels (edge-based, padded) → X-ray pixels (centre-based), clipped to the image
            bx0 = float(np.clip((x0 - left) * sx - 0.5, -0.5, W - 0.5))
            bx1 = float(np.clip((x1 - left) * sx - 0.5, -0.5, W - 0.5))
            by0 = float(np.clip((y0 - top) * sy - 0.5, -0.5, H - 0.5))
            by1 = float(np.clip((y1 - top) * sy - 0.5, -0.5, H - 0.5))
            if bx1 <= bx0 or by1 <= by0:
                continue
            dets.append(Detection(self.names[int(k)], float(c), bx0, by0, bx1, by1, int(k)))
        dets.sort(key=lambda d: -d.confidence)
        return dets
