"""Detection labels from geometry: each structure's 2D box in a DRR, YOLO files, dataset yaml.

A box is the extent of the projections of the corners of the structure's boundary voxels, so it
contains the whole projected structure; with the exact geometry no hand annotation is needed
(a deliberate deviation from the paper's Roboflow labelling, see DESIGN.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import X2ReconInputError
from ..io.atomic import atomic_write_text
from ..structures import group_of

#: The paper's detection classes (X2BR §3.2): vertebrae by region, and ribs.
GROUP_CLASSES = ["cervical", "thoracic", "lumbar", "ribs"]


@dataclass
class Box:
    name: str
    label: int
    x0: float
    y0: float
    x1: float
    y1: float
    truncated: bool = False  # part of the structure projects outside the image

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


def _boundary_voxels(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(mask, border_value=0)
    return np.argwhere(mask & ~inner)


_CORNERS = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])


def structure_boxes(seg, names: dict[int, str], geometry) -> list[Box]:
    """Boxes (continuous pixel coordinates, clipped to the image) of every structure in view."""
    from scipy import ndimage

    arr = seg.array
    objs = ndimage.find_objects(arr.astype(np.int32))
    w, h = geometry.size
    boxes = []
    for k, name in sorted(names.items()):
        if k - 1 >= len(objs) or objs[k - 1] is None:
            continue
        sl = objs[k - 1]
        kji = _boundary_voxels(arr[sl] == k) + [s.start for s in sl]
        corners = (kji[:, None, ::-1] + _CORNERS[None]).reshape(-1, 3)  # (i, j, k) voxel corners
        uv = geometry.project(seg.index_to_world(corners))
        # pixel (c, r) covers [c - ½, c + ½]: the image spans [-½, w - ½]
        x0, y0 = uv.min(0)
        x1, y1 = uv.max(0)
        lo_x, lo_y, hi_x, hi_y = -0.5, -0.5, w - 0.5, h - 0.5
        if x1 <= lo_x or y1 <= lo_y or x0 >= hi_x or y0 >= hi_y:
            continue
        cx0, cy0, cx1, cy1 = max(x0, lo_x), max(y0, lo_y), min(x1, hi_x), min(y1, hi_y)
        trunc = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
        boxes.append(Box(name, k, float(cx0), float(cy0), float(cx1), float(cy1), bool(trunc)))
    return boxes


def class_names(mode: str, structures: list[str]) -> list[str]:
    """Detector classes: ``"groups"`` (cervical, thoracic, lumbar, ribs) or ``"structures"``."""
    if mode == "groups":
        return list(GROUP_CLASSES)
    if mode == "structures":
        return list(structures)
    raise ValueError(f"class mode must be 'groups' or 'structures', got {mode!r}")


def class_of(name: str, classes: list[str]) -> int | None:
    if name in classes:
        return classes.index(name)
    g = group_of(name)
    return classes.index(g) if g in classes else None


def write_yolo_labels(boxes: list[Box], classes: list[str], geometry, path: str | Path) -> None:
    """YOLO txt: one ``cls cx cy w h`` line per box, normalised by the image size (atomic)."""
    w, h = geometry.size
    lines = []
    for b in boxes:
        c = class_of(b.name, classes)
        if c is None:
            continue  # e.g. costal cartilages in "groups" mode: no detection class
        cx = (b.x0 + b.x1) / 2 + 0.5
        cy = (b.y0 + b.y1) / 2 + 0.5
        lines.append(f"{c} {cx / w:.6f} {cy / h:.6f} {b.width / w:.6f} {b.height / h:.6f}\n")
    atomic_write_text(path, "".join(lines))


def read_yolo_labels(path: str | Path) -> np.ndarray:
    """(N, 5) array of ``cls cx cy w h``; clear error on malformed files."""
    path = Path(path)
    if not path.is_file():
        raise X2ReconInputError(path, "label file not found")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 5:
            raise X2ReconInputError(path, f"line {i}: expected 5 numbers, got {len(parts)}")
        rows.append([float(x) for x in parts])
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def write_dataset_yaml(path: str | Path, classes: list[str], train, val, root) -> None:
    """An ultralytics dataset yaml (``path``, ``train``, ``val``, ``names``); lists or list files."""
    def fmt(x):
        return json.dumps(x if isinstance(x, str) else [str(p) for p in x])

    text = [f"# X2Recon detection dataset: DRRs with boxes projected from the CT segmentation\n",
            f"path: {json.dumps(str(root))}\n", f"train: {fmt(train)}\n", f"val: {fmt(val)}\n", "names:\n"]
    text += [f"  {i}: {json.dumps(n)}\n" for i, n in enumerate(classes)]
    atomic_write_text(path, "".join(text))
