"""SPIDER targets: CT (HU) and labelmap resampled onto a grid of the reconstruction box.

Grid convention.  The box is the cube ``isocenter ± box_size/2`` (LPS mm, axis-aligned, as in
``ProjectionGeometry``).  The grid has ``n`` voxels per edge, spacing ``h = box_size/n``, identity
direction, and its voxel *edges* tile the box, so voxel ``i`` (along each of x, y, z) has its
centre at ``isocenter − box_size/2 + (i + ½)·h``.  In normalised box coordinates
``q = (p − isocenter)/box_size`` (``ProjectionGeometry.to_box``) the centre of voxel ``i`` is
``(i + ½)/n − ½`` — the cell-centred convention of ``torch.grid_sample(align_corners=False)``,
so a network's field sampled at ``q`` lines up with these targets.  The array is ``[k, j, i]``
= ``[z, y, x]`` as every ``Volume``.
"""

from __future__ import annotations

import numpy as np

from ..io.volume import Volume

AIR_HU = -1024


def _iso_size(geometry_or_isocenter, box_size):
    iso = getattr(geometry_or_isocenter, "isocenter", geometry_or_isocenter)
    iso = np.asarray(iso, dtype=np.float64).reshape(3)
    if box_size is None:
        box_size = getattr(geometry_or_isocenter, "box_size", None)
        if box_size is None:
            raise ValueError("box_size is needed when an isocenter (not a geometry) is given")
    box_size = float(box_size)
    if not box_size > 0:
        raise ValueError(f"box_size must be positive, got {box_size}")
    return iso, box_size


def box_centres(n: int) -> np.ndarray:
    """Normalised box coordinate of the centre of voxel ``i = 0..n−1`` along one axis: ``(i + ½)/n − ½``."""
    return (np.arange(n) + 0.5) / n - 0.5


def box_grid(geometry_or_isocenter, box_size: float | None = None, n: int = 128, dtype=np.int16) -> Volume:
    """An empty (zero) ``n³`` Volume tiling the reconstruction box (see the module docstring).

    ``geometry_or_isocenter`` is a ``ProjectionGeometry`` (its ``isocenter`` and, if
    ``box_size`` is None, its ``box_size``) or an LPS point in mm.
    """
    if int(n) < 1:
        raise ValueError(f"grid size n must be >= 1, got {n}")
    n = int(n)
    iso, size = _iso_size(geometry_or_isocenter, box_size)
    h = size / n
    origin = iso - size / 2 + h / 2
    return Volume(np.zeros((n, n, n), dtype), (h, h, h), origin, np.eye(3))


def resample_to_box(ct: Volume | None, seg: Volume | None, isocenter, box_size: float | None = None,
                    n: int = 128) -> tuple[Volume, Volume | None]:
    """CT and labelmap on the box grid: ``(ct_box, seg_box)``.

    CT: trilinear interpolation in HU, ``−1024`` (air) outside the scan, rounded to int16.
    Labels: nearest neighbour, same ids and dtype, 0 outside.  Either input may be None (its output is None).  ``isocenter`` may be a
    ``ProjectionGeometry`` (then ``box_size`` defaults to its own).
    """
    import SimpleITK as sitk

    ref = box_grid(isocenter, box_size, n).to_sitk()
    identity = sitk.Transform(3, sitk.sitkIdentity)
    ct_box = None
    if ct is not None:
        ct_img = sitk.Cast(ct.to_sitk(), sitk.sitkFloat32)
        out = sitk.Resample(ct_img, ref, identity, sitk.sitkLinear, float(AIR_HU), sitk.sitkFloat32)
        hu = np.rint(sitk.GetArrayFromImage(out))
        ct_box = Volume.from_sitk(out)
        ct_box.array = np.clip(hu, -32768, 32767).astype(np.int16)
    if seg is None:
        return ct_box, None
    lab = np.asarray(seg.array)
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labelmap must be integer, got {lab.dtype}")
    lab_img = sitk.Resample(seg.to_sitk(), ref, identity, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUnknown)
    seg_box = Volume.from_sitk(lab_img)
    seg_box.array = seg_box.array.astype(lab.dtype, copy=False)
    return ct_box, seg_box
