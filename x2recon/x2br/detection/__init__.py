"""Bone detection on X-rays: YOLOv9 (ultralytics) trained offline on the dataset's DRRs and boxes.

``Detection`` and the boxes-file helpers import nothing heavy; ``train_detector``, ``Detector`` and
``import_ultralytics`` load ultralytics on first use, always through
``x2recon.x2br.detection.offline.import_ultralytics`` (offline environment set before the import).
"""

from __future__ import annotations

from .detections import Detection, box_iou, detections_from_boxes, read_detections, write_detections

__all__ = ["Detection", "Detector", "box_iou", "detections_from_boxes", "import_ultralytics", "read_detections",
           "train_detector", "write_detections", "to_uint8", "DEFAULT_MODEL"]


def __getattr__(name):
    if name in ("Detector", "train_detector", "to_uint8", "DEFAULT_MODEL", "stage_dataset", "export_weights",
                "read_detector_config"):
        from . import yolo

        return getattr(yolo, name)
    if name == "import_ultralytics":
        from .offline import import_ultralytics

        return import_ultralytics
    raise AttributeError(f"module 'x2recon.x2br.detection' has no attribute {name!r}")
