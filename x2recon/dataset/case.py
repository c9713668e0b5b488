"""One case of a dataset: CT (+ labels) → segmentation, meshes, occupancy, DRRs, boxes, SPIDER targets.

A case is built in ``<id>.partial/``; each stage writes atomically and records its outputs with
checksums in ``stages.json``, so a killed run resumes at the first unfinished stage.  Only when
every stage is done is ``meta.json`` written and the folder renamed to ``<id>/``: a case folder
without ``.partial`` is always complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import CancelledError, X2ReconInputError
from ..io.atomic import atomic_write_text
from ..io.volume import Volume, read_ct, read_labelmap, write_volume
from .config import BuildConfig

META_FORMAT = "x2recon.case/1"
#: Minimum cranio-caudal extent for radiographs (a 40 mm slab makes no chest X-ray).
MIN_AXIAL_EXTENT_MM = 100.0

Progress = Callable[[float, str], None]


@dataclass
class CaseInput:
    """What one case is built from; ``variant`` 0 is the CT itself, ≥ 1 a deformed copy."""

    case_id: str
    ct: str
    labels: str | None = None
    label_convention: str | None = None  # overrides the config's (e.g. a VerSe labelmap)
    variant: int = 0

    @property
    def base_id(self) -> str:
        return self.case_id if self.variant == 0 else self.case_id.rsplit("_v", 1)[0]


@dataclass
class CaseResult:
    case_id: str
    case_dir: Path
    status: str  # "done" | "failed" | "skipped"
    reason: str | None = None
    meta: dict = field(default_factory=dict)
    seconds: float = 0.0


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def versions() -> dict:
    import importlib.metadata as md

    out = {"x2recon": __version__}
    for pkg in ("numpy", "torch", "SimpleITK", "trimesh", "libigl", "scikit-image", "vtk"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def variant_seed(config: BuildConfig, base_id: str, variant: int) -> int:
    """Deterministic per-variant seed from the build seed, the CT's id and the variant number."""
    h = hashlib.sha256(f"{config.seed}:{base_id}:{variant}".encode()).digest()
    return int.from_bytes(h[:4], "little")


class _Stages:
    """Bookkeeping of finished stages in ``stages.json`` inside the partial folder."""

    def __init__(self, work: Path, fingerprint: dict):
        self.work = work
        self.path = work / "stages.json"
        self.fingerprint = fingerprint
        self.done: dict[str, dict] = {}
        if self.path.exists():
            try:
                d = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                d = {}
            if d.get("fingerprint") == fingerprint:
                self.done = d.get("stages", {})

    def finished(self, name: str) -> bool:
        rec = self.done.get(name)
        if rec is None:
            return False
        for rel, digest in rec["files"].items():
            p = self.work / rel
            if not p.exists() or sha256_file(p) != digest:
                del self.done[name]
                return False
        return True

    def mark(self, name: str, files: list[Path], info: dict | None = None) -> None:
        self.done[name] = {
            "files": {str(p.relative_to(self.work)): sha256_file(p) for p in files},
            "info": info or {},
        }
        atomic_write_text(self.path, json.dumps({"fingerprint": self.fingerprint, "stages": self.done}, indent=1))

    def info(self, name: str) -> dict:
        return self.done[name]["info"]


def _fingerprint(inp: CaseInput, config: BuildConfig) -> dict:
    ct = Path(inp.ct)
    lab = Path(inp.labels) if inp.labels else None
    def stamp(p):
        if p is None or not p.exists():
            return None
        st = p.stat()
        return [str(p.resolve()), st.st_size, int(st.st_mtime)]
    return {
        "config": config.digest(),
        "ct": stamp(ct),
        "labels": stamp(lab),
        "convention": inp.label_convention,
        "variant": inp.variant,
        "version": __version__,
    }


def is_complete(case_dir: Path, inp: CaseInput, config: BuildConfig) -> bool:
    """A finished case with the same inputs and settings (meta.json is written last)."""
    meta = case_dir / "meta.json"
    if not meta.exists():
        return False
    try:
        d = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    return d.get("fingerprint") == _fingerprint(inp, config)


def _check_extent(ct: Volume) -> None:
    corners = ct.corners_world()
    extent = np.ptp(corners, axis=0)
    if extent[2] < MIN_AXIAL_EXTENT_MM:
        raise X2ReconInputError(
            ct.path,
            f"CT covers only {extent[2]:.0f} mm along the body axis; too thin for radiographs "
            f"(need ≥ {MIN_AXIAL_EXTENT_MM:.0f} mm)",
        )


def isocenter_of(seg: Volume, ct: Volume, config: BuildConfig) -> np.ndarray:
    """The imaging isocentre of a case: centre of the selected structures (or of the CT)."""
    if config.isocenter == "ct":
        return ct.corners_world().mean(axis=0)
    idx = np.argwhere(seg.array > 0)  # (k, j, i)
    lo, hi = idx.min(0)[::-1], idx.max(0)[::-1]
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    w = seg.index_to_world(corners)
    return (w.min(0) + w.max(0)) / 2


def build_case(
    inp: CaseInput | str | Path | Volume,
    out_dir: str | Path,
    *,
    labels=None,
    config: BuildConfig | None = None,
    case_id: str | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> CaseResult:
    """Build one case into ``out_dir/<case_id>/``; never raises for bad input (status "failed").

    ``inp`` is a :class:`CaseInput`, a CT path, or a CT :class:`Volume` (then ``labels`` may be
    a labelmap Volume too; the Slicer module passes nodes converted this way).
    """
    config = config or BuildConfig()
    t0 = time.time()
    ct_vol = lab_vol = None
    if isinstance(inp, Volume):
        ct_vol = inp
        lab_vol = labels if isinstance(labels, Volume) else None
        inp = CaseInput(case_id or "case", ct=str(inp.path or ""), labels=None if lab_vol is not None or labels is None else str(labels))
    elif not isinstance(inp, CaseInput):
        p = Path(inp)
        cid = case_id or (p.parent.name if p.name.startswith("ct.") else p.name.split(".")[0])
        inp = CaseInput(cid, str(p), None if labels is None else str(labels))
    out_dir = Path(out_dir)
    final = out_dir / inp.case_id
    work = out_dir / f"{inp.case_id}.partial"
    report = progress or (lambda f, m: None)

    def check_cancel():
        if cancel is not None and cancel():
            raise CancelledError(f"{inp.case_id}: cancelled")

    if ct_vol is None and is_complete(final, inp, config):
        meta = json.loads((final / "meta.json").read_text())
        return CaseResult(inp.case_id, final, "skipped", None, meta, 0.0)
    try:
        meta = _build(inp, config, work, ct_vol, lab_vol, report, check_cancel)
    except CancelledError:
        raise
    except X2ReconInputError as e:
        return CaseResult(inp.case_id, final, "failed", str(e), {}, time.time() - t0)
    except Exception as e:  # an unexpected failure is still reported per case, with where it happened
        tb = traceback.extract_tb(e.__traceback__)[-1]
        reason = f"{type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})"
        return CaseResult(inp.case_id, final, "failed", reason, {}, time.time() - t0)
    if final.exists():
        shutil.rmtree(final)
    work.rename(final)
    report(1.0, "done")
    return CaseResult(inp.case_id, final, "done", None, meta, time.time() - t0)


def _build(inp, config, work: Path, ct_vol, lab_vol, report: Progress, check_cancel) -> dict:
    from ..drr.boxes import class_names, structure_boxes, write_yolo_labels
    from ..drr.render import render_drr, write_drr
    from ..io.mesh import read_mesh, write_mesh
    from ..mesh.extract import labelmap_to_meshes, merge_meshes, to_box_coords
    from .augment import random_deformation
    from .occupancy import sample_occupancy, save_points
    from .segmentation import segment
    from .spider_targets import resample_to_box

    work.mkdir(parents=True, exist_ok=True)
    if ct_vol is None:
        fp = _fingerprint(inp, config)
    else:  # volumes from memory (Slicer nodes): identify them by content
        digest = lambda v: None if v is None else hashlib.sha256(np.ascontiguousarray(v.array).data).hexdigest()
        fp = {"ct_sha256": digest(ct_vol), "labels_sha256": digest(lab_vol), "config": config.digest(),
              "variant": inp.variant, "version": __version__}
    stages = _Stages(work, fp)
    cfg = config
    if inp.label_convention:
        cfg = BuildConfig.from_dict({**config.to_dict(), "label_convention": inp.label_convention})
    t_stage: dict[str, float] = {}

    # ---- 1. load, segment (and deform for variants)
    report(0.0, "reading CT")
    seg_path = work / "segmentation.nii.gz"
    seg_done = stages.finished("segment")  # checks the stored checksums once
    if seg_done:
        seg = read_labelmap(seg_path)
        info = stages.info("segment")
        names = {int(k): v for k, v in info["names"].items()}
    t = time.time()
    ct = ct_vol if ct_vol is not None else read_ct(inp.ct)
    _check_extent(ct)
    if lab_vol is None and inp.labels:
        lab_input = Path(inp.labels)
    else:
        lab_input = lab_vol
    deformation = None
    ct0 = ct
    if inp.variant > 0:
        deformation = random_deformation(variant_seed(cfg, inp.base_id, inp.variant), ct)
        ct = deformation.apply(ct, kind="ct")
    if not seg_done:
        check_cancel()
        report(0.03, "segmenting")
        seg, names, source = segment(ct0, lab_input, cfg)
        if deformation is not None:
            seg = deformation.apply(seg, kind="labels")
            present = set(np.unique(seg.array).tolist()) - {0}
            names = {k: v for k, v in names.items() if k in present}
        iso = isocenter_of(seg, ct, cfg)
        write_volume(seg, seg_path)
        stages.mark(
            "segment",
            [seg_path],
            {
                "names": {str(k): v for k, v in names.items()},
                "source": source,
                "isocenter": iso.tolist(),
                "missing": [s for s in cfg.structures if s not in names.values()],
                "deformation": None if deformation is None else deformation.to_dict(),
            },
        )
    info = stages.info("segment")
    iso = np.array(info["isocenter"])
    ref_geom = cfg.geometry("AP", iso)
    t_stage["segment"] = time.time() - t

    # ---- 2. meshes
    t = time.time()
    mesh_dir = work / "meshes"
    if not stages.finished("meshes"):
        check_cancel()
        report(0.1, "extracting meshes")
        meshes, skipped = labelmap_to_meshes(seg, names, smoothing_iterations=cfg.smoothing_iterations)
        if not meshes:
            raise X2ReconInputError(inp.ct, "no structure is large enough for a mesh")
        files = []
        for name, m in meshes.items():
            write_mesh(m, mesh_dir / f"{name}.ply")
            files.append(mesh_dir / f"{name}.ply")
        merged = merge_meshes(meshes)
        write_mesh(merged, mesh_dir / "bones.ply")
        write_mesh(to_box_coords(merged, ref_geom), mesh_dir / "bones_box.ply")
        files += [mesh_dir / "bones.ply", mesh_dir / "bones_box.ply"]
        stages.mark(
            "meshes",
            files,
            {"structures": sorted(meshes), "skipped": skipped, "volume_mm3": float(merged.volume)},
        )
    # always the stored mesh (float32 on disk): a resumed run samples exactly what a fresh run does
    merged = read_mesh(mesh_dir / "bones.ply")
    t_stage["meshes"] = time.time() - t

    # ---- 3. occupancy samples
    t = time.time()
    pts_path = work / "points.npz"
    if not stages.finished("occupancy"):
        check_cancel()
        report(0.25, "sampling occupancy")
        pts, occ = sample_occupancy(
            merged, ref_geom, n=cfg.n_points, near_surface_fraction=cfg.near_surface_fraction,
            sigma=cfg.near_surface_sigma, seed=cfg.seed + inp.variant,
        )
        save_points(pts_path, pts, occ, box_size=ref_geom.box_size, isocenter=iso)
        stages.mark("occupancy", [pts_path], {"inside_fraction": float(occ.mean())})
    t_stage["occupancy"] = time.time() - t

    # ---- 4. DRRs and box labels per view
    t = time.time()
    img_dir, lbl_dir = work / "images", work / "labels"
    classes = class_names("groups", cfg.structures)
    views = cfg.view_names()
    for i, view in enumerate(views):
        stage = f"drr_{view}"
        if stages.finished(stage):
            continue
        check_cancel()
        report(0.35 + 0.5 * i / len(views), f"rendering DRR {view}")
        geom = cfg.geometry(view, iso)
        img = render_drr(ct, geom, device=cfg.device, clahe=cfg.clahe, clahe_clip=cfg.clahe_clip)
        files = write_drr(img, img_dir, view)
        small = img.resized(cfg.x2b_size)
        files += write_drr(small, img_dir, f"{view}_{cfg.x2b_size}")
        boxes = structure_boxes(seg, names, geom)
        write_yolo_labels(boxes, classes, geom, lbl_dir / f"{view}.txt")
        box_json = lbl_dir / f"{view}.json"
        atomic_write_text(
            box_json,
            json.dumps([b.to_dict() for b in boxes], indent=1),
        )
        stages.mark(stage, [Path(f) for f in files] + [lbl_dir / f"{view}.txt", box_json], {"mapping": img.mapping})
    t_stage["drr"] = time.time() - t

    # ---- 5. SPIDER targets
    t = time.time()
    sp_dir = work / "spider"
    if not stages.finished("spider"):
        check_cancel()
        report(0.9, "resampling SPIDER targets")
        ct_box, seg_box = resample_to_box(ct, seg, iso, cfg.box_size, cfg.spider_grid)
        write_volume(ct_box, sp_dir / "ct.nii.gz")
        write_volume(seg_box, sp_dir / "labels.nii.gz")
        stages.mark("spider", [sp_dir / "ct.nii.gz", sp_dir / "labels.nii.gz"])
    t_stage["spider"] = time.time() - t

    # ---- 6. meta.json (last: marks the case complete)
    check_cancel()
    files = {}
    for rec in stages.done.values():
        files.update(rec["files"])
    meta = {
        "format": META_FORMAT,
        "case_id": inp.case_id,
        "base_id": inp.base_id,
        "variant": inp.variant,
        "inputs": {"ct": inp.ct, "labels": inp.labels},
        "fingerprint": fp,
        "config": cfg.to_dict(),
        "segmentation": {
            "source": info["source"],
            "names": info["names"],
            "missing": info["missing"],
        },
        "deformation": info["deformation"],
        "isocenter": iso.tolist(),
        "box_size": cfg.box_size,
        "views": views,
        "classes": classes,
        "meshes": stages.info("meshes"),
        "occupancy": stages.info("occupancy"),
        "drr_mapping": {v: stages.info(f"drr_{v}")["mapping"] for v in views},
        "files": files,
        "versions": versions(),
        "seconds": t_stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(work / "meta.json", json.dumps(meta, indent=1, default=_json_default))
    (work / "stages.json").unlink()
    return meta


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)
