"""X2BR's rows in an X2B evaluation (paper Tables 1–3): each X2B reconstruction refined with the template
library by one registration method, from a detector's boxes or each case's ground-truth boxes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable

#: ``detector`` value that uses each case's ground-truth boxes (projected from its segmentation)
#: instead of a detector: X2BR's registration scored on its own (Table 3), free of detection errors.
GROUND_TRUTH = "ground-truth"


def ground_truth_detections(case_folder: Path, view: str, size: tuple[int, int] | None = None) -> list:
    """The case's boxes of ``view`` (``labels/<view>.json``, in the full DRR's pixels) as detections of the
    paper's group classes, rescaled to an image of ``size`` (W, H) — e.g. the network's input."""
    from ..drr.boxes import Box
    from ..geometry import ProjectionGeometry
    from .detection.detections import detections_from_boxes

    boxes = [Box(**b) for b in json.loads((case_folder / "labels" / f"{view}.json").read_text())]
    dets = detections_from_boxes(boxes, "groups")
    if size is None:
        return dets
    W0, H0 = ProjectionGeometry.from_json(case_folder / "images" / f"{view}.json").size
    sx, sy = size[0] / W0, size[1] / H0
    fx = lambda c: (c + 0.5) * sx - 0.5  # pixel centres at integers (ProjectionGeometry's convention)
    fy = lambda r: (r + 0.5) * sy - 0.5
    return [type(d)(d.name, d.confidence, fx(d.x0), fy(d.y0), fx(d.x1), fy(d.y1), d.class_id) for d in dets]


class TemplateRefiner:
    """X2BR with one registration method: a refiner for ``x2b.evaluate.evaluate_model``."""

    def __init__(self, method: str, detector, library, device: str, cancel: Callable[[], bool] | None):
        self.method, self.detector, self.library, self.device, self.cancel = method, detector, library, device, cancel
        self.name, self.label = f"x2br_{method}", f"X2BR ({method.upper()})"

    def __call__(self, mesh, xrays: list, folder: Path, views: tuple[str, ...]):
        from .refine import refine_with_template

        dets = self.detector if self.detector is not None else \
            ground_truth_detections(folder, views[0], tuple(xrays[0].image.shape[::-1]))
        res = refine_with_template(mesh, xrays[0], dets, self.library, method=self.method,
                                   device=self.device, cancel=self.cancel)
        if res.rejected:  # the row scores the parts that passed refine's checks: say which did not
            warnings.warn(f"{folder.name} {'+'.join(views)}: {self.label} left out {len(res.rejected)} of "
                          f"{len(res.checks)} registered parts as implausible ({', '.join(res.rejected)}); its row "
                          "scores the rest", stacklevel=2)
        return res.mesh, sum(res.seconds.values())


def template_refiners(detector: str | Path, templates: str | Path, methods: list[str], device: str = "auto",
                      cancel: Callable[[], bool] | None = None) -> list[TemplateRefiner]:
    """One refiner per registration method, sharing one detector (or ``GROUND_TRUTH``) and one library."""
    from ..nn.device import resolve_device
    from .template import load_library

    library = load_library(templates)
    det = None
    if str(detector) != GROUND_TRUTH:
        from .detection import Detector

        det = Detector(detector)
    dev = str(resolve_device(device))
    return [TemplateRefiner(m, det, library, dev, cancel) for m in methods]
