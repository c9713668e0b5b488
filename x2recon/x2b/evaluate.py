"""Evaluate a bone model on a dataset split: reconstruct every (case, view) and score the mesh against
the case's ground-truth bone mesh with the papers' metrics (X2BR Tables 1/2, 4/5).

Chamfer-L1 and F-score@0.02 are in normalised units (distances ÷ the reconstruction box edge, as
the paper normalises), per-axis errors after ICP (maxe/maye/maze) in mm.  IoU is Occupancy
Networks' (uniform points in the joint bounding box) and, as the paper's "voxelized IoU", on a
128³ grid over the same box.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CancelledError, X2ReconInputError
from ..io.atomic import atomic_write_text

COLUMNS = ["iou", "iou_vox", "chamfer_l1", "fscore", "normal_consistency", "maxe", "maye", "maze"]
LABELS = {"iou": "IoU ↑", "iou_vox": "IoU(vox) ↑", "chamfer_l1": "Chamfer-L1 ↓", "fscore": "F-score@0.02 ↑",
          "normal_consistency": "NC ↑", "maxe": "maxe (mm) ↓", "maye": "maye (mm) ↓", "maze": "maze (mm) ↓"}


def evaluation_items(root: Path, split: str, kind: str, views: list[str] | None, model_views: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(case id, views) pairs: every wanted view of each case (X2B) or its frontal+lateral pair (X2B2)."""
    from ..dataset.torch_data import case_info, read_split, views_for

    items = []
    for cid in read_split(root, split):
        c = case_info(root, cid)
        if kind == "x2b2":
            items.append((cid, tuple(views_for("x2b2", c.views, model_views, cid))))
        else:
            pool = views_for("x2b", c.views, [v.upper() for v in (views or model_views or [])], cid)
            items += [(cid, (v,)) for v in pool]
    return items


#: ``refine["detector"]`` value that uses each case's ground-truth boxes (projected from its segmentation)
#: instead of a detector: X2BR's registration scored on its own (Table 3), free of detection errors.
GROUND_TRUTH = "ground-truth"


def ground_truth_detections(case_folder: Path, view: str, size: tuple[int, int] | None = None) -> list:
    """The case's boxes of ``view`` (``labels/<view>.json``, in the full DRR's pixels) as detections of the
    paper's group classes, rescaled to an image of ``size`` (W, H) — e.g. the network's input."""
    import json

    from ..x2br.detection.detections import detections_from_boxes
    from ..drr.boxes import Box
    from ..geometry import ProjectionGeometry

    boxes = [Box(**b) for b in json.loads((case_folder / "labels" / f"{view}.json").read_text())]
    dets = detections_from_boxes(boxes, "groups")
    if size is None:
        return dets
    W0, H0 = ProjectionGeometry.from_json(case_folder / "images" / f"{view}.json").size
    sx, sy = size[0] / W0, size[1] / H0
    fx = lambda c: (c + 0.5) * sx - 0.5  # pixel centres at integers (ProjectionGeometry's convention)
    fy = lambda r: (r + 0.5) * sy - 0.5
    return [type(d)(d.name, d.confidence, fx(d.x0), fy(d.y0), fx(d.x1), fy(d.y1), d.class_id) for d in dets]


def evaluate_model(model_path: str | Path, data: str | Path, *, split: str = "test", views: list[str] | None = None,
                   resolution: int = 128, device: str = "auto", n_points: int = 100_000, out_csv: str | Path | None = None,
                   mesh_dir: str | Path | None = None, progress: bool = True,
                   cancel: Callable[[], bool] | None = None, refine: dict | None = None) -> list[dict]:
    """One row per reconstruction (case, view(s), method, metrics, seconds); written to ``out_csv`` as it goes.

    ``refine``: X2BR as well — ``{"detector": weights, "templates": folder, "methods": ["gbcpd", "cpd"]}``
    adds one row per registration method after each X2B row (paper Tables 1–3)."""
    from ..dataset.torch_data import load_view
    from ..io.mesh import read_mesh, write_mesh
    from ..metrics.mesh import iou_voxels, mesh_metrics
    from ..nn.checkpoint import load_model
    from .reconstruct import reconstruct, resolve_device

    root = Path(data)
    dev = resolve_device(device)
    model, cfg = load_model(model_path, dev, network=("x2b", "x2b2"))
    mc = model.cfg
    detector = library = None
    if refine:
        from ..x2br.template import load_library

        library = load_library(refine["templates"])
        if str(refine["detector"]) != GROUND_TRUTH:
            from ..x2br.detection import Detector

            detector = Detector(refine["detector"])
    items = evaluation_items(root, split, mc.kind, views, mc.views)
    rows: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"evaluate {split}", unit="recon", dynamic_ncols=True)
    gt, gt_case = None, None  # items come case by case: read each ground truth once
    for cid, vs in items:
        if cancel is not None and cancel():
            raise CancelledError("evaluation cancelled")
        folder = root / "cases" / cid
        xrays = [load_view(folder, v, mc.image_size) for v in vs]
        rec = reconstruct(model, xrays, resolution=resolution, device=dev)
        if gt_case != cid:
            gt, gt_case = read_mesh(folder / "meshes" / "bones.ply"), cid
        box = rec.geometry.box_size
        lo, hi = rec.geometry.box_bounds()

        def score(mesh, method: str, seconds: float) -> dict:
            m = mesh_metrics(mesh, gt, n_points=n_points, scale=box).to_dict()
            joint = np.array([np.maximum(np.minimum(mesh.bounds[0], gt.bounds[0]), lo),
                              np.minimum(np.maximum(mesh.bounds[1], gt.bounds[1]), hi)])
            m["iou_vox"] = iou_voxels(mesh, gt, resolution=128, bounds=joint)
            return {"case": cid, "view": "+".join(vs), "method": method, **m, "seconds": seconds,
                    "faces": len(mesh.faces)}

        row = score(rec.mesh, cfg["network"].upper(), rec.seconds)
        rows.append(row)
        if mesh_dir is not None:
            write_mesh(rec.mesh, Path(mesh_dir) / f"{cid}_{'+'.join(vs)}.ply")
        for method in (refine or {}).get("methods", []):
            from ..x2br.refine import refine_with_template

            dets = detector if detector is not None else \
                ground_truth_detections(folder, vs[0], tuple(xrays[0].image.shape[::-1]))
            try:
                res = refine_with_template(rec.mesh, xrays[0], dets, library, method=method,
                                           device=str(dev), cancel=cancel)
            except X2ReconInputError as e:  # no detections: the case has no X2BR row, and says why
                rows.append({"case": cid, "view": "+".join(vs), "method": f"X2BR ({method.upper()})",
                             **{c: float("nan") for c in COLUMNS}, "seconds": float("nan"), "faces": 0,
                             "note": str(e)})
                continue
            rows.append(score(res.mesh, f"X2BR ({method.upper()})", rec.seconds + sum(res.seconds.values())))
            if mesh_dir is not None:
                write_mesh(res.mesh, Path(mesh_dir) / f"{cid}_{'+'.join(vs)}_x2br_{method}.ply")
        if out_csv is not None:
            write_csv(rows, out_csv)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(iou=f"{row['iou']:.3f}", cd=f"{row['chamfer_l1']:.4f}")
    if bar is not None:
        bar.close()
    return rows


def write_csv(rows: list[dict], path: str | Path) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))  # rows may differ (a note where X2BR failed)
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, restval="")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def mean_std(values) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))], float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summary_table(rows: list[dict], method: str = "X2B") -> str:
    """The paper's layout: Table 1 (IoU, Chamfer-L1, F-score, NC) and Table 2 (maxe, maye, maze), mean ± std,
    one line per method (X2B, and X2BR with each registration method: Table 3)."""
    methods = list(dict.fromkeys(r.get("method", method) for r in rows)) or [method]

    def fmt(rs, col, digits):
        m, s = mean_std(r[col] for r in rs)
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    t1 = ["iou", "iou_vox", "chamfer_l1", "fscore", "normal_consistency"]
    t2 = ["maxe", "maye", "maze"]
    digits = {"chamfer_l1": 4}
    by = {m: [r for r in rows if r.get("method", method) == m] for m in methods}
    n = {m: sum(1 for r in rs if not math.isnan(r["iou"])) for m, rs in by.items()}
    lines = [", ".join(f"{m}: {n[m]} reconstructions" for m in methods), "",
             "Table 1 — " + " | ".join(["method"] + [LABELS[c] for c in t1])]
    lines += [" | ".join([m] + [fmt(by[m], c, digits.get(c, 3)) for c in t1]) for m in methods]
    lines += ["", "Table 2 — " + " | ".join(["method"] + [LABELS[c] for c in t2])]
    lines += [" | ".join([m] + [fmt(by[m], c, 2) for c in t2]) for m in methods]
    return "\n".join(lines)
