"""Evaluate a SPIDER model on a dataset split: reconstruct each case's CT and labelmap from its
frontal + lateral DRRs and score them against the case's SPIDER targets (spider-paper Tables 1–3):
PSNR and SSIM over the HU window of the model, Dice, HD95 and Chamfer distance (mm) per class.

A class the model misses (nothing predicted where the ground truth has it) is counted, never dropped:
each row says which classes it missed (``missed:<class>``; ``spurious:<class>`` for the reverse), and
HD95 and CD of a class present in only one of the two labelmaps are scored as the reconstruction
box's diagonal (``penalty_mm``, 665 mm for the 384 mm box: no two points of the box are further
apart), so they weigh in every mean.  Every mean ± std says how many values it averages.

The paper's Table 2 scores a TotalSegmentator run over the reconstructed CT; here the class scores
are of SPIDER's own segmentation head (which the paper's §6.1 also uses).  Both ends are on the
case's target grid, so the evaluation resolution is the dataset's ``spider_grid``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import CancelledError
from ..metrics.report import mean_std, write_csv

if TYPE_CHECKING:
    from ..dataset.model_fit import ModelFit


def evaluate_spider(model_path: str | Path, data: str | Path, *, split: str = "test", device: str = "auto",
                    chunk: int = 1 << 18, out_csv: str | Path | None = None, volume_dir: str | Path | None = None,
                    progress: bool = True, cancel: Callable[[], bool] | None = None,
                    fit: "ModelFit | None" = None) -> list[dict]:
    """One row per case: psnr, ssim, mean dice/hd95/chamfer, per-class ``dice:<class>`` etc., and whether the
    model was trained on the case.  ``fit``: the model checked against the split (``dataset.model_fit``); by
    default it is checked here, before any work: a class with no structure in the data, or (unless allowed) a
    geometry mismatch, is an error."""
    import time

    from ..dataset.model_fit import NOT_RECORDED, check_fit
    from ..dataset.spider_data import SpiderDataset
    from ..dataset.spider_targets import box_grid
    from ..dataset.torch_data import read_split
    from ..io.volume import write_volume
    from ..metrics.volume import volume_metrics
    from ..nn.checkpoint import load_model, read_config
    from ..nn.device import resolve_device
    from .inference import predict_grid

    if fit is None:
        fit = check_fit(read_config(model_path), Path(data), read_split(data, split))
    dev = resolve_device(device)
    model, cfg = load_model(model_path, dev, network="spider")
    mc = model.cfg
    ds = SpiderDataset(data, split, views=mc.views, classes=mc.classes, image_size=mc.image_size,
                       hu_range=(mc.hu_min, mc.hu_max), augment=False)
    labels = {c: k + 1 for k, c in enumerate(mc.classes)} if mc.n_classes else None
    rows = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(ds), desc=f"evaluate {split}", unit="case", dynamic_ncols=True)
    for i, case in enumerate(ds.cases):
        if cancel is not None and cancel():
            raise CancelledError("evaluation cancelled")
        t = time.perf_counter()
        images, grid = ds.pair(i)
        ct, cls = ds.targets(i)
        n = ct.shape[0]
        inten, lab = predict_grid(model, images, grid, n, chunk=chunk)
        seconds = time.perf_counter() - t
        hu = np.rint(mc.unit_to_hu(inten.cpu().numpy().astype(np.float64)))
        h = case.box_size / n
        penalty = miss_penalty(case.box_size)
        m = volume_metrics(hu, ct, lab.cpu().numpy() if lab is not None else None, cls if lab is not None else None,
                           spacing=(h, h, h), labels=labels, hu_window=(mc.hu_min, mc.hu_max), empty_penalty=penalty)
        row = {"case": case.case_id, "psnr": m.psnr, "ssim": m.ssim, "dice": m.mean_dice, "hd95": m.mean_hd95,
               "chamfer": m.mean_chamfer, "seconds": seconds, "penalty_mm": penalty,
               "seen_in_training": fit.seen.get(case.case_id, NOT_RECORDED)}
        for c in mc.classes if labels else []:
            row[f"dice:{c}"] = m.dice.get(c, np.nan)
            row[f"hd95:{c}"] = m.hd95.get(c, np.nan)
            row[f"chamfer:{c}"] = m.chamfer.get(c, np.nan)
            row[f"missed:{c}"] = int(m.missing.get(c) == "pred")
            row[f"spurious:{c}"] = int(m.missing.get(c) == "gt")
        rows.append(row)
        if volume_dir is not None:
            iso = np.asarray(case.isocenter, float)
            v = box_grid(iso, case.box_size, n, np.int16)
            v.array = np.clip(hu, -32768, 32767).astype(np.int16)
            write_volume(v, Path(volume_dir) / f"{case.case_id}_ct.nii.gz")
            if lab is not None:
                v = box_grid(iso, case.box_size, n, np.uint8)
                v.array = lab.cpu().numpy()
                write_volume(v, Path(volume_dir) / f"{case.case_id}_labels.nii.gz")
        if out_csv is not None:
            write_csv(rows, out_csv)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(psnr=f"{row['psnr']:.2f}", dice=f"{row['dice']:.3f}")
    if bar is not None:
        bar.close()
    return rows


def miss_penalty(box_size: float) -> float:
    """HD95/CD (mm) given to a class present in only one labelmap: the box diagonal, √3 × its edge."""
    return float(np.sqrt(3.0) * box_size)


def spider_tables(rows: list[dict], method: str = "SPIDER", note: str = "") -> str:
    """Table 1 layout (PSNR dB, SSIM %, Dice %, HD95 mm, CD mm; mean ± std over cases) and Table 2
    (per class: cases that missed it, Dice %, HD95, CD, and their average); n beside every mean ± std.
    ``note`` (``ModelFit.title()``: a mismatch warning, how many cases were seen in training) ends the
    first line and every table title."""
    def f(key, scale=1.0, digits=2, rs=rows):
        vals = [r.get(key) for r in rs]
        m, s = mean_std(vals)
        n = sum(1 for v in vals if v is not None and np.isfinite(float(v)))
        return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f} (n={n})"

    penalties = sorted({float(r["penalty_mm"]) for r in rows if "penalty_mm" in r})
    penalty = (f"HD95/CD of a class present in only one labelmap = the box diagonal, "
               f"{'/'.join(f'{p:.0f}' for p in penalties)} mm") if penalties else ""
    fit = f" ({note})" if note else ""
    lines = [f"{method}: n = {len(rows)} cases" + "".join(f"; {x}" for x in (note, penalty) if x), "",
             f"Table 1{fit} — method | PSNR (dB) ↑ | SSIM (%) ↑ | Dice (%) ↑ | HD95 (mm) ↓ | CD (mm) ↓",
             " | ".join([method, f("psnr"), f("ssim", 100), f("dice", 100), f("hd95"), f("chamfer")])]
    classes = [k.split(":", 1)[1] for k in (rows[0] if rows else {}) if k.startswith("dice:")]
    if classes:
        lines += ["", f"Table 2{fit} — structure | missed (cases) | Dice (%) ↑ | HD95 (mm) ↓ | CD (mm) ↓  ({method})"]
        for c in classes:
            missed = sum(int(r.get(f"missed:{c}", 0) or 0) for r in rows)
            lines.append(" | ".join([c, f"{missed}/{len(rows)}", f(f"dice:{c}", 100), f(f"hd95:{c}"),
                                     f(f"chamfer:{c}")]))
        lines.append(" | ".join(["Avg", "", f("dice", 100), f("hd95"), f("chamfer")]))
    return "\n".join(lines)
