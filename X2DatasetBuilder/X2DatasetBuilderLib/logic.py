"""X2DatasetBuilderLogic: CT volume node (+ labels) → DRR preview node, dataset case, bone model.

MRML in, MRML out; imports no Qt and nothing that needs the Slicer application, so it runs (and
is tested) with the real MRML of the ``slicer-core`` wheel.  Nodes are read and written through
``x2recon.slicer.mrml`` (the project's one RAS ↔ LPS boundary).  Heavy parts of x2recon (torch, the
DRR renderer, the pipeline) are imported on first use, never when the module loads.  The folder
mode's background process is described here too (command line, progress lines); the panel runs
it with ``x2recon.slicer.process`` (line buffer, process-tree kill).
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from x2recon.slicer.mrml import (
    drr_to_volume_node,
    load_model_node,
    segmentation_to_labelmap_volume,
    volume_node_to_volume,
)

log = logging.getLogger(__name__)

#: Lines the CLI prints with ``--progress-lines`` (parsed by the panel while a folder builds).
PROGRESS_RE = re.compile(r"^X2RECON_PROGRESS (\d+)/(\d+) (\S+) (\w+)(?: (.*))?$")

#: BuildConfig field → ``x2recon build-dataset`` option.  Booleans are written as their "off" flag.
_CLI_OPTIONS = {
    "structures": "--structures",
    "label_convention": "--label-convention",
    "segmentation": "--segmentation",
    "threshold_hu": "--threshold-hu",
    "views": "--views",
    "angles": "--angles",
    "drr_size": "--drr-size",
    "x2b_size": "--x2b-size",
    "sdd": "--sdd",
    "sod": "--sod",
    "detector_mm": "--detector-mm",
    "box_size": "--box-size",
    "beam": "--beam",
    "isocenter": "--isocenter",
    "clahe": "--no-clahe",
    "clahe_clip": "--clahe-clip",
    "device": "--device",
    "mesh_smoothing": "--smoothing",
    "n_points": "--points",
    "near_surface_fraction": "--near-surface",
    "spider_grid": "--spider-grid",
    "variants": "--variants",
    "seed": "--seed",
    "preset": "--preset",
    "xray_realism": "--xray-realism",  # on|off
    "keep_outside_body": "--keep-outside-body",  # a flag that switches on (False is the default)
    "variant_scale": "--variant-scale",
    "variant_rotation_deg": "--variant-rotation",
    "variant_shift_mm": "--variant-shift-mm",
}
#: Boolean settings whose option switches them on (the others' options switch them off, e.g. --no-clahe).
_FLAGS_ON = {"keep_outside_body"}


def config_to_cli_args(config) -> list[str]:
    """The ``build-dataset`` options that reproduce ``config`` (``--preset`` first, then only the settings
    that differ from that preset's values).

    Raises ``ValueError`` for a changed setting that has no command-line option, so a folder build
    never silently runs with other settings than the panel shows.
    """
    from x2recon.dataset.config import BuildConfig

    default = BuildConfig.from_preset(config.preset).to_dict()
    args: list[str] = [] if config.preset == "ours" else [f"--preset={config.preset}"]
    for key, value in config.to_dict().items():
        if value == default[key]:
            continue
        opt = _CLI_OPTIONS.get(key)
        if opt is None:
            raise ValueError(f"build setting {key!r} = {value!r} has no x2recon build-dataset option")
        if key == "xray_realism":
            args.append(f"{opt}={'on' if value else 'off'}")
        elif isinstance(value, bool) and key in _FLAGS_ON:
            if not value:
                raise ValueError(f"build setting {key!r} cannot be switched off from the command line")
            args.append(opt)
        elif isinstance(value, bool):
            if value:  # only the "off" flag exists (--no-clahe); True is the default
                raise ValueError(f"build setting {key!r} cannot be switched on from the command line")
            args.append(opt)
        elif isinstance(value, (list, tuple)):  # "--opt=v" keeps "-20.0,10.0" from reading as an option
            args.append(f"{opt}=" + ",".join(repr(v) if isinstance(v, float) else str(v) for v in value))
        else:
            args.append(f"{opt}={value!r}" if isinstance(value, float) else f"{opt}={value}")
    return args


class X2DatasetBuilderLogic:
    """Nodes of ``scene`` → x2recon calls → nodes added to ``scene``."""

    def __init__(self, scene):
        self.scene = scene

    # ------------------------------------------------------------------ inputs
    def segmentation_to_labelmap(self, labels_node, reference_node):
        """A labelmap volume node (TotalSegmentator ids) or a segmentation node → ``Volume`` (or ``None``).

        Segmentation nodes are exported on ``reference_node``'s grid with segment names mapped to
        TotalSegmentator ids; segments without such a name are logged and left out.
        """
        if labels_node is None:
            return None
        if labels_node.IsA("vtkMRMLSegmentationNode"):
            vol, unknown = segmentation_to_labelmap_volume(labels_node, reference_node, self.scene)
            if unknown:
                log.warning("X2DatasetBuilder: segments without a TotalSegmentator name left out: %s", unknown)
            return vol
        if labels_node.IsA("vtkMRMLVolumeNode"):
            return volume_node_to_volume(labels_node)
        raise ValueError(f"{labels_node.GetName()!r} is neither a labelmap volume nor a segmentation")

    # ------------------------------------------------------------------ DRR preview
    def preview_isocenter(self, ct, labels, config):
        """Where the dataset's views will look: the selected structures' centre when labels are
        given and ``config.isocenter == "structures"``, else the CT centre (LPS mm)."""
        if labels is not None and config.isocenter == "structures":
            from x2recon.dataset.case import isocenter_of
            from x2recon.dataset.config import BuildConfig
            from x2recon.dataset.segmentation import segment

            cfg = BuildConfig.from_dict({**config.to_dict(), "segmentation": "labels"})
            seg, _, _ = segment(ct, labels, cfg)
            return isocenter_of(seg, ct, cfg)
        return ct.corners_world().mean(axis=0)

    def preview_drr(self, ct_node, view: str = "AP", config=None, labels_node=None, name: str | None = None):
        """Render the DRR of ``view`` as the build will (nothing outside the body unless ``config`` keeps it) and
        add it as a single-slice volume node on the detector plane."""
        from x2recon.dataset.config import BuildConfig
        from x2recon.drr.render import render_drr

        config = config or BuildConfig()
        ct = volume_node_to_volume(ct_node)
        labels = self.segmentation_to_labelmap(labels_node, ct_node)
        if not config.keep_outside_body:  # what the build will render: nothing outside the body
            from x2recon.dataset.skeleton import clear_outside_body

            ct = clear_outside_body(ct)[0]
        geom = config.geometry(view, self.preview_isocenter(ct, labels, config))
        drr = render_drr(ct, geom, device=config.device, clahe=config.clahe, clahe_clip=config.clahe_clip)
        return drr_to_volume_node(drr, self.scene, name or f"{ct_node.GetName()}_DRR_{geom.name}")

    # ------------------------------------------------------------------ one case
    def build_case(self, ct_node, labels_node, out_dir, config=None, case_id: str | None = None,
                   progress=None, cancel=None):
        """Build one dataset case into ``out_dir/cases/<case_id>``; returns ``(CaseResult, model node or None)``.

        The bone model (meshes/bones.ply, LPS mm) is loaded into the scene in RAS.  ``progress(f, msg)``
        and ``cancel() -> bool`` are passed to the pipeline (cancel raises ``CancelledError``).
        """
        from x2recon.dataset.case import build_case
        from x2recon.dataset.config import BuildConfig

        config = config or BuildConfig()
        ct = volume_node_to_volume(ct_node)
        labels = self.segmentation_to_labelmap(labels_node, ct_node)
        if labels is None and config.segmentation == "labels":
            raise ValueError("choose a labelmap or segmentation node, or another segmentation source")
        cid = case_id or re.sub(r"[^A-Za-z0-9_.-]+", "_", ct_node.GetName()).strip("_") or "case"
        res = build_case(ct, Path(out_dir) / "cases", labels=labels, config=config, case_id=cid,
                         progress=progress, cancel=cancel)
        model = None
        if res.status in ("done", "skipped"):
            model = load_model_node(res.case_dir / "meshes" / "bones.ply", self.scene, f"{cid}_bones")
        return res, model

    # ------------------------------------------------------------------ many cases (background process)
    @staticmethod
    def build_folder_command(in_dir, out_dir, config=None, workers: int = 1, python: str | None = None) -> list[str]:
        """The ``x2recon build-dataset`` command the panel runs as a background process.

        ``python`` is the interpreter (Slicer's ``PythonSlicer``); output is one progress line per case.
        """
        args = config_to_cli_args(config) if config is not None else []
        return [python or sys.executable, "-m", "x2recon.cli", "build-dataset", "--ct", str(in_dir),
                "--out", str(out_dir), "--workers", str(int(workers)), "--progress-lines", "--quiet", *args]

    @staticmethod
    def parse_progress_line(line: str):
        """``(done, total, case_id, status, reason)`` from a progress line, else ``None``."""
        m = PROGRESS_RE.match(line.strip())
        if not m:
            return None
        return int(m.group(1)), int(m.group(2)), m.group(3), m.group(4), m.group(5)
