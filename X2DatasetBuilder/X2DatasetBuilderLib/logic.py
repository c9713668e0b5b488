"""X2DatasetBuilderLogic: CT volume node (+ labels) → DRR preview node, dataset case, bone model.

MRML in, MRML out; imports no Qt and nothing that needs the Slicer application, so it runs (and
is tested) with the real MRML of the ``slicer-core`` wheel.  Heavy parts of x2recon (torch, the
DRR renderer, the pipeline) are imported on first use, never when the module loads.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from .mrml_io import (
    drr_to_volume_node,
    load_model_node,
    segmentation_to_labelmap_volume,
    volume_node_to_volume,
)

#: Lines the CLI prints with ``--progress-lines`` (parsed by the panel while a folder builds).
PROGRESS_RE = re.compile(r"^X2RECON_PROGRESS (\d+)/(\d+) (\S+) (\w+)(?: (.*))?$")


class X2DatasetBuilderLogic:
    def __init__(self, scene):
        self.scene = scene

    # ------------------------------------------------------------------ inputs
    def labels_from_node(self, labels_node, ct_node):
        """A labelmap volume node (TotalSegmentator ids) or a segmentation node → ``Volume``."""
        if labels_node is None:
            return None
        if labels_node.IsA("vtkMRMLSegmentationNode"):
            vol, unknown = segmentation_to_labelmap_volume(labels_node, ct_node, self.scene)
            if unknown:
                print(f"X2DatasetBuilder: segments without a TotalSegmentator name ignored: {unknown}", file=sys.stderr)
            return vol
        if labels_node.IsA("vtkMRMLVolumeNode"):
            return volume_node_to_volume(labels_node)
        raise ValueError(f"{labels_node.GetName()!r} is neither a labelmap volume nor a segmentation")

    # ------------------------------------------------------------------ DRR preview
    def preview_drr(self, ct_node, view: str = "AP", config=None, name: str | None = None):
        """Render the DRR of ``view`` around the CT's centre and add it as a volume node."""
        from x2recon.dataset.config import BuildConfig
        from x2recon.drr.render import render_drr

        config = config or BuildConfig()
        ct = volume_node_to_volume(ct_node)
        geom = config.geometry(view, ct.corners_world().mean(axis=0))
        drr = render_drr(ct, geom, device=config.device, clahe=config.clahe, clahe_clip=config.clahe_clip)
        return drr_to_volume_node(drr, self.scene, name or f"{ct_node.GetName()}_DRR_{geom.name}")

    # ------------------------------------------------------------------ one case
    def build_case(self, ct_node, labels_node, out_dir, config=None, case_id: str | None = None,
                   progress=None, cancel=None):
        """Build one dataset case from nodes; returns ``(CaseResult, model node or None)``.

        The bone model (meshes/bones.ply, LPS mm) is loaded into the scene in RAS.
        """
        from x2recon.dataset.case import build_case
        from x2recon.dataset.config import BuildConfig

        config = config or BuildConfig()
        ct = volume_node_to_volume(ct_node)
        labels = self.labels_from_node(labels_node, ct_node)
        if labels is None and config.segmentation == "labels":
            raise ValueError("choose a labelmap or segmentation node, or another segmentation source")
        cid = case_id or re.sub(r"[^A-Za-z0-9_.-]+", "_", ct_node.GetName()) or "case"
        res = build_case(ct, Path(out_dir) / "cases", labels=labels, config=config, case_id=cid,
                         progress=progress, cancel=cancel)
        model = None
        if res.status == "done":
            model = load_model_node(res.case_dir / "meshes" / "bones.ply", self.scene, f"{cid}_bones")
        return res, model

    # ------------------------------------------------------------------ many cases (background process)
    @staticmethod
    def build_folder_command(in_dir, out_dir, workers: int = 1, extra_args: list[str] | None = None,
                             python: str | None = None) -> list[str]:
        """The ``x2recon build-dataset`` command the panel runs as a background process."""
        return [python or sys.executable, "-m", "x2recon.cli", "build-dataset", "--ct", str(in_dir),
                "--out", str(out_dir), "--workers", str(int(workers)), "--progress-lines", "--quiet",
                *(extra_args or [])]

    @staticmethod
    def parse_progress_line(line: str):
        """``(done, total, case_id, status, reason)`` from a progress line, else ``None``."""
        m = PROGRESS_RE.match(line.strip())
        if not m:
            return None
        return int(m.group(1)), int(m.group(2)), m.group(3), m.group(4), m.group(5)
