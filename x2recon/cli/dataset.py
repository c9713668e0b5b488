"""``x2recon build-dataset``, ``drr`` and ``manifest``: CT scans → training data (registered by ``x2recon.cli``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_preset_option, apply_preset, box_size, detector_mm, distance_mm, float_in, preset_help
from .common import floats as _floats
from .common import non_negative_float, non_negative_int, output_dir, output_file, positive_int, probability


def _type_error(text: str):
    return argparse.ArgumentTypeError(text)


def _structures(s: str) -> str:
    """``--structures``: known TotalSegmentator names/groups, at least one (checked before any work)."""
    from ..structures import resolve_structures

    try:
        names = resolve_structures(s)
    except ValueError as e:
        raise _type_error(str(e)) from None
    if not names:
        raise _type_error("names no structure; give TotalSegmentator names or groups, e.g. ribs,vertebrae")
    return s


def _view(s: str) -> str:
    """A view: AP, PA, LAT or an angle in degrees."""
    from ..geometry import ProjectionGeometry

    try:
        ProjectionGeometry.from_view(s)
    except ValueError as e:
        raise _type_error(str(e)) from None
    return s


def _view_list(s: str) -> list[str]:
    """``--views``: comma-separated views, at least one."""
    views = [_view(v.strip()) for v in s.split(",") if v.strip()]
    if not views:
        raise _type_error("needs at least one view (AP, PA, LAT or an angle)")
    return views


def _angle_list(s: str) -> list[float]:
    """``--angles``: comma-separated finite degrees (may be empty)."""
    import math

    try:
        out = _floats(s)
    except ValueError:
        raise _type_error(f"expected comma-separated angles in degrees, got {s!r}") from None
    if not all(math.isfinite(x) for x in out):
        raise _type_error(f"angles must be finite, got {s!r}")
    return out


def _point(s: str) -> list[float]:
    """``--isocenter``: x,y,z in LPS mm."""
    import math

    try:
        p = _floats(s)
    except ValueError:
        p = []
    if len(p) != 3 or not all(math.isfinite(x) for x in p):
        raise _type_error(f"expected three numbers x,y,z (LPS mm), got {s!r}")
    return p


def _shift(s: str) -> list[float]:
    """``--variant-shift-mm``: three distances x,y,z ≥ 0 (mm), or one for all three axes."""
    import math

    try:
        p = _floats(s)
    except ValueError:
        p = []
    p = p * 3 if len(p) == 1 else p
    if len(p) != 3 or not all(math.isfinite(x) and x >= 0 for x in p):
        raise _type_error(f"expected three distances x,y,z ≥ 0 in mm (or one for all), got {s!r}")
    return p


def _shard(s: str) -> str:
    """``--shard K/N`` with 1 ≤ K ≤ N."""
    from ..dataset.builder import parse_shard

    try:
        parse_shard(s)
    except ValueError as e:
        raise _type_error(str(e).removeprefix("--shard ")) from None
    return s



def _build_presets() -> dict:
    """``build-dataset`` options a preset sets: CLI dest → {preset: value} (``dataset.config.PAPER_BUILD``)."""
    from ..dataset.config import PAPER_BUILD, BuildConfig
    from ..structures import DEFAULT_STRUCTURES

    d = BuildConfig()
    fields = {"structures": "structures", "drr_size": "drr_size", "x2b_size": "x2b_size", "points": "n_points",
              "near_surface": "near_surface_fraction", "variants": "variants"}
    table = {}
    for dest, name in fields.items():
        ours = list(DEFAULT_STRUCTURES) if name == "structures" else getattr(d, name)
        paper = PAPER_BUILD[name]
        table[dest] = {"ours": ",".join(ours) if name == "structures" else ours,
                       "paper": ",".join(paper) if name == "structures" else paper}
    return table


def _add_build_args(p: argparse.ArgumentParser) -> None:
    from ..dataset.config import THRESHOLD_HU_RANGE, BuildConfig

    d = BuildConfig()
    pre = _build_presets()
    add_preset_option(p, "the X2BR paper states for its dataset (§3.1, §4: uniform occupancy samples, no "
                      "augmentation; SPIDER's parallel beam needs --beam parallel)")
    g = p.add_argument_group("segmentation")
    g.add_argument("--labels", nargs="+", help="labelmaps (or per-structure mask folders), one per CT in order; "
                   "default: labels.nii.gz / labels_verse.nii.gz / segmentations/ beside each ct.nii.gz")
    g.add_argument("--segmentation", default=d.segmentation, choices=["auto", "labels", "totalsegmentator", "threshold"],
                   help="auto: labels if given, else TotalSegmentator if installed with weights; "
                   "threshold: HU fallback that names no anatomy (default: %(default)s)")
    g.add_argument("--structures", type=_structures, default=argparse.SUPPRESS,
                   help=preset_help(pre, "structures", "TotalSegmentator names and/or groups (ribs, vertebrae, "
                   "cervical, thoracic, lumbar, scapulae, sternum, costal_cartilages, ...), or skeleton: all bone as one "
                   "structure from HU (no table, contrast vessels or spinal canal; the same on labelled and "
                   "unlabelled CTs, needs no labels)"))
    g.add_argument("--label-convention", default=d.label_convention, choices=["totalseg", "verse"],
                   help="label ids of the given labelmaps: TotalSegmentator v2 or VerSe vertebra numbers")
    g.add_argument("--threshold-hu", type=float_in(*THRESHOLD_HU_RANGE, "HU"), default=d.threshold_hu,
                   help="bone threshold of the threshold segmentation, HU")
    g = p.add_argument_group("DRRs and geometry")
    g.add_argument("--views", type=_view_list, default=",".join(d.views), help="named views (AP, PA, LAT) (default: %(default)s)")
    g.add_argument("--angles", type=_angle_list, default="", help="extra views, degrees about the long axis, e.g. -20,-10,10,20")
    g.add_argument("--drr-size", type=positive_int, default=argparse.SUPPRESS, help=preset_help(pre, "drr_size"))
    g.add_argument("--x2b-size", type=positive_int, default=argparse.SUPPRESS, help=preset_help(pre, "x2b_size"))
    g.add_argument("--sdd", type=distance_mm, default=d.sdd, help="source–detector distance, mm (default: %(default)s)")
    g.add_argument("--sod", type=distance_mm, default=d.sod, help="source–isocentre distance, mm (default: %(default)s)")
    g.add_argument("--detector-mm", type=detector_mm, default=d.detector_mm, help="detector width, mm (default: %(default)s)")
    g.add_argument("--box-size", type=box_size, default=d.box_size, help="reconstruction cube edge, mm (default: %(default)s)")
    g.add_argument("--beam", default=d.beam, choices=["cone", "parallel"], help="X-ray beam of the DRRs")
    g.add_argument("--isocenter", default=d.isocenter, choices=["structures", "ct", "thorax"],
                   help="centre of the views and the reconstruction box: the selected bones' centre, the CT's, or "
                   "the lungs' (air inside the body, from HU: the same anatomy on a chest or a whole-body CT)")
    g.add_argument("--no-clahe", action="store_true", help="DRR display without CLAHE (linear window only)")
    g.add_argument("--clahe-clip", type=non_negative_float, default=d.clahe_clip, help="CLAHE clip limit of the DRR display, 0–1")
    g.add_argument("--xray-realism", choices=["on", "off"], default="off",
                   help="radiograph-like variation of each DRR, seeded and recorded in meta.json: patient position "
                   "(geometry moved, labels exact), beam, scatter, quantum noise, blur, window/gamma, collimation, "
                   "L/R markers (default: %(default)s — no measurement yet shows it helps; off under --preset paper)")
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"],
                   help="device that renders the DRRs")
    g.add_argument("--keep-outside-body", action="store_true",
                   help="keep what lies outside the body outline (couch, head rest, blankets, tubes) in the DRRs, "
                   "meshes and targets as scanned (default: set it to air, -1024 HU, and drop its labels: a "
                   "radiograph of a standing patient has no couch)")
    g = p.add_argument_group("meshes, samples, targets")
    g.add_argument("--smoothing", type=float_in(0.0, 1.0), default=d.mesh_smoothing, metavar="FACTOR",
                   help="surface smoothing factor 0–1 as in 3D Slicer's closed surfaces: windowed sinc, 20 iterations, "
                   "pass band 10^(-4·factor), volume kept (default: %(default)s; Slicer's default 0.5 thins ribs a few "
                   "voxels across; 0 = off). Slice steps are removed before, by interpolating between slices")
    g.add_argument("--points", type=positive_int, default=argparse.SUPPRESS,
                   help=preset_help(pre, "points", "occupancy samples per case"))
    g.add_argument("--near-surface", type=probability, default=argparse.SUPPRESS,
                   help=preset_help(pre, "near_surface", "fraction of the samples drawn near the surface, the rest "
                                    "uniform in the box"))
    g.add_argument("--spider-grid", type=positive_int, default=d.spider_grid, help="SPIDER target grid, voxels per side of the box")
    g.add_argument("--variants", type=non_negative_int, default=argparse.SUPPRESS,
                   help=preset_help(pre, "variants", "extra deformed cases per CT (anatomical augmentation)"))
    g.add_argument("--variant-scale", type=float_in(0.0, 0.5), default=d.variant_scale, metavar="S",
                   help="each variant's body size: scale 1 ± S drawn per axis (default: %(default)s; e.g. 0.15 for "
                   "patients of other builds)")
    g.add_argument("--variant-rotation", type=float_in(0.0, 30.0, "degrees"), default=d.variant_rotation_deg,
                   metavar="DEG", help="each variant's rotation, ± DEG about each axis (default: %(default)s)")
    g.add_argument("--variant-shift-mm", type=_shift, default=",".join(f"{x:g}" for x in d.variant_shift_mm),
                   metavar="X,Y,Z", help="each variant's place in the reconstruction box: its isocentre moves by up "
                   "to ± X (left–right), Y (front–back: the AP view's depth), Z (head–foot) mm, seeded and recorded "
                   "in meta.json as box_shift_mm (default: %(default)s; e.g. 15,25,15). The isocentre is found again "
                   "on each deformed CT, so this, not the deformation, moves the patient in the box")
    g.add_argument("--seed", help="random seed of the occupancy samples, variants and DRR realism", type=non_negative_int, default=0)
    _add_split_by(p)


def _add_split_by(p) -> None:
    p.add_argument("--split-by", choices=["auto", "patient", "variant"], default=None,
                   help="how splits/ divides the cases: auto (default of a new dataset) — whole CTs per split with ≥ 3 "
                   "CTs, else by variant; patient — whole CTs (needs ≥ 3); variant — every CT's scan trains, its "
                   "highest-numbered variants validate, no test split (all patients train, e.g. a leave-one-patient-out "
                   "fold whose test is another dataset). "
                   "Recorded in manifest.json; left out, a dataset keeps its recorded choice")


def _config_from_args(a):
    from ..dataset.config import BuildConfig

    apply_preset(a, _build_presets())
    return BuildConfig(
        preset=a.preset,
        structures=a.structures,
        label_convention=a.label_convention,
        segmentation=a.segmentation,
        threshold_hu=a.threshold_hu,
        views=a.views,
        angles=a.angles,
        drr_size=a.drr_size,
        x2b_size=a.x2b_size,
        sdd=a.sdd,
        sod=a.sod,
        detector_mm=a.detector_mm,
        box_size=a.box_size,
        beam=a.beam,
        isocenter=a.isocenter,
        clahe=not a.no_clahe,
        clahe_clip=a.clahe_clip,
        xray_realism=a.xray_realism == "on",
        device=a.device,
        keep_outside_body=a.keep_outside_body,
        mesh_smoothing=a.smoothing,
        n_points=a.points,
        near_surface_fraction=a.near_surface,
        spider_grid=a.spider_grid,
        variants=a.variants,
        seed=a.seed,
        variant_scale=a.variant_scale,
        variant_rotation_deg=a.variant_rotation,
        variant_shift_mm=a.variant_shift_mm,
    )


def cmd_build_dataset(a) -> int:
    from ..dataset.builder import build_dataset, discover, parse_shard

    config = _config_from_args(a)
    cases = discover(a.ct, a.labels)
    if a.label_convention != "totalseg":
        for c in cases:
            c.label_convention = c.label_convention or a.label_convention
    print(f"{len(cases)} CT(s) → {len(cases) * (1 + config.variants)} case(s) into {a.out}", file=sys.stderr)
    def line(res, done, total):
        if a.progress_lines:  # machine-readable, for the Slicer panel and job schedulers
            reason = f" {res.reason}" if res.reason else ""
            print(f"X2RECON_PROGRESS {done}/{total} {res.case_id} {res.status}{reason}", flush=True)

    summary = build_dataset(
        cases, a.out, config, workers=a.workers, shard=parse_shard(a.shard), dask=a.dask,
        progress=not a.quiet, on_case=line, wait=a.wait, split_by=a.split_by,
    )
    print(summary.text())
    print(f"manifest: {Path(a.out) / 'manifest.json'}")
    # exit 1 only when nothing could be built (a batch with some bad scans still succeeds)
    built = summary.done or summary.skipped
    return 0 if built or not summary.failed or a.allow_failures else 1


def cmd_drr(a) -> int:
    from dataclasses import replace

    from ..geometry import ProjectionGeometry
    from ..io.volume import read_ct

    ct = read_ct(a.ct)  # refused inputs (too large, not HU) fail before torch is imported
    if a.geometry:
        geom = ProjectionGeometry.from_json(a.geometry)
    else:
        iso = ct.corners_world().mean(axis=0) if a.isocenter is None else a.isocenter
        geom = ProjectionGeometry.from_view(a.view, iso, sdd=a.sdd, sod=a.sod, size=(a.size, a.size),
                                            detector_mm=a.detector_mm, kind=a.beam)
        if a.isocenter is None:  # recorded, so reconstruct can say when a model's box was centred otherwise
            geom = replace(geom, isocenter_mode="ct")
    from ..drr.render import render_drr, write_drr

    img = render_drr(ct, geom, device=a.device, clahe=not a.no_clahe)
    out = Path(a.out)
    stem = out.name.removesuffix(".png")
    files = write_drr(img, out.parent, stem)
    print("\n".join(str(f) for f in files))
    return 0


def cmd_manifest(a) -> int:
    from ..dataset.builder import write_manifest

    m = write_manifest(a.dataset, wait=a.wait, split_by=a.split_by)
    print(f"{m['counts']['done']} done, {m['counts']['failed']} failed; splits {m['splits']}")
    for p in m["problems"]:
        print(f"  WARNING {p}", file=sys.stderr)
    for r in m["cases"]:
        if r["status"] == "failed":
            print(f"  FAILED {r['case_id']}: {r['reason']}")
    return 0


def add_parsers(sub) -> None:
    from ..geometry import CHEST_DEFAULTS

    b = sub.add_parser(
        "build-dataset",
        help="CT scans → dataset (segmentation, meshes, occupancy samples, DRRs, box labels, SPIDER targets)",
        description="Build a training dataset from CT scans. Each case gets watertight bone meshes (LPS mm and "
        "normalised box), 100k occupancy samples, DRRs per view (512² and 224², 16-bit PNG + geometry JSON), "
        "YOLO box labels and SPIDER targets. Resumable: run the same command again after an interruption.",
    )
    b.add_argument("--ct", nargs="+", required=True, help="CT files, folders (case folders with ct.nii.gz, CT files, "
                   "a DICOM series) or .txt lists (one CT per line, optional TAB labelmap)")
    b.add_argument("--out", required=True, type=output_dir, help="dataset folder")
    b.add_argument("--workers", type=positive_int, default=1, help="cases built in parallel on this machine")
    b.add_argument("--shard", type=_shard, help="K/N: build only the K-th of N shards (SLURM job arrays); run 'x2recon manifest' after")
    b.add_argument("--dask", metavar="ADDRESS", help="run the cases on a Dask cluster (scheduler address)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--progress-lines", action="store_true",
                   help="print one 'X2RECON_PROGRESS done/total case status [reason]' line per finished case")
    b.add_argument("--allow-failures", action="store_true", help="exit 0 even if every case failed")
    b.add_argument("--wait", action="store_true", help="if another build or manifest holds the dataset, wait for "
                   "it instead of stopping (the dataset takes one writer at a time; shards share it)")
    _add_build_args(b)
    b.set_defaults(func=cmd_build_dataset)

    d = sub.add_parser("drr", help="render one DRR from a CT", description="Render a DRR (exact Siddon ray tracing) "
                       "of a CT as a 16-bit PNG with its geometry JSON and raw line integrals.")
    d.add_argument("--ct", required=True, help="CT: NIfTI, NRRD, MHA file or a DICOM series folder")
    d.add_argument("--out", required=True, type=output_file, help="output PNG path")
    d.add_argument("--view", type=_view, default="AP", help="AP, PA, LAT or an angle in degrees (default: %(default)s)")
    d.add_argument("--geometry", help="a geometry JSON to use instead of --view")
    d.add_argument("--isocenter", type=_point, help="x,y,z LPS mm (default: CT centre)")
    d.add_argument("--size", type=positive_int, default=CHEST_DEFAULTS["size"][0], help="detector pixels per side")
    d.add_argument("--sdd", type=distance_mm, default=CHEST_DEFAULTS["sdd"], help="source–detector distance, mm")
    d.add_argument("--sod", type=distance_mm, default=CHEST_DEFAULTS["sod"], help="source–isocentre distance, mm")
    d.add_argument("--detector-mm", type=detector_mm, default=CHEST_DEFAULTS["detector_mm"], help="detector width, mm")
    d.add_argument("--beam", default="cone", choices=["cone", "parallel"], help="X-ray beam")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device that renders the DRR")
    d.add_argument("--no-clahe", action="store_true", help="no CLAHE (linear window only)")
    d.set_defaults(func=cmd_drr)

    m = sub.add_parser("manifest", help="re-aggregate a dataset's manifest/splits/dataset.yaml (after shards)")
    m.add_argument("dataset", help="dataset folder (x2recon build-dataset --out)")
    m.add_argument("--wait", action="store_true", help="wait for a build that holds the dataset instead of stopping")
    _add_split_by(m)
    m.set_defaults(func=cmd_manifest)
