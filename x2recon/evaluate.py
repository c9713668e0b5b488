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

from .errors import CancelledError
from .io.atomic import atomic_write_text

COLUMNS = ["iou", "iou_vox", "chamfer_l1", "fscore", "normal_consistency", "maxe", "maye", "maze"]
LABELS = {"iou": "IoU ↑", "iou_vox": "IoU(vox) ↑", "chamfer_l1": "Chamfer-L1 ↓", "fscore": "F-score@0.02 ↑",
          "normal_consistency": "NC ↑", "maxe": "maxe (mm) ↓", "maye": "maye (mm) ↓", "maze": "maze (mm) ↓"}


def evaluation_items(root: Path, split: str, kind: str, views: list[str] | None, model_views: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(case id, views) pairs: every wanted view of each case (X2B) or its frontal+lateral pair (X2B2)."""
    from .dataset.torch_data import case_info, read_split, views_for

    items = []
    for cid in read_split(root, split):
        c = case_info(root, cid)
        if kind == "x2b2":
            items.append((cid, tuple(views_for("x2b2", c.views, model_views, cid))))
        else:
            pool = views_for("x2b", c.views, [v.upper() for v in (views or model_views or [])], cid)
            items += [(cid, (v,)) for v in pool]
    return items


def evaluate_model(model_path: str | Path, data: str | Path, *, split: str = "test", views: list[str] | None = None,
                   resolution: int = 128, device: str = "auto", n_points: int = 100_000, out_csv: str | Path | None = None,
                   mesh_dir: str | Path | None = None, progress: bool = True,
                   cancel: Callable[[], bool] | None = None) -> list[dict]:
    """One row per reconstruction (case, view(s), metrics, seconds); written to ``out_csv`` as it goes."""
    from .dataset.torch_data import load_view
    from .io.mesh import read_mesh, write_mesh
    from .metrics.mesh import iou_voxels, mesh_metrics
    from .models.checkpoint import load_model
    from .reconstruct import reconstruct, resolve_device

    root = Path(data)
    dev = resolve_device(device)
    model, cfg = load_model(model_path, dev, network=("x2b", "x2b2"))
    mc = model.cfg
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
        m = mesh_metrics(rec.mesh, gt, n_points=n_points, scale=box).to_dict()
        lo, hi = rec.geometry.box_bounds()
        joint = np.array([np.maximum(np.minimum(rec.mesh.bounds[0], gt.bounds[0]), lo),
                          np.minimum(np.maximum(rec.mesh.bounds[1], gt.bounds[1]), hi)])
        m["iou_vox"] = iou_voxels(rec.mesh, gt, resolution=128, bounds=joint)
        row = {"case": cid, "view": "+".join(vs), **m, "seconds": rec.seconds, "faces": len(rec.mesh.faces)}
        rows.append(row)
        if mesh_dir is not None:
            write_mesh(rec.mesh, Path(mesh_dir) / f"{cid}_{'+'.join(vs)}.ply")
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
    keys = list(rows[0])
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
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
    """The paper's layout: Table 1 (IoU, Chamfer-L1, F-score, NC) and Table 2 (maxe, maye, maze), mean ± std."""
    def fmt(col, digits):
        m, s = mean_std(r[col] for r in rows)
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    t1 = ["iou", "iou_vox", "chamfer_l1", "fscore", "normal_consistency"]
    t2 = ["maxe", "maye", "maze"]
    digits = {"chamfer_l1": 4}
    lines = [f"{len(rows)} reconstructions", "",
             "Table 1 — " + " | ".join(["method"] + [LABELS[c] for c in t1]),
             " | ".join([method] + [fmt(c, digits.get(c, 3)) for c in t1]), "",
             "Table 2 — " + " | ".join(["method"] + [LABELS[c] for c in t2]),
             " | ".join([method] + [fmt(c, 2) for c in t2])]
    return "\n".join(lines)
