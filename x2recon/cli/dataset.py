"""``x2recon build-dataset``, ``drr`` and ``manifest``: CT scans → training data (registered by ``x2recon.cli``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import floats as _floats
from .common import output_dir, output_file

def _add_build_args(p: argparse.ArgumentParser) -> None:
    from ..dataset.config import BuildConfig
    from ..structures import DEFAULT_STRUCTURES

    d = BuildConfig()
    g = p.add_argument_group("segmentation")
    g.add_argument("--labels", nargs="+", help="labelmaps (or per-structure mask folders), one per CT in order; "
                   "default: labels.nii.gz / labels_verse.nii.gz / segmentations/ beside each ct.nii.gz")
    g.add_argument("--segmentation", default=d.segmentation, choices=["auto", "labels", "totalsegmentator", "threshold"],
                   help="auto: labels if given, else TotalSegmentator if installed with weights; "
                   "threshold: HU fallback that names no anatomy (default: %(default)s)")
    g.add_argument("--structures", default=",".join(DEFAULT_STRUCTURES),
                   help="TotalSegmentator names and/or groups (ribs, vertebrae, cervical, thoracic, lumbar, "
                   "scapulae, sternum, costal_cartilages, ...) (default: %(default)s, the paper's set)")
    g.add_argument("--label-convention", default=d.label_convention, choices=["totalseg", "verse"])
    g.add_argument("--threshold-hu", type=float, default=d.threshold_hu)
    g = p.add_argument_group("DRRs and geometry")
    g.add_argument("--views", default=",".join(d.views), help="named views (AP, PA, LAT) (default: %(default)s)")
    g.add_argument("--angles", default="", help="extra views, degrees about the long axis, e.g. -20,-10,10,20")
    g.add_argument("--drr-size", type=int, default=d.drr_size)
    g.add_argument("--x2b-size", type=int, default=d.x2b_size)
    g.add_argument("--sdd", type=float, default=d.sdd, help="source–detector distance, mm (default: %(default)s)")
    g.add_argument("--sod", type=float, default=d.sod, help="source–isocentre distance, mm (default: %(default)s)")
    g.add_argument("--detector-mm", type=float, default=d.detector_mm, help="detector width, mm (default: %(default)s)")
    g.add_argument("--box-size", type=float, default=d.box_size, help="reconstruction cube edge, mm (default: %(default)s)")
    g.add_argument("--beam", default=d.beam, choices=["cone", "parallel"])
    g.add_argument("--isocenter", default=d.isocenter, choices=["structures", "ct"])
    g.add_argument("--no-clahe", action="store_true")
    g.add_argument("--clahe-clip", type=float, default=d.clahe_clip)
    g.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    g = p.add_argument_group("meshes, samples, targets")
    g.add_argument("--smoothing", type=int, default=d.smoothing_iterations, help="mesh smoothing iterations (0 = off)")
    g.add_argument("--points", type=int, default=d.n_points, help="occupancy samples per case (default: %(default)s)")
    g.add_argument("--near-surface", type=float, default=d.near_surface_fraction, help="fraction of near-surface samples")
    g.add_argument("--spider-grid", type=int, default=d.spider_grid)
    g.add_argument("--variants", type=int, default=0, help="extra deformed cases per CT (anatomical augmentation)")
    g.add_argument("--seed", type=int, default=0)


def _config_from_args(a):
    from ..dataset.config import BuildConfig

    return BuildConfig(
        structures=a.structures,
        label_convention=a.label_convention,
        segmentation=a.segmentation,
        threshold_hu=a.threshold_hu,
        views=[v for v in a.views.split(",") if v.strip()],
        angles=_floats(a.angles),
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
        device=a.device,
        smoothing_iterations=a.smoothing,
        n_points=a.points,
        near_surface_fraction=a.near_surface,
        spider_grid=a.spider_grid,
        variants=a.variants,
        seed=a.seed,
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
        progress=not a.quiet, on_case=line,
    )
    print(summary.text())
    print(f"manifest: {Path(a.out) / 'manifest.json'}")
    # exit 1 only when nothing could be built (a batch with some bad scans still succeeds)
    built = summary.done or summary.skipped
    return 0 if built or not summary.failed or a.allow_failures else 1


def cmd_drr(a) -> int:
    from ..drr.render import render_drr, write_drr
    from ..geometry import ProjectionGeometry
    from ..io.volume import read_ct

    ct = read_ct(a.ct)
    if a.geometry:
        geom = ProjectionGeometry.from_json(a.geometry)
    else:
        iso = ct.corners_world().mean(axis=0) if a.isocenter is None else _floats(a.isocenter)
        geom = ProjectionGeometry.from_view(a.view, iso, sdd=a.sdd, sod=a.sod, size=(a.size, a.size),
                                            detector_mm=a.detector_mm, kind=a.beam)
    img = render_drr(ct, geom, device=a.device, clahe=not a.no_clahe)
    out = Path(a.out)
    stem = out.name.removesuffix(".png")
    files = write_drr(img, out.parent, stem)
    print("\n".join(str(f) for f in files))
    return 0


def cmd_manifest(a) -> int:
    from ..dataset.builder import write_manifest

    m = write_manifest(a.dataset)
    print(f"{m['counts']['done']} done, {m['counts']['failed']} failed; splits {m['splits']}")
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
    b.add_argument("--workers", type=int, default=1, help="cases built in parallel on this machine")
    b.add_argument("--shard", help="K/N: build only the K-th of N shards (SLURM job arrays); run 'x2recon manifest' after")
    b.add_argument("--dask", metavar="ADDRESS", help="run the cases on a Dask cluster (scheduler address)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("--progress-lines", action="store_true",
                   help="print one 'X2RECON_PROGRESS done/total case status [reason]' line per finished case")
    b.add_argument("--allow-failures", action="store_true", help="exit 0 even if every case failed")
    _add_build_args(b)
    b.set_defaults(func=cmd_build_dataset)

    d = sub.add_parser("drr", help="render one DRR from a CT", description="Render a DRR (exact Siddon ray tracing) "
                       "of a CT as a 16-bit PNG with its geometry JSON and raw line integrals.")
    d.add_argument("--ct", required=True)
    d.add_argument("--out", required=True, type=output_file, help="output PNG path")
    d.add_argument("--view", default="AP", help="AP, PA, LAT or an angle in degrees (default: %(default)s)")
    d.add_argument("--geometry", help="a geometry JSON to use instead of --view")
    d.add_argument("--isocenter", help="x,y,z LPS mm (default: CT centre)")
    d.add_argument("--size", type=int, default=CHEST_DEFAULTS["size"][0])
    d.add_argument("--sdd", type=float, default=CHEST_DEFAULTS["sdd"])
    d.add_argument("--sod", type=float, default=CHEST_DEFAULTS["sod"])
    d.add_argument("--detector-mm", type=float, default=CHEST_DEFAULTS["detector_mm"])
    d.add_argument("--beam", default="cone", choices=["cone", "parallel"])
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--no-clahe", action="store_true")
    d.set_defaults(func=cmd_drr)

    m = sub.add_parser("manifest", help="re-aggregate a dataset's manifest/splits/dataset.yaml (after shards)")
    m.add_argument("dataset")
    m.set_defaults(func=cmd_manifest)
