"""SPIDER inference: a frontal + lateral X-ray pair → CT (HU) and labelmap on the reconstruction box.

The output grid tiles the box of the X-rays' geometry (``x2recon.dataset.spider_targets`` convention:
``resolution`` voxels per edge, spacing ``box_size / resolution``, LPS mm), so it overlays the patient's
CT.  The field is evaluated in chunks of points after encoding the views once; every point's output
depends only on that point and the feature maps, so chunked and one-shot evaluation agree exactly.
The labelmap gets a sidecar ``<name>.labels.json`` naming each label and the structures it joins.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..dataset.spider_targets import box_centres, box_grid
from ..errors import CancelledError, X2ReconInputError
from ..io.volume import Volume
from ..io.xray import XRay

LABELS_FORMAT = "x2recon.labels/1"


@dataclass
class SpiderResult:
    ct: Volume  # int16 HU
    labels: Volume | None  # uint8 class indices (None for a volume-only model)
    names: dict[int, str]  # label → class name
    members: dict[str, list[str]]  # class name → TotalSegmentator names
    seconds: float
    device: str


def check_pair(model, xrays: list[XRay]) -> None:
    """Two X-rays whose geometries share one reconstruction box and are about orthogonal."""
    views = model.cfg.views
    if len(xrays) != 2:
        raise X2ReconInputError(xrays[0].source if xrays else "input",
                                f"SPIDER needs two X-rays ({views[0]} and {views[1]}), got {len(xrays)}")
    a, b = xrays[0].geometry, xrays[1].geometry
    if not (np.allclose(a.isocenter, b.isocenter, atol=1e-3) and abs(a.box_size - b.box_size) < 1e-6):
        raise X2ReconInputError(xrays[1].source, "the two X-rays' geometries do not share one reconstruction box "
                                                 f"(isocentres {list(a.isocenter)} vs {list(b.isocenter)}, "
                                                 f"boxes {a.box_size} vs {b.box_size} mm)")
    cos = abs(float(a.plane_normal @ b.plane_normal))
    if cos > 0.5:
        raise X2ReconInputError(xrays[1].source, f"the views are {np.degrees(np.arccos(min(cos, 1.0))):.0f}° apart; "
                                                 "SPIDER needs a frontal and a lateral (orthogonal) pair")


def _amp(device: torch.device, precision: str):
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def voxel_centres(flat: torch.Tensor, n: int, centres: torch.Tensor) -> torch.Tensor:
    """Box coordinates (x, y, z) of flat voxel indices of an n³ grid in array order [k, j, i] (x fastest);
    ``centres`` = ``box_centres(n)`` as a tensor."""
    i, j, k = flat % n, (flat // n) % n, flat // (n * n)
    return torch.stack([centres[i], centres[j], centres[k]], 1)


@torch.no_grad()
def predict_grid(model, images: torch.Tensor, grid: torch.Tensor, n: int, *, chunk: int = 1 << 18,
                 precision: str = "auto", progress: Callable[[float, str], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The field on every voxel centre of an n³ box grid: (intensity in [0, 1] units (n, n, n) float32,
    class indices (n, n, n) uint8 or None), both on the model's device, array order [k, j, i].

    ``images`` (2, 1, S, S) and ``grid`` (2, 3, 4) as the training items; ``chunk`` points at a time."""
    dev = next(model.parameters()).device
    n = int(n)
    if n < 2:
        raise ValueError(f"resolution must be at least 2, got {n}")
    chunk = max(1, int(chunk))
    c = torch.as_tensor(box_centres(n), dtype=torch.float32, device=dev)
    total = n ** 3
    inten = torch.empty(total, dtype=torch.float32, device=dev)
    labels = torch.empty(total, dtype=torch.uint8, device=dev) if model.cfg.n_classes else None
    with _amp(dev, precision):
        code = model.encode(images[None].to(dev), grid[None].to(dev))
        for s in range(0, total, chunk):
            if cancel is not None and cancel():
                raise CancelledError("SPIDER reconstruction cancelled")
            flat = torch.arange(s, min(s + chunk, total), device=dev)
            pts = voxel_centres(flat, n, c)[None]
            out = model.decode(pts, code)[0].float()
            inten[s:s + len(flat)] = out[:, 0]
            if labels is not None:
                labels[s:s + len(flat)] = out[:, 1:].argmax(1).to(torch.uint8)
            if progress is not None:
                progress(min(s + chunk, total) / total, f"{min(s + chunk, total):,} of {total:,} points")
    shape = (n, n, n)
    return inten.reshape(shape), (labels.reshape(shape) if labels is not None else None)


def reconstruct_ct(model, xrays: list[XRay], *, resolution: int = 128, chunk: int = 1 << 18,
                   precision: str = "auto", progress: Callable[[float, str], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> SpiderResult:
    """CT and labelmap from ``xrays`` = [frontal, lateral] with a loaded SPIDER ``model``."""
    check_pair(model, xrays)
    t0 = time.perf_counter()
    S = model.cfg.image_size
    ims, grids = zip(*(x.network_input(S) for x in xrays))
    images, grid = torch.from_numpy(np.stack(ims)), torch.from_numpy(np.stack(grids))
    inten, labels = predict_grid(model, images, grid, resolution, chunk=chunk, precision=precision,
                                 progress=progress, cancel=cancel)
    cfg = model.cfg
    hu = np.rint(cfg.unit_to_hu(inten.cpu().numpy().astype(np.float64)))
    g = xrays[0].geometry
    ct = box_grid(g, g.box_size, resolution, np.int16)
    ct.array = np.clip(hu, -32768, 32767).astype(np.int16)
    lab = None
    if labels is not None:
        lab = box_grid(g, g.box_size, resolution, np.uint8)
        lab.array = labels.cpu().numpy()
    names = {i + 1: c for i, c in enumerate(cfg.classes)} if labels is not None else {}
    return SpiderResult(ct, lab, names, {c: list(cfg.members.get(c, [])) for c in cfg.classes},
                        time.perf_counter() - t0, str(next(model.parameters()).device))


def fit_to_ct(model, xrays: list[XRay], ct: Volume, *, steps: int = 200, lr: float = 1e-3, n_points: int = 16384,
              seed: int = 0, progress: Callable[[float, str], None] | None = None,
              cancel: Callable[[], bool] | None = None):
    """SPIDER as a segmenter of a CT it was not trained on (spider-paper §6.1): a copy of ``model`` whose
    decoder MLP is frozen is fitted to the CT's intensities (L1 only) at points of the reconstruction
    box, from the X-ray pair; the segmentation head, still reading the shared decoder, then labels that
    CT.  The encoder and the hash encoding are what change.  Returns the fitted copy (eval mode)."""
    import copy

    from ..dataset.spider_targets import resample_to_box

    check_pair(model, xrays)
    fitted = copy.deepcopy(model)
    dev = next(fitted.parameters()).device
    frozen = [fitted.decoder] + ([fitted.seg_decoder] if fitted.seg_decoder is not None else [])
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    train = [p for p in fitted.parameters() if p.requires_grad]
    g = xrays[0].geometry
    n = 128
    ct_box, _ = resample_to_box(ct, None, g, g.box_size, n)
    target = torch.as_tensor(fitted.cfg.hu_to_unit(ct_box.array.astype(np.float32)), device=dev).reshape(-1)
    S = fitted.cfg.image_size
    ims, grids = zip(*(x.network_input(S) for x in xrays))
    images = torch.from_numpy(np.stack(ims))[None].to(dev)
    grid = torch.from_numpy(np.stack(grids))[None].to(dev)
    c = torch.as_tensor(box_centres(n), dtype=torch.float32, device=dev)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    opt = torch.optim.Adam(train, lr=lr, eps=1e-15)
    fitted.train()
    for step in range(int(steps)):
        if cancel is not None and cancel():
            raise CancelledError("fitting to the CT cancelled")
        flat = torch.randint(n ** 3, (n_points,), generator=gen).to(dev)
        out = fitted(images, grid, voxel_centres(flat, n, c)[None])
        loss = (out[0, :, 0].float() - target[flat]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress((step + 1) / steps, f"fitting to the CT: step {step + 1}/{steps}, L1 {loss.item():.4f}")
    return fitted.eval()


def labels_sidecar(labels_path: str | Path) -> Path:
    """``seg.nii.gz`` → ``seg.labels.json`` (beside it)."""
    p = Path(labels_path)
    name = p.name
    for suf in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"):
        if name.endswith(suf):
            name = name[: -len(suf)]
            break
    return p.with_name(name + ".labels.json")


def write_result(result: SpiderResult, ct_path: str | Path, labels_path: str | Path | None = None) -> list[Path]:
    """Write the CT and (if asked and present) the labelmap + its sidecar, each atomically."""
    from ..io.atomic import atomic_write_text
    from ..io.volume import write_volume

    written = []
    write_volume(result.ct, ct_path)
    written.append(Path(ct_path))
    if labels_path is not None:
        if result.labels is None:
            raise X2ReconInputError(labels_path, "this SPIDER model has no segmentation head (volume-only)")
        write_volume(result.labels, labels_path)
        side = labels_sidecar(labels_path)
        atomic_write_text(side, json.dumps({"format": LABELS_FORMAT,
                                            "labels": {str(k): v for k, v in result.names.items()},
                                            "members": result.members}, indent=1))
        written += [Path(labels_path), side]
    return written


def _read_sidecar(labels_path: str | Path) -> dict:
    side = labels_sidecar(labels_path)
    if not side.is_file():
        raise X2ReconInputError(side, "label names not found (the sidecar x2recon spider writes beside the labelmap)")
    d = json.loads(side.read_text())
    if d.get("format") != LABELS_FORMAT:
        raise X2ReconInputError(side, f"not an x2recon label file (format {d.get('format')!r})")
    return d


def read_label_names(labels_path: str | Path) -> dict[int, str]:
    """Label → class name from a labelmap's sidecar (``write_result``)."""
    return {int(k): v for k, v in _read_sidecar(labels_path)["labels"].items()}


def read_label_members(labels_path: str | Path) -> dict[str, list[str]]:
    """Class name → TotalSegmentator names, from the sidecar."""
    return _read_sidecar(labels_path).get("members", {})


# ------------------------------------------------------------------------- inputs and comparisons
def training_geometry(model_config: dict, view: str, isocenter=(0.0, 0.0, 0.0), size: tuple[int, int] | None = None):
    """The geometry the model's dataset rendered ``view`` with (its sdd, sod, detector, beam and box),
    around ``isocenter``, resized to ``size`` (W, H) if given."""
    from ..dataset.config import BuildConfig

    build = model_config.get("dataset", {}).get("build")
    if not build:
        raise X2ReconInputError("model", "the checkpoint does not record its dataset's geometry")
    g = BuildConfig.from_dict(build).geometry(view, np.asarray(isocenter, float))
    if size is not None and tuple(size) != tuple(g.size):
        if size[0] != size[1]:
            raise X2ReconInputError("X-ray", f"a {size[0]}×{size[1]} X-ray without a geometry file: the training "
                                             "detector is square; give a geometry JSON")
        g = g.resized(int(size[0]), int(size[1]))
    return g


def read_view(path: str | Path, view: str, model_config: dict, geometry: str | Path | None = None) -> XRay:
    """An X-ray for SPIDER: its geometry from ``geometry``, else the sidecar beside it (as x2recon's DRRs
    have), else the model's training geometry of ``view`` centred at the origin."""
    from dataclasses import replace

    from ..io.xray import read_xray, sidecar_geometry

    if geometry is not None or sidecar_geometry(path) is not None:
        return read_xray(path, view=view, geometry=geometry)
    x = read_xray(path, view=view)
    H, W = x.image.shape
    return replace(x, geometry=training_geometry(model_config, view, size=(W, H)))


def render_pair_from_ct(ct: Volume, model_config: dict, labels: Volume | None = None, *, device: str = "auto",
                        isocenter=None) -> list[XRay]:
    """The model's [frontal, lateral] DRRs of a CT with the dataset builder's renderer and geometry (and, where
    its data was built so, with everything outside the body set to air).

    The isocentre is ``isocenter`` if given, else chosen as the builder chose it: the centre of the
    dataset's structures in ``labels`` (a labelmap in the dataset's label convention), or the CT's centre."""
    from ..dataset.case import isocenter_of
    from ..dataset.config import BuildConfig
    from ..drr.render import render_drr
    from ..structures import LABEL_CONVENTIONS, resolve_structures
    from ..io.xray import xray_from_array

    build = BuildConfig.from_dict(model_config["dataset"]["build"])
    if not build.keep_outside_body:  # as the builder rendered the model's data: nothing outside the body
        from ..dataset.skeleton import clear_outside_body

        ct = clear_outside_body(ct)[0]
    if isocenter is not None:
        iso = np.asarray(isocenter, float)
    elif labels is not None:
        wanted = set(resolve_structures(build.structures))
        names = LABEL_CONVENTIONS[build.label_convention]()
        ids = [i for i, n in names.items() if n in wanted]
        sel = Volume(np.isin(labels.array, ids).astype(np.uint8), labels.spacing, labels.origin, labels.direction)
        iso = isocenter_of(sel, ct, build) if sel.array.any() else ct.corners_world().mean(axis=0)
    else:
        iso = ct.corners_world().mean(axis=0)
    out = []
    for view in model_config["model"]["views"]:
        g = build.geometry(view, iso)
        img = render_drr(ct, g, device=device, clahe=build.clahe, clahe_clip=build.clahe_clip)
        out.append(xray_from_array(img.display, g, f"DRR {view} of the CT"))
    return out


def write_xray(xray: XRay, path_png: str | Path) -> list[Path]:
    """A 16-bit PNG + geometry JSON sidecar, readable by ``read_xray``."""
    from ..io.atomic import atomic_write_text
    from ..io.image import write_png16

    p = Path(path_png)
    write_png16(np.rint(np.clip(xray.image, 0, 1) * 65535).astype(np.uint16), p)
    side = p.with_suffix(".json")
    atomic_write_text(side, xray.geometry.to_json())
    return [p, side]


def compare(pred_ct: Volume, pred_labels: Volume | None, label_names: dict[int, str], gt_ct: Volume | None,
            gt_labels: Volume | None, gt_names: dict[int, str] | None, members: dict[str, list[str]] | None = None) -> dict:
    """SPIDER's metrics of one reconstruction against a ground-truth CT and segmentation (any grid: they
    are resampled onto the reconstruction's).  Ground-truth labels are mapped to the model's classes
    by name (``gt_names`` id → TotalSegmentator or class name; ``members`` class → names)."""
    from ..dataset.spider_targets import resample_to_box
    from ..metrics.volume import volume_metrics

    n = pred_ct.array.shape[0]
    h = float(pred_ct.spacing[0])
    iso = np.asarray(pred_ct.origin, float) + (n * h) / 2 - h / 2
    gt_ct_box, gt_lab_box = resample_to_box(gt_ct, gt_labels, iso, n * h, n)
    mapped = None
    if gt_lab_box is not None and pred_labels is not None:
        from ..dataset.spider_data import class_lut

        if sorted(label_names) != list(range(1, len(label_names) + 1)):
            raise ValueError(f"label ids must be 1..K, got {sorted(label_names)}")
        classes = [label_names[k] for k in sorted(label_names)]
        lut = class_lut({int(i): nm for i, nm in (gt_names or {}).items()}, classes, members or {})
        a = gt_lab_box.array
        mapped = np.where(a < len(lut), lut[np.minimum(a, len(lut) - 1)], 0).astype(np.uint8)
    m = volume_metrics(pred_ct.array if gt_ct_box is not None else None,
                       gt_ct_box.array if gt_ct_box is not None else None,
                       pred_labels.array if mapped is not None else None, mapped,
                       spacing=(h, h, h), labels={c: k for k, c in label_names.items()})
    return {"psnr": m.psnr, "ssim": m.ssim, "data_range": m.data_range,
            "structures": {c: {"dice": m.dice.get(c, np.nan), "hd95": m.hd95.get(c, np.nan),
                               "chamfer": m.chamfer.get(c, np.nan)} for c in label_names.values()} if mapped is not None else {},
            "mean": {"dice": m.mean_dice, "hd95": m.mean_hd95, "chamfer": m.mean_chamfer},
            "missing": m.missing}
