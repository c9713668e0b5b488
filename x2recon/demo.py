"""``x2recon demo``: the whole bone pipeline on the bundled data, on CPU, in a few minutes.

It builds one case from the sample chest CT — an anatomical variant (a random smooth deformation
of the CT and its labels, seeded by a variant number the demo model never trained on) — renders its
AP X-ray, reconstructs the bones from that X-ray with a bundled model (default ``skeleton``), scores the mesh
against the case's ground-truth bone mesh, and writes the mesh, a PNG rendering coloured by the
distance to ground truth, and the metrics (``metrics.json``) beside the X-ray; the case it built stays
in ``cases/``.

The default model is the bundled ``skeleton`` model (``resources.DEFAULT_BONE_MODEL``): a light backbone
trained on two patients' CTs and their deformed copies (``training/cross_patient.py --bundle``), chosen
over the ribs + vertebrae ``demo`` model because its recipe did better on a patient it never saw.  It
shows the pipeline, not clinical accuracy.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .errors import X2ReconInputError
from .resources import DEMO_MODEL, bundled_model  # noqa: F401  (re-exported: the demo's model)

DEMO_VARIANT = 90  # the bundled models saw variants 1–15 at most; 90 is a deformation none of them saw


def model_note(model_path) -> str:
    """One line saying what the demo's model is: for a bundled one, from its card (alias, training patients,
    not clinical); for any other file, that no card describes it."""
    from .resources.registry import alias_of, card

    alias = alias_of(model_path)
    if alias is None:
        return f"(model {model_path}: not a bundled model, so no card says what it was trained on)"
    patients = card(alias)["trained_on"]["patients"]
    whom = "one patient's CT" if len(patients) == 1 else f"{len(patients)} patients' CTs"
    return (f"(the bundled '{alias}' model: a research model trained on {whom} ({', '.join(patients)}), "
            f"not a clinical model; 'x2recon info {alias}' shows its card)")


def run_demo(out: str | Path = "x2recon-demo", *, model: str | Path | None = None, data: str | Path | None = None,
             case: str = "chest_lidc0001_half", variant: int = DEMO_VARIANT, view: str = "AP",
             resolution: int = 256, device: str = "auto", watertight: bool = True, log=print) -> dict:
    """Run the demo; returns the metrics and the paths written.  ``data``: a folder holding ``case/``
    (default: the copy bundled in the package, ``x2recon.sample_data.case_dir``)."""
    from .dataset.case import CaseInput, build_case
    from .dataset.config import BuildConfig
    from .dataset.torch_data import load_view
    from .io.mesh import read_mesh, write_mesh
    from .mesh.render import render_png
    from .metrics.mesh import mesh_metrics, vertex_distances
    from .nn.checkpoint import load_model
    from .x2b.reconstruct import reconstruct, resolve_device
    from .sample_data import case_dir

    t0 = time.time()
    out = Path(out)
    model_path = Path(model) if model else bundled_model()
    dev = resolve_device(device)
    net, cfg = load_model(model_path, dev, network=("x2b", "x2b2"))
    src = case_dir(case, data)
    ct, labels = src / "ct.nii.gz", src / "labels.nii.gz"
    build = dict(cfg.get("dataset", {}).get("build") or {})
    if not build:
        raise X2ReconInputError(model_path, "the checkpoint does not record its dataset's build settings")
    build.update(views=[view], angles=[], variants=0)
    config = BuildConfig.from_dict(build)
    case_id = f"{case}_v{variant:02d}"
    log(f"[1/4] building case {case_id} from {src} (a deformation the model never saw) …")
    res = build_case(CaseInput(case_id, str(ct), str(labels) if labels.is_file() else None, None, variant),
                     out / "cases", config=config)
    if res.status == "failed":
        raise X2ReconInputError(src, f"building the demo case failed: {res.reason}")
    folder = out / "cases" / case_id
    xray = load_view(folder, view, net.cfg.image_size)
    src_png = folder / "images" / f"{view}.png"
    xray_png, xray_json = out / f"xray_{view}.png", out / f"xray_{view}.json"
    shutil.copyfile(src_png, xray_png)
    shutil.copyfile(folder / "images" / f"{view}.json", xray_json)
    log(f"[2/4] reconstructing the bones from {xray_png} at {resolution}³ on {dev} …")
    rec = reconstruct(net, [xray], resolution=resolution, device=dev, watertight=watertight)
    mesh_path = out / f"xray_{view}_bones.stl"
    write_mesh(rec.mesh, mesh_path)
    log(f"      {len(rec.mesh.faces):,} triangles in {rec.seconds:.1f} s "
        f"({rec.evaluations:,} network evaluations, {rec.dense_evaluations / rec.evaluations:.0f}× fewer than a dense grid)")
    log("[3/4] scoring against the CT's ground-truth bones …")
    gt = read_mesh(folder / "meshes" / "bones.ply")
    metrics = mesh_metrics(rec.mesh, gt, n_points=100_000, scale=rec.geometry.box_size).to_dict()
    dist = vertex_distances(rec.mesh.vertices, gt)
    metrics["mean_surface_distance_mm"] = float(dist.mean())
    log("[4/4] rendering …")
    png = out / f"xray_{view}_bones.png"
    try:
        render_png(rec.mesh, png, scalars=dist, scalar_range=(0.0, 10.0), legend="distance to CT bones (mm)",
                   title="X2B demo reconstruction")
    except Exception as e:  # off-screen OpenGL can be missing on a server; the mesh is still written
        log(f"      rendering skipped: {type(e).__name__}: {e}")
        png = None
    summary = {"case": case_id, "view": view, "model": str(model_path), "device": str(dev), "resolution": resolution,
               "metrics": metrics, "reconstruction_seconds": rec.seconds, "total_seconds": time.time() - t0,
               "xray": str(xray_png), "mesh": str(mesh_path), "rendering": str(png) if png else None}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    return summary
