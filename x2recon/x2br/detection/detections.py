"""Detections: a class name, a confidence and a box in an X-ray's pixel grid (no ultralytics here).

Boxes use the pixel convention of ``ProjectionGeometry`` and ``x2recon.drr.boxes.Box``: continuous
``(col, row)`` with the centre of pixel ``[r, c]`` at ``(c, r)``, so a ``W × H`` image spans
``[-½, W - ½] × [-½, H - ½]``.  (ultralytics' pixel coordinates start at the image's left edge:
ours = theirs − ½.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...drr.boxes import PixelBox
from ...errors import X2ReconInputError
from ...io.atomic import atomic_write_text
from ...io.documents import read_document

DETECTIONS_FORMAT = "x2recon.detections/1"


@dataclass(frozen=True)
class Detection(PixelBox):
    """One detected structure: ``name`` is a detector class — a group (``thoracic``, ``ribs``…) or
    a TotalSegmentator name (``vertebrae_T7``) — ``confidence`` in [0, 1], box in pixels."""

    name: str
    confidence: float
    x0: float
    y0: float
    x1: float
    y1: float
    class_id: int = -1

    @property
    def box(self) -> np.ndarray:
        return np.array([self.x0, self.y0, self.x1, self.y1], dtype=np.float64)

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2])

    def renamed(self, name: str) -> "Detection":
        return Detection(name, self.confidence, self.x0, self.y0, self.x1, self.y1, self.class_id)

    @classmethod
    def from_dict(cls, d: dict) -> "Detection":
        return cls(str(d["name"]), float(d["confidence"]), float(d["x0"]), float(d["y0"]), float(d["x1"]),
                   float(d["y1"]), int(d.get("class_id", -1)))


def detections_from_boxes(boxes, classes: str | list[str] | None = None) -> list[Detection]:
    """Ground-truth ``x2recon.drr.boxes.Box`` es as detections (confidence 1).

    ``classes``: ``None``/``"structures"`` keeps each structure's name; ``"groups"`` renames to the
    paper's groups (cervical, thoracic, lumbar, ribs) as the dataset's labels are; a list keeps the
    boxes whose name or group is in it, named as in the list.  Boxes without a class are left out.
    """
    from ...drr.boxes import GROUP_CLASSES, class_of

    out = []
    for b in boxes:
        if b.width <= 0 or b.height <= 0:
            continue
        if classes is None or classes == "structures":
            name, cid = b.name, int(b.label)
        else:
            cl = list(GROUP_CLASSES) if classes == "groups" else list(classes)
            cid = class_of(b.name, cl)
            if cid is None:
                continue
            name = cl[cid]
        out.append(Detection(name, 1.0, float(b.x0), float(b.y0), float(b.x1), float(b.y1), cid))
    return out


def box_iou(a, b) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def write_detections(detections: list[Detection], path: str | Path, *, image: str | None = None,
                     size: tuple[int, int] | None = None, weights: str | None = None, extra: dict | None = None) -> Path:
    """``boxes.json``: the detections with the image they belong to (atomic); ``extra``: more top-level
    keys (X2BR's part checks and coverage, ``X2BRResult.report``)."""
    path = Path(path)
    doc = {
        "format": DETECTIONS_FORMAT,
        "image": image,
        "image_size": None if size is None else [int(size[0]), int(size[1])],
        "weights": weights,
        "coordinates": "pixels (col, row) of the X-ray; centre of pixel [r, c] at (c, r)",
        "detections": [d.to_dict() for d in detections],
        **(extra or {}),
    }
    atomic_write_text(path, json.dumps(doc, indent=1))
    return path


def read_detections(path: str | Path) -> list[Detection]:
    path = Path(path)
    if not path.is_file():
        raise X2ReconInputError(path, "detections file not found")
    doc = read_document(path, DETECTIONS_FORMAT, "detections file")
    return [Detection.from_dict(d) for d in doc["detections"]]
