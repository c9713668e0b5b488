"""Detection labels from geometry: each structure's 2D box in a DRR, YOLO label files, dataset yaml.

A structure's box is the extent of the projections (``ProjectionGeometry.project``, the one camera
model) of the 8 corners of its voxels, so it contains the whole projected structure, voxel edges
included.  The exact geometry makes hand annotation unnecessary (a deliberate deviation from the
paper's manual labelling, see DESIGN.md).

Why only boundary voxels: the extreme of a projective map ``u(p) = (a·p + b)/(c·p + d)`` over a
union of voxel cubes lies on its surface (the gradient of ``u`` never vanishes in front of the
source) and, on each face square, at a vertex (a projective map is monotone along segments).  The
surface is made of faces of voxels with a 6-neighbour of another label, so the corners of those
voxels give exactly the same box as all voxels, at a fraction of the cost.  Faster still, and what
is used when every voxel lies in front of the source: the outer end corners of each run of one label
along i (``label_corners``, computed once per labelmap and reused for every view); the corners of
the voxels between them lie on segments joining them, so cannot project further out.

Pixel coordinates are continuous ``(col, row)`` as in ``ProjectionGeometry``: the centre of pixel
``[r, c]`` is ``(c, r)``, so a ``W × H`` image spans ``[-½, W - ½] × [-½, H - ½]``; boxes are
clipped to that rectangle.  YOLO files normalise by the image size: ``cx = (x0 + x1)/2 + ½``
divided by ``W`` (and likewise for rows), ``w = (x1 - x0)/W``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import X2ReconInputError
from ..io.atomic import atomic_write_text
from ..structures import group_of

#: The paper's detection classes (X2BR §3.2): vertebrae by region, and ribs.
GROUP_CLASSES = ("cervical", "thoracic", "lumbar", "ribs")

CLASS_MODES = ("groups", "structures")


class PixelBox:
    """What every box dataclass with corners ``x0, y0, x1, y1`` (pixels) shares: its size and its dict."""

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Box(PixelBox):
    """One structure's box in continuous pixel coordinates ``(col, row)``, clipped to the image."""

    name: str  # TotalSegmentator name
    label: int  # k: the structure's value in the labelmap
    x0: float
    y0: float
    x1: float
    y1: float
    visible_fraction: float = 1.0  # area of the clipped box / area of the unclipped box
    truncated: bool = False  # part of the structure projects outside the image (or lies behind the source)


# ---------------------------------------------------------------------------------------- boxes
_CORNER_STEPS = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])  # (dk, dj, di)


def boundary_voxels(arr: np.ndarray) -> np.ndarray:
    """Mask of labelled voxels that have a 6-neighbour with another value (or lie on the volume's faces)."""
    b = np.zeros(arr.shape, bool)
    for axis in range(3):
        a0 = [slice(None)] * 3
        a1 = [slice(None)] * 3
        a0[axis], a1[axis] = slice(None, -1), slice(1, None)
        diff = arr[tuple(a0)] != arr[tuple(a1)]
        b[tuple(a0)] |= diff
        b[tuple(a1)] |= diff
        first, last = [slice(None)] * 3, [slice(None)] * 3
        first[axis], last[axis] = 0, -1
        b[tuple(first)] = True
        b[tuple(last)] = True
    return b & (arr != 0)


@dataclass(frozen=True)
class LabelCorners:
    """Points whose projections bound each label's projection; computed once per labelmap and
    projected for every view (a case's DRR stage projects one segmentation three times).

    ``world`` (R, 8, 3): LPS mm of the 8 outer corners of each run's two end voxels (a run: the
    voxels of one label between a change of label along i); runs grouped by label, ``labels`` (L,)
    and ``starts`` (L,) give each group's label and first run; ``shape``: the labelmap's [k, j, i].
    """

    world: np.ndarray
    labels: np.ndarray
    starts: np.ndarray
    shape: tuple


def label_corners(seg, labels) -> LabelCorners:
    """:class:`LabelCorners` of the labels in ``labels`` that have voxels in ``seg``.

    Why run ends suffice: every corner of a voxel inside a run lies on a segment between the end
    corners of the run (same j, k), so it is a convex combination of them, and a projective map with
    positive depth over a segment is monotone: its extremes are at the run's end corners.
    """
    arr = np.asarray(seg.array)
    wanted = np.zeros(max(int(arr.max()), max(labels, default=0)) + 1, bool)
    wanted[[k for k in labels if k > 0]] = True
    keep = wanted[arr]
    first, last = keep.copy(), keep  # run starts / ends along i
    first[..., 1:] &= arr[..., 1:] != arr[..., :-1]
    last[..., :-1] &= arr[..., :-1] != arr[..., 1:]
    k, j, i0 = np.nonzero(first)  # C order: start r and end r belong to the same run
    i1 = np.nonzero(last)[2]
    lab = arr[k, j, i0]
    order = np.argsort(lab, kind="stable")
    k, j, i0, i1, lab = k[order], j[order], i0[order], i1[order], lab[order]
    s = _CORNER_STEPS  # (dk, dj, di): di = 0 → the run's low-i face, 1 → its high-i face
    ijk = np.stack([np.where(s[:, 2] == 0, i0[:, None] - 0.5, i1[:, None] + 0.5),
                    j[:, None] - 0.5 + s[:, 1], k[:, None] - 0.5 + s[:, 0]], axis=-1)  # (R, 8, 3)
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if len(lab) else np.zeros(0, np.int64)
    return LabelCorners(seg.index_to_world(ijk), lab[starts], starts, arr.shape)


def projected_extents(seg, labels, geometry, corners: LabelCorners | None = None) -> dict[int, tuple[np.ndarray, bool]]:
    """Unclipped ``(x0, y0, x1, y1)`` of every label in ``labels`` that has voxels, and whether any
    of its voxels lies behind the source (cone beam; such voxels are not imaged and left out).

    ``corners``: ``label_corners(seg, labels)`` computed before, to project one labelmap for several
    geometries.  When a corner lies behind the source this falls back to the voxel-by-voxel
    computation (depth is affine, so if no run-end corner is behind, no voxel corner is).
    """
    lc = label_corners(seg, labels) if corners is None else corners
    if lc.shape != np.shape(seg.array):
        raise ValueError(f"corners were computed for a {lc.shape} labelmap, not {np.shape(seg.array)}")
    if len(lc.labels) == 0:
        return {}
    pts = lc.world.reshape(-1, 3)
    if geometry.kind == "cone" and not np.all(geometry.depth(pts) > 1e-6):
        return _extents_per_voxel(seg, labels, geometry)
    uv = geometry.project(pts).reshape(-1, 8, 2)
    lo = np.minimum.reduceat(uv.min(axis=1), lc.starts, axis=0)
    hi = np.maximum.reduceat(uv.max(axis=1), lc.starts, axis=0)
    wanted = {int(x) for x in labels}
    return {int(k): (np.r_[l, h], False) for k, l, h in zip(lc.labels, lo, hi) if int(k) in wanted}


def _extents_per_voxel(seg, labels, geometry) -> dict[int, tuple[np.ndarray, bool]]:
    """:func:`projected_extents` voxel by voxel: what it falls back to when a voxel corner lies behind
    the source (such voxels are left out), and the reference its fast path is tested against.

    Corners shared by neighbouring voxels are projected once: each boundary voxel's 8 corners
    are points of the ``(nk+1, nj+1, ni+1)`` corner lattice, whose point ``(K, J, I)`` is at
    continuous index ``(I − ½, J − ½, K − ½)``.
    """
    arr = np.asarray(seg.array)
    wanted = np.zeros(max(int(arr.max()), max(labels, default=0)) + 1, bool)
    wanted[[k for k in labels if k > 0]] = True
    mask = boundary_voxels(arr)
    mask &= wanted[arr]
    kji = np.argwhere(mask)
    lab = arr[mask]  # same (C) order as argwhere
    if len(lab) == 0:
        return {}
    order = np.argsort(lab, kind="stable")
    kji, lab = kji[order], lab[order]
    nk, nj, ni = arr.shape
    lat = kji[:, None, :] + _CORNER_STEPS[None]  # (N, 8, 3) lattice (K, J, I)
    flat = (lat[..., 0] * (nj + 1) + lat[..., 1]) * (ni + 1) + lat[..., 2]
    uniq, inv = np.unique(flat.ravel(), return_inverse=True)
    K, rem = np.divmod(uniq, (nj + 1) * (ni + 1))
    J, I = np.divmod(rem, ni + 1)
    world = seg.index_to_world(np.stack([I, J, K], axis=1).astype(np.float64) - 0.5)
    with np.errstate(divide="ignore", invalid="ignore"):  # points in the source plane (pathological set-ups)
        uv = geometry.project(world)
    if geometry.kind == "cone":
        uv[geometry.depth(world) <= 1e-6] = np.nan
    uv = uv[inv.reshape(-1)].reshape(-1, 8, 2)
    behind = np.isnan(uv).any(axis=(1, 2))
    lo = np.where(behind[:, None], np.inf, uv.min(axis=1))  # per-voxel extent, (N, 2)
    hi = np.where(behind[:, None], -np.inf, uv.max(axis=1))
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]])
    lo, hi = np.minimum.reduceat(lo, starts, axis=0), np.maximum.reduceat(hi, starts, axis=0)
    n_behind = np.add.reduceat(behind.astype(np.int64), starts)
    counts = np.diff(np.r_[starts, len(lab)])
    out = {}
    for s0, c, nb, l, h in zip(starts, counts, n_behind, lo, hi):
        if nb < c:  # else entirely behind the source: not in the image
            out[int(lab[s0])] = (np.r_[l, h], bool(nb))
    return out


def structure_boxes(seg, names: dict[int, str], geometry, corners: LabelCorners | None = None) -> list[Box]:
    """Boxes of every structure of ``names`` (label k → name) seen by ``geometry``, sorted by k.

    Structures entirely outside the image (or absent from ``seg``) get no box; partly outside
    ones are clipped and have ``visible_fraction < 1``.  ``corners``: ``label_corners(seg, names)``,
    shared between the views of one labelmap.
    """
    w, h = geometry.size
    lo_x, lo_y, hi_x, hi_y = -0.5, -0.5, w - 0.5, h - 0.5
    boxes = []
    for k, (e, behind) in sorted(projected_extents(seg, list(names), geometry, corners).items()):
        x0, y0, x1, y1 = (float(x) for x in e)
        if x1 <= lo_x or y1 <= lo_y or x0 >= hi_x or y0 >= hi_y:
            continue
        cx0, cy0, cx1, cy1 = max(x0, lo_x), max(y0, lo_y), min(x1, hi_x), min(y1, hi_y)
        full = (x1 - x0) * (y1 - y0)
        vis = min((cx1 - cx0) * (cy1 - cy0) / full, 1.0) if full > 0 else 1.0
        clipped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
        boxes.append(Box(names[k], int(k), cx0, cy0, cx1, cy1, float(vis), bool(clipped or behind)))
    return boxes


# ------------------------------------------------------------------------------------ classes
def class_names(mode: str, structures) -> list[str]:
    """Detector classes: ``"groups"`` — the paper's cervical, thoracic, lumbar, ribs (fixed ids,
    whatever the structures) — or ``"structures"`` — one class per TotalSegmentator name, in order."""
    if mode == "groups":
        return list(GROUP_CLASSES)
    if mode == "structures":
        return list(dict.fromkeys(structures))
    raise ValueError(f"class mode must be one of {CLASS_MODES}, got {mode!r}")


def class_of(name: str, classes: list[str]) -> int | None:
    """Class id of a structure: its own name if it is a class, else its group (None: no class)."""
    if name in classes:
        return classes.index(name)
    g = group_of(name)
    return classes.index(g) if g in classes else None


# --------------------------------------------------------------------------------------- YOLO
def yolo_rows(boxes: list[Box], classes: list[str], geometry) -> np.ndarray:
    """``(N, 5)`` rows ``cls cx cy w h`` normalised to [0, 1]; boxes without a class are left out."""
    w, h = geometry.size
    rows = []
    for b in boxes:
        c = class_of(b.name, classes)
        if c is None or b.width <= 0 or b.height <= 0:
            continue  # e.g. costal cartilages in "groups" mode
        rows.append([c, ((b.x0 + b.x1) / 2 + 0.5) / w, ((b.y0 + b.y1) / 2 + 0.5) / h, b.width / w, b.height / h])
    rows = np.array(rows, dtype=np.float64).reshape(-1, 5)
    rows[:, 1:] = np.clip(rows[:, 1:], 0.0, 1.0)
    return rows


def yolo_to_pixels(rows: np.ndarray, geometry) -> np.ndarray:
    """YOLO rows → ``(N, 4)`` boxes ``x0 y0 x1 y1`` in continuous pixel coordinates of ``geometry``."""
    w, h = geometry.size
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    cx, cy = rows[:, 1] * w - 0.5, rows[:, 2] * h - 0.5
    bw, bh = rows[:, 3] * w, rows[:, 4] * h
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)


def write_yolo_labels(boxes: list[Box], classes: list[str], geometry, path: str | Path) -> int:
    """Write a YOLO txt (one ``cls cx cy w h`` line per box, atomic); returns the number of lines."""
    rows = yolo_rows(boxes, classes, geometry)
    text = "".join(f"{int(r[0])} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f} {r[4]:.6f}\n" for r in rows)
    atomic_write_text(path, text)
    return len(rows)


def read_yolo_labels(path: str | Path) -> np.ndarray:
    """``(N, 5)`` array of ``cls cx cy w h``; an X2ReconInputError names the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise X2ReconInputError(path, "label file not found")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 5:
            raise X2ReconInputError(path, f"line {i}: expected 5 numbers (cls cx cy w h), got {len(parts)}")
        try:
            vals = [float(x) for x in parts]
        except ValueError:
            raise X2ReconInputError(path, f"line {i}: not numbers: {line.strip()!r}") from None
        if vals[0] < 0 or vals[0] != int(vals[0]):
            raise X2ReconInputError(path, f"line {i}: class must be a non-negative integer, got {parts[0]}")
        if not all(0.0 <= v <= 1.0 for v in vals[1:]):
            raise X2ReconInputError(path, f"line {i}: box values must be normalised to [0, 1]")
        rows.append(vals)
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


def _yaml_str(x) -> str:
    import json

    return json.dumps(str(x))  # a JSON string is a valid double-quoted YAML scalar


def write_dataset_yaml(path: str | Path, classes: list[str], train, val, root, test=None) -> None:
    """An ultralytics dataset yaml: ``path`` (root), ``train``/``val``(/``test``) and ``names``.

    Each split is a folder of images, a ``.txt`` list of image paths, or a list of either,
    relative to ``root`` or absolute (ultralytics' documented forms).  Label files are found by
    ultralytics beside the images: ``…/images/<view>.png`` → ``…/labels/<view>.txt``.
    """

    def split(x) -> str:
        if isinstance(x, (str, Path)):
            return _yaml_str(x)
        return "[" + ", ".join(_yaml_str(p) for p in x) + "]"

    lines = [
        "# X2Recon detection dataset: DRRs with boxes projected from the CT segmentation\n",
        f"path: {_yaml_str(root)}\n",
        f"train: {split(train)}\n",
        f"val: {split(val)}\n",
    ]
    if test is not None:
        lines.append(f"test: {split(test)}\n")
    lines.append(f"nc: {len(classes)}\n")
    lines.append("names:\n")
    lines += [f"  {i}: {_yaml_str(n)}\n" for i, n in enumerate(classes)]
    atomic_write_text(path, "".join(lines))
