"""Evaluate a bone model on a dataset split: reconstruct every (case, view) and score the mesh against
the case's ground-truth bone mesh (X2BR Tables 1/2, 4/5) in both protocols of ``metrics.protocol``:

* paper — each ground truth centred and scaled so its longest bounding-box edge is 1, the prediction
  moved with it (X2BR §4.3, Occupancy Networks); IoU on 100k points in the 1.1× unit box, voxel IoU
  on its 32³ grid with the voxels the surface crosses occupied, Chamfer-L1 / F-score@0.02 / NC in
  those units — the figures that compare with the papers' tables;
* world — ours, in mm where the bones are; both IoUs on the joint bounding box inside the
  reconstruction box, F-score at 0.02 × the box edge (7.68 mm for 384 mm).

maxe/maye/maze (after ICP) are in mm.  The ground truth is cut to the reconstruction box (what the
network can predict; ``dataset.box_coverage``) in both; the tables say so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from ..errors import CancelledError, X2ReconInputError
from ..metrics.report import mean_std, write_csv  # noqa: F401  (write_csv: also the CLI's)

if TYPE_CHECKING:
    from ..dataset.model_fit import ModelFit

PAPER_LABELS = {"iou": "IoU ↑", "iou_vox": "IoU(vox 32³) ↑", "chamfer_l1": "Chamfer-L1 ↓", "fscore": "F-score@0.02 ↑",
                "normal_consistency": "NC ↑"}
WORLD_LABELS = {"iou": "IoU ↑", "iou_vox": "IoU(vox 64³) ↑", "chamfer_l1": "Chamfer-L1 (mm) ↓",
                "fscore": "F-score@{tau} mm ↑", "normal_consistency": "NC ↑", "volume_ratio": "volume pred/true"}
AXIS_LABELS = {"maxe": "maxe (mm) ↓", "maye": "maye (mm) ↓", "maze": "maze (mm) ↓"}
#: The metric columns of a row (CSV): each protocol's, prefixed, then the per-axis errors (mm).
COLUMNS = [f"{p}_{c}" for p in ("paper", "world") for c in PAPER_LABELS] + ["world_volume_ratio"] + list(AXIS_LABELS)


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


class Refiner(Protocol):
    """Refines a reconstruction into a row of its own: ``label`` is the row's method, ``name`` ends the
    refined mesh's file name; the call raises ``X2ReconInputError`` where it cannot refine a case."""
    name: str
    label: str

    def __call__(self, mesh, xrays: list, folder: Path, views: tuple[str, ...]) -> tuple[object, float]:
        """(refined mesh, seconds the refinement took)"""


def evaluate_model(model_path: str | Path, data: str | Path, *, split: str = "test", views: list[str] | None = None,
                   resolution: int = 128, device: str = "auto", n_points: int = 100_000, out_csv: str | Path | None = None,
                   mesh_dir: str | Path | None = None, progress: bool = True,
                   cancel: Callable[[], bool] | None = None, refiners: list[Refiner] = (),
                   fit: "ModelFit | None" = None, threshold: float | None = None) -> list[dict]:
    """One row per reconstruction (case, view(s), method, metrics, seconds, whether the model was trained on
    the case); written to ``out_csv`` as it goes.

    ``refiners`` each add a row after every X2B row — X2BR's registrations (``x2br.evaluate.template_refiners``,
    paper Tables 1–3).  ``fit``: the model checked against the split (``dataset.model_fit.check_fit``); by
    default it is checked here, before any work, and a mismatch of structures or geometry is an error.
    ``threshold``: the surface τ of every reconstruction (None: the model's)."""
    from ..dataset.model_fit import NOT_RECORDED, check_fit
    from ..dataset.torch_data import load_view, read_split
    from ..nn.checkpoint import load_model, read_config
    from .reconstruct import reconstruct, resolve_device

    root = Path(data)
    if fit is None:
        fit = check_fit(read_config(model_path), root, read_split(root, split))
    dev = resolve_device(device)
    model, cfg = load_model(model_path, dev, network=("x2b", "x2b2"))
    mc = model.cfg
    items = evaluation_items(root, split, mc.kind, views, mc.views)
    rows: list[dict] = []
    bar = _progress_bar(len(items), split) if progress else None
    scorer = _Scorer(n_points)
    for cid, vs in items:
        if cancel is not None and cancel():
            raise CancelledError("evaluation cancelled")
        folder = root / "cases" / cid
        xrays = [load_view(folder, v, mc.image_size) for v in vs]
        rec = reconstruct(model, xrays, resolution=resolution, threshold=threshold, device=dev)
        row = scorer(folder, vs, rec, rec.mesh, cfg["network"].upper(), rec.seconds)
        _write_mesh(mesh_dir, rec.mesh, f"{cid}_{'+'.join(vs)}")
        for r in [row] + [_refined_row(scorer, refiner, folder, vs, rec, xrays, mesh_dir) for refiner in refiners]:
            rows.append({**r, "seen_in_training": fit.seen.get(cid, NOT_RECORDED)})
        if out_csv is not None:
            write_csv(rows, out_csv)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(iou=f"{row['paper_iou']:.3f}", cd=f"{row['paper_chamfer_l1']:.4f}")
    if bar is not None:
        bar.close()
    return rows


def _progress_bar(total: int, split: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"evaluate {split}", unit="recon", dynamic_ncols=True)


def _write_mesh(mesh_dir, mesh, stem: str) -> None:
    if mesh_dir is not None:
        from ..io.mesh import write_mesh

        write_mesh(mesh, Path(mesh_dir) / f"{stem}.ply")


class _Scorer:
    """Scores meshes in both protocols against their case's ground-truth bone mesh cut to the reconstruction
    box, read once per case (items come case by case)."""

    def __init__(self, n_points: int):
        self.n_points, self.case, self.gt = n_points, None, None

    def __call__(self, folder: Path, vs, rec, mesh, method: str, seconds: float) -> dict:
        from ..io.mesh import read_mesh
        from ..metrics.protocol import WORLD_TAU_OF_BOX, Solid, flat_row, score

        box = rec.geometry.box_bounds()
        if self.case != folder:
            path = folder / "meshes" / "bones.ply"
            self.gt, self.case = Solid.clipped(read_mesh(path), *box, name=str(path)), folder
        res = score(mesh, self.gt, n_points=self.n_points, box=box, tau_mm=WORLD_TAU_OF_BOX * rec.geometry.box_size,
                    names=(f"{method} reconstruction of {folder.name} ({'+'.join(vs)})", str(self.gt.name)))
        return {"case": folder.name, "view": "+".join(vs), "method": method, **flat_row(res), "seconds": seconds,
                "faces": len(mesh.faces)}


def _refined_row(scorer: _Scorer, refiner: Refiner, folder: Path, vs, rec, xrays, mesh_dir) -> dict:
    """The refiner's row; where it cannot refine the case (e.g. no detections), a NaN row that says why."""
    try:
        mesh, seconds = refiner(rec.mesh, xrays, folder, vs)
    except X2ReconInputError as e:
        return {"case": folder.name, "view": "+".join(vs), "method": refiner.label,
                **{c: float("nan") for c in COLUMNS}, "seconds": float("nan"), "faces": 0, "note": str(e)}
    _write_mesh(mesh_dir, mesh, f"{folder.name}_{'+'.join(vs)}_{refiner.name}")
    return scorer(folder, vs, rec, mesh, refiner.label, rec.seconds + seconds)


def summary_table(rows: list[dict], method: str = "X2B", note: str = "") -> str:
    """The paper's layout, once per protocol, each table titled with its protocol and n: Table 1 (IoU,
    IoU(vox), Chamfer-L1, F-score, NC) in the paper's and the world protocol, Table 2 (maxe, maye, maze
    in mm), and Table 3 (the registration methods, paper protocol) when X2BR rows are there; every
    line is mean ± std over its n reconstructions (rows where a method failed are not counted).
    ``note`` (``ModelFit.title()``: a mismatch warning, how many cases were seen in training) ends every
    title."""
    methods = list(dict.fromkeys(r.get("method", method) for r in rows)) or [method]
    by = {m: [r for r in rows if r.get("method", method) == m and not _nan(r.get("paper_iou"))] for m in methods}
    cases = {m: len({r["case"] for r in rs}) for m, rs in by.items()}
    clipped = sum(1 for r in rows if str(r.get("gt_clipped")) == "True")
    gt_note = f"GT clipped to the box ({clipped} of {len(rows)} cut)"
    n_all = ", ".join(f"{m}: n = {len(by[m])} reconstructions of {cases[m]} cases" for m in methods)
    n_title = f"n = {len({r['case'] for r in rows})} cases, {gt_note}" + (f"; {note}" if note else "")
    taus = sorted({float(r["world_fscore_tau"]) for rs in by.values() for r in rs if "world_fscore_tau" in r})
    world = {**WORLD_LABELS, "fscore": WORLD_LABELS["fscore"].format(tau="/".join(f"{t:g}" for t in taus) or "?")}

    def line(m, cols, digits=3):
        return " | ".join([m, str(len(by[m]))] + [_fmt(by[m], c, 4 if "chamfer" in c else digits) for c in cols])

    def table(title, labels, prefix, subset):
        head = " | ".join(["method", "n"] + list(labels.values()))
        return ["", f"{title} — {head}"] + [line(m, [prefix + c for c in labels]) for m in subset]

    lines = [n_all]
    lines += table(f"Table 1, paper protocol (GT centred, longest edge 1; X2BR §4.3), {n_title}",
                   PAPER_LABELS, "paper_", methods)
    lines += table(f"Table 1, world protocol (mm, ours), {n_title}", world, "world_", methods)
    lines += ["", f"Table 2, both protocols (mm after ICP), {n_title} — "
              + " | ".join(["method", "n"] + list(AXIS_LABELS.values()))]
    lines += [line(m, list(AXIS_LABELS), 2) for m in methods]
    refined = [m for m in methods if m.startswith("X2BR")]
    if refined:  # the paper's Table 3: the registration methods compared on Table 1's metrics
        t3 = {k: PAPER_LABELS[k] for k in ("iou", "chamfer_l1", "fscore", "normal_consistency")}
        lines += table(f"Table 3, paper protocol, {n_title}", t3, "paper_", refined)
    return "\n".join(lines)


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(rows: list[dict], col: str, digits: int) -> str:
    m, s = mean_std(r.get(col) for r in rows)
    return f"{m:.{digits}f} ± {s:.{digits}f}"
