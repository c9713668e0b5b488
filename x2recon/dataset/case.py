"""One case of a dataset: CT (+ labels) → segmentation, meshes, occupancy, DRRs, boxes, SPIDER targets.

A case is built in ``<id>.partial/``; each stage writes atomically and records its outputs with
checksums in ``stages.json``, so a killed run resumes at the first unfinished stage.  Only when
every stage is done is ``meta.json`` written and the folder renamed to ``<id>/``: a case folder
without ``.partial`` is always complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import CancelledError, X2ReconInputError
from ..io.atomic import atomic_write_text
from ..io.volume import Volume, check_hounsfield, read_ct, read_labelmap, write_volume
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


def voxel_sha256(vol: Volume) -> str:
    """Checksum of a volume's voxels (with their shape and type): the same scan read from any file format
    gives the same value, so evaluation can tell a case a model was trained on (``dataset.model_fit``)."""
    a = np.ascontiguousarray(vol.array)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
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


def box_shift(config: BuildConfig, base_id: str, variant: int) -> np.ndarray:
    """A variant's isocentre offset (LPS mm), uniform in ± ``config.variant_shift_mm`` per axis, seeded like
    the variant (its own stream: the deformation does not change with it); zero for the CT itself.
    The isocentre is found again on each deformed CT, which cancels a translation of the patient: this
    offset is what moves the patient in the box."""
    lim = np.asarray(config.variant_shift_mm, float)
    if variant == 0 or not lim.any():
        return np.zeros(3)
    h = hashlib.sha256(f"{config.seed}:{base_id}:{variant}:box".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:4], "little")).uniform(-1, 1, 3) * lim


def realism_seed(config: BuildConfig, case_id: str, view: str) -> int:
    """Seed of one DRR's radiograph-like variation: the build seed, the case and the view."""
    h = hashlib.sha256(f"{config.seed}:{case_id}:{view}:realism".encode()).digest()
    return int.from_bytes(h[:4], "little")


#: OSError numbers after which no later case can be written either (the run stops, resumable).
FATAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def safe_case_id(name: str) -> str:
    """A case id from any name: letters, digits and ``_ . + -`` only, no leading/trailing dots.

    ``..``, ``.``, path separators and the ``.partial`` suffix can never reach a path, so a case
    folder is always exactly ``cases/<id>``.
    """
    cid = _ID_UNSAFE.sub("_", str(name)).strip("._-")
    if cid.endswith(".partial"):
        cid = cid[: -len(".partial")] + "_partial"
    return cid or "case"


def case_paths(out_dir: Path, case_id: str) -> tuple[Path, Path]:
    """``(out_dir/<id>, out_dir/<id>.partial)``; refuses an unsafe id or a symlinked case folder."""
    if case_id != safe_case_id(case_id):
        raise X2ReconInputError(None, f"case id {case_id!r} is not a plain name (letters, digits, _ . + -); "
                                f"use e.g. {safe_case_id(case_id)!r}")
    root = out_dir.resolve()
    paths = (out_dir / case_id, out_dir / f"{case_id}.partial")
    for p in paths:
        if p.is_symlink():
            raise X2ReconInputError(p, "case folder is a symbolic link; x2recon writes and deletes only real "
                                    "folders inside the dataset: replace the link by a folder or remove it")
        if p.resolve().parent != root:
            raise X2ReconInputError(p, f"case folder resolves outside {root}")
    return paths


def remove_case_dir(path: Path, out_dir: Path) -> None:
    """``rmtree`` a case folder, asserting first that it is a real folder directly inside ``out_dir``."""
    path = Path(path)
    if path.is_symlink() or path.resolve().parent != Path(out_dir).resolve() or path.name in ("", ".", ".."):
        raise X2ReconInputError(path, f"refusing to delete: not a case folder inside {out_dir}")
    shutil.rmtree(path)


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
    """A finished case with the same inputs and settings whose files are all intact.

    meta.json is written last; every file it lists must still exist with its recorded
    checksum (a concurrent writer or a user may have removed or changed one), else the case
    is rebuilt.
    """
    d = read_meta(case_dir)
    if d is None or d.get("fingerprint") != _fingerprint(inp, config):
        return False
    return verify_files(case_dir, d.get("files")) is None


def read_meta(case_dir: Path) -> dict | None:
    """A case folder's meta.json as a dict, or None when it is missing or unreadable."""
    try:
        d = json.loads((case_dir / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def verify_files(case_dir: Path, files) -> str | None:
    """None when every ``{relative path: sha256}`` file is present and intact, else what is wrong."""
    if not isinstance(files, dict) or not files:
        return "meta.json lists no files"
    for rel, digest in files.items():
        p = case_dir / rel
        if not p.is_file():
            return f"{rel} is missing"
        if sha256_file(p) != digest:
            return f"{rel} does not match its checksum"
    return None


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
    """The imaging isocentre of a case: centre of the selected structures, of the CT, or of the lungs."""
    if config.isocenter == "ct":
        return ct.corners_world().mean(axis=0)
    if config.isocenter == "thorax":
        from .thorax import lung_center

        return lung_center(ct)
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
    a labelmap Volume too; the Slicer module passes nodes converted this way).  Raises
    :class:`X2ReconInputError` for what no other case could survive either: an unsafe case id,
    a case folder that is a symlink, a full or read-only disk.
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
        cid = case_id or safe_case_id(p.parent.name if p.name.startswith("ct.") else p.name.split(".")[0])
        inp = CaseInput(cid, str(p), None if labels is None else str(labels))
    final, work = case_paths(Path(out_dir), inp.case_id)
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
    except OSError as e:
        if _is_fatal(e, Path(out_dir)):  # no later case can be written either: stop the run, resumable
            raise X2ReconInputError(e.filename or out_dir, f"cannot write: {e.strerror}; fix it and run "
                                    "the same command again to resume") from None
        return CaseResult(inp.case_id, final, "failed", _where(e), {}, time.time() - t0)
    except Exception as e:  # an unexpected failure is still reported per case, with where it happened
        return CaseResult(inp.case_id, final, "failed", _where(e), {}, time.time() - t0)
    if final.exists():
        remove_case_dir(final, Path(out_dir))
    work.rename(final)
    report(1.0, "done")
    return CaseResult(inp.case_id, final, "done", None, meta, time.time() - t0)


def _is_fatal(e: OSError, out_dir: Path) -> bool:
    """A full disk, or a dataset folder that cannot be written (not an unreadable input)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if e.errno not in FATAL_ERRNOS or not e.filename:
        return False
    return Path(os.path.abspath(e.filename)).is_relative_to(out_dir.resolve())


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)[-1]
    return f"{type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})"


@dataclass
class _Case:
    """What the stages of one case share while it is built."""

    inp: CaseInput
    cfg: BuildConfig
    work: Path
    stages: "_Stages"
    report: Progress
    check_cancel: Callable[[], None]
    ct: Volume | None = None
    seg: Volume | None = None
    names: dict = field(default_factory=dict)
    iso: np.ndarray | None = None
    t_stage: dict = field(default_factory=dict)
    cpu_stage: dict = field(default_factory=dict)  # CPU seconds of this process (all threads) per stage
    ct_sha256: str | None = None  # voxel checksum of the scan (before any deformation): the case's identity
    outside_body: dict | None = None  # what clearing outside the body did (None: kept, --keep-outside-body)

    def geometry(self, view: str):
        return self.cfg.geometry(view, self.iso)


def _build(inp, config, work: Path, ct_vol, lab_vol, report: Progress, check_cancel) -> dict:
    """Run the stages in ``work``: each is skipped when its recorded outputs are intact."""
    work.mkdir(parents=True, exist_ok=True)
    for leftover in work.rglob(".*.part*"):  # temporary files of writes a kill interrupted
        leftover.unlink()
    if ct_vol is None:
        fp = _fingerprint(inp, config)
    else:  # volumes from memory (Slicer nodes): identify them by content
        digest = lambda v: None if v is None else hashlib.sha256(np.ascontiguousarray(v.array).data).hexdigest()
        fp = {"ct_sha256": digest(ct_vol), "labels_sha256": digest(lab_vol), "config": config.digest(),
              "variant": inp.variant, "version": __version__}
    cfg = config
    if inp.label_convention:
        cfg = BuildConfig.from_dict({**config.to_dict(), "label_convention": inp.label_convention})
    c = _Case(inp, cfg, work, _Stages(work, fp), report, check_cancel)
    for stage in (_stage_segment, _stage_meshes, _stage_occupancy, _stage_drr, _stage_spider):
        t, cpu = time.time(), time.process_time()
        stage(c, ct_vol, lab_vol)
        c.t_stage[stage.__name__.removeprefix("_stage_")] = time.time() - t
        c.cpu_stage[stage.__name__.removeprefix("_stage_")] = time.process_time() - cpu
    c.check_cancel()
    return _write_meta(c, fp)


def _warn_missing_structures(case_id: str, source: str, wanted: list[str], names: dict, shown: int = 8) -> None:
    """A ``UserWarning`` on the console when the segmentation holds fewer structures than were asked for
    (a labelmap with 1 of 50 built a case that said so only in meta.json): how many, and which are missing."""
    found = set(names.values())
    missing = [s for s in wanted if s not in found]
    if not missing or not found & set(wanted):  # none named at all: the threshold fallback, which names no anatomy
        return
    listed = ", ".join(missing[:shown]) + (f" … ({len(missing)} in all)" if len(missing) > shown else "")
    warnings.warn(f"{case_id}: structures found {len(wanted) - len(missing)} of {len(wanted)} requested "
                  f"({source.split(' (')[0]}); missing: {listed}", stacklevel=2)


def _stage_segment(c: _Case, ct_vol, lab_vol) -> None:
    """1. read the CT (deformed for a variant) and segment it; the stored segmentation is used after."""
    from .augment import random_deformation
    from .segmentation import segment

    c.report(0.0, "reading CT")
    seg_path = c.work / "segmentation.nii.gz"
    ct = ct_vol if ct_vol is not None else read_ct(c.inp.ct)
    if ct_vol is not None:  # a volume from memory (a Slicer node): the histogram check read_ct makes
        check_hounsfield(ct_vol.array, ct_vol.path or c.inp.case_id)
    _check_extent(ct)
    deformation, ct0 = None, ct
    if c.inp.variant > 0:  # seeded by the case, never by process state: the same bytes in any run
        deformation = random_deformation(variant_seed(c.cfg, c.inp.base_id, c.inp.variant), ct,
                                         params=c.cfg.deformation_params())
        ct = deformation.apply(ct, kind="ct")
    body = None
    if not c.cfg.keep_outside_body:  # couch, blankets, tubes → air, before anything is rendered or meshed
        from .skeleton import clear_outside_body

        ct, body, c.outside_body = clear_outside_body(ct)
    c.ct, c.ct_sha256 = ct, voxel_sha256(ct0)
    if not c.stages.finished("segment"):
        c.check_cancel()
        c.report(0.03, "segmenting")
        lab_input = Path(c.inp.labels) if lab_vol is None and c.inp.labels else lab_vol
        seg, names, source = segment(ct0, lab_input, c.cfg)
        if deformation is not None:
            seg = deformation.apply(seg, kind="labels")
        if body is not None:  # no label outside the body (a labelmap may name the couch's neighbours)
            seg = seg.with_array(np.where(body, seg.array, 0).astype(seg.array.dtype))
        if deformation is not None or body is not None:
            present = set(np.unique(seg.array).tolist()) - {0}
            names = {k: v for k, v in names.items() if k in present}
        _warn_missing_structures(c.inp.case_id, source, c.cfg.structures, names)
        shift = box_shift(c.cfg, c.inp.base_id, c.inp.variant)
        iso = isocenter_of(seg, ct, c.cfg) + shift
        write_volume(seg, seg_path)
        c.stages.mark("segment", [seg_path], {
            "names": {str(k): v for k, v in names.items()},
            "source": source,
            "isocenter": iso.tolist(),
            "missing": [s for s in c.cfg.structures if s not in names.values()],
            "deformation": None if deformation is None else deformation.to_dict(),
            "box_shift_mm": shift.tolist(),
        })
    # always the stored segmentation: a resumed run continues from exactly what a fresh run has
    c.seg = read_labelmap(seg_path)
    info = c.stages.info("segment")
    c.names = {int(k): v for k, v in info["names"].items()}
    c.iso = np.array(info["isocenter"])


def _stage_meshes(c: _Case, *_) -> None:
    """2. one watertight mesh per structure, the merged bones (LPS mm and normalised box)."""
    from ..io.mesh import write_mesh
    from ..mesh.extract import SURFACE_METHOD, labelmap_to_meshes, merge_meshes, signed_volume, to_box_coords
    from .box_coverage import outside_box_fractions

    if c.stages.finished("meshes"):
        return
    c.check_cancel()
    c.report(0.1, "extracting meshes")
    mesh_dir = c.work / "meshes"
    meshes, skipped = labelmap_to_meshes(c.seg, c.names, smoothing=c.cfg.mesh_smoothing)
    if not meshes:
        raise X2ReconInputError(c.inp.ct, "no structure is large enough for a mesh")
    files = []
    for name, m in meshes.items():
        write_mesh(m, mesh_dir / f"{name}.ply")
        files.append(mesh_dir / f"{name}.ply")
    merged = merge_meshes(meshes)
    write_mesh(merged, mesh_dir / "bones.ply")
    write_mesh(to_box_coords(merged, c.geometry("AP")), mesh_dir / "bones_box.ply")
    files += [mesh_dir / "bones.ply", mesh_dir / "bones_box.ply"]
    c.stages.mark("meshes", files, {"structures": sorted(meshes), "skipped": skipped, "volume_mm3": signed_volume(merged),
                                    "outside_box_fraction": outside_box_fractions(meshes, c.geometry("AP"), c.inp.case_id),
                                    "surface": SURFACE_METHOD, "smoothing": c.cfg.mesh_smoothing,
                                    "dropped_pieces": {k: m.metadata["dropped_pieces"] for k, m in sorted(meshes.items())},
                                    "dropped_mm3": {k: round(m.metadata["dropped_volume"], 3) for k, m in sorted(meshes.items())}})


def _stage_occupancy(c: _Case, *_) -> None:
    """3. occupancy samples of the stored (float32) merged mesh, as a resumed run sees it."""
    from ..io.mesh import read_mesh
    from .occupancy import sample_occupancy, save_points

    pts_path = c.work / "points.npz"
    if c.stages.finished("occupancy"):
        return
    c.check_cancel()
    c.report(0.25, "sampling occupancy")
    merged = read_mesh(c.work / "meshes" / "bones.ply")
    ref = c.geometry("AP")
    pts, occ = sample_occupancy(
        merged, ref, n=c.cfg.n_points, near_surface_fraction=c.cfg.near_surface_fraction,
        sigma=c.cfg.near_surface_sigma, seed=c.cfg.seed + c.inp.variant,
    )
    save_points(pts_path, pts, occ, box_size=ref.box_size, isocenter=c.iso)
    c.stages.mark("occupancy", [pts_path], {"inside_fraction": float(occ.mean())})


def _stage_drr(c: _Case, *_) -> None:
    """4. per view: the DRR (full size and the X2B input size) and its box labels.

    HU → μ and the segmentation's box corners are computed once for all views (when one is due).
    """
    from ..drr.boxes import class_names, label_corners, structure_boxes, write_yolo_labels
    from ..drr.render import attenuation, render_drr, write_drr

    img_dir, lbl_dir = c.work / "images", c.work / "labels"
    classes = class_names("groups", c.cfg.structures)
    views = c.cfg.view_names()
    att = corners = None
    for i, view in enumerate(views):
        stage = f"drr_{view}"
        if c.stages.finished(stage):
            continue
        c.check_cancel()
        c.report(0.35 + 0.5 * i / len(views), f"rendering DRR {view}")
        geom, realism = c.geometry(view), None
        if c.cfg.xray_realism:  # radiograph-like: the camera moves (labels follow), then the image varies
            from ..drr.realism import perturb_geometry, sample_params

            realism = sample_params(realism_seed(c.cfg, c.inp.case_id, view), geom.size)
            geom = perturb_geometry(geom, realism)
        att = att or attenuation(c.ct, c.cfg.device)
        img = render_drr(c.ct, geom, device=c.cfg.device, clahe=c.cfg.clahe, clahe_clip=c.cfg.clahe_clip,
                         attenuation=att)
        if realism is not None:
            from ..drr.realism import realistic_drr

            img = realistic_drr(img, realism, clahe=c.cfg.clahe, clahe_clip=c.cfg.clahe_clip)
        files = write_drr(img, img_dir, view)
        files += write_drr(img.resized(c.cfg.x2b_size), img_dir, f"{view}_{c.cfg.x2b_size}")
        corners = corners or label_corners(c.seg, list(c.names))
        boxes = structure_boxes(c.seg, c.names, geom, corners)
        write_yolo_labels(boxes, classes, geom, lbl_dir / f"{view}.txt")
        box_json = lbl_dir / f"{view}.json"
        atomic_write_text(box_json, json.dumps([b.to_dict() for b in boxes], indent=1))
        c.stages.mark(stage, [Path(f) for f in files] + [lbl_dir / f"{view}.txt", box_json], {"mapping": img.mapping})


def _stage_spider(c: _Case, *_) -> None:
    """5. CT and labels resampled into the reconstruction box (SPIDER's targets)."""
    from .spider_targets import resample_to_box

    sp_dir = c.work / "spider"
    if c.stages.finished("spider"):
        return
    c.check_cancel()
    c.report(0.9, "resampling SPIDER targets")
    ct_box, seg_box = resample_to_box(c.ct, c.seg, c.iso, c.cfg.box_size, c.cfg.spider_grid)
    write_volume(ct_box, sp_dir / "ct.nii.gz")
    write_volume(seg_box, sp_dir / "labels.nii.gz")
    c.stages.mark("spider", [sp_dir / "ct.nii.gz", sp_dir / "labels.nii.gz"])


def _write_meta(c: _Case, fp: dict) -> dict:
    """6. ``meta.json`` (last: marks the case complete) with every file's checksum."""
    from ..drr.boxes import class_names

    files = {}
    for rec in c.stages.done.values():
        files.update(rec["files"])
    info = c.stages.info("segment")
    views = c.cfg.view_names()
    meta = {
        "format": META_FORMAT,
        "case_id": c.inp.case_id,
        "base_id": c.inp.base_id,
        "variant": c.inp.variant,
        "inputs": {"ct": c.inp.ct, "labels": c.inp.labels, "ct_sha256": c.ct_sha256},
        "fingerprint": fp,
        "config": c.cfg.to_dict(),
        "segmentation": {"source": info["source"], "names": info["names"], "missing": info["missing"]},
        "deformation": info["deformation"],
        "outside_body": ({"kept": True} if c.outside_body is None
                         else {"kept": False, "set_to_hu": -1024, **c.outside_body}),
        "isocenter": c.iso.tolist(),
        # the variant's box jitter: the isocentre moved by this much (LPS mm), so the patient sits that much
        # the other way in the box (0 for the CT itself; --variant-shift-mm)
        "box_shift_mm": info.get("box_shift_mm", [0.0, 0.0, 0.0]),
        "box_size": c.cfg.box_size,
        "views": views,
        "classes": class_names("groups", c.cfg.structures),
        "meshes": c.stages.info("meshes"),
        "occupancy": c.stages.info("occupancy"),
        "drr_mapping": {v: c.stages.info(f"drr_{v}")["mapping"] for v in views},
        "files": files,
        "versions": versions(),
        "seconds": c.t_stage,
        "cpu_seconds": c.cpu_stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(c.work / "meta.json", json.dumps(meta, indent=1, default=_json_default))
    (c.work / "stages.json").unlink()
    return meta


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)
