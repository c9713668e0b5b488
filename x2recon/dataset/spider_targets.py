"""SPIDER targets: CT (HU) and labelmap resampled onto a grid of the reconstruction box.

The grid has ``n`` voxels per edge whose centres tile the box ``isocenter ± box_size/2``: voxel
``i`` has its centre at ``isocenter − box_size/2 + (i + ½)·box_size/n`` (LPS, identity
direction).  So normalised box coordinate ``q = (p − isocenter)/box_size`` of voxel ``i`` is
``(i + ½)/n − ½``, the convention SPIDER's sampling uses.
"""

from __future__ import annotations

import numpy as np

from ..io.volume import Volume

AIR_HU = -1024


def box_grid(isocenter, box_size: float, n: int) -> Volume:
    """An empty ``n³`` Volume tiling the reconstruction box (see module docstring)."""
    iso = np.asarray(getattr(isocenter, "isocenter", isocenter), dtype=np.float64)
    sp = box_size / n
    origin = iso - box_size / 2 + sp / 2
    return Volume(np.zeros((n, n, n), np.int16), (sp, sp, sp), origin, np.eye(3))


def resample_to_box(ct: Volume, seg: Volume, isocenter, box_size: float, n: int = 128) -> tuple[Volume, Volume]:
    """CT (linear, air outside the scan) and labels (nearest) on the box grid."""
    import SimpleITK as sitk

    ref = box_grid(isocenter, box_size, n).to_sitk()

    def res(vol: Volume, interp, default, out_type):
        img = sitk.Resample(vol.to_sitk(), ref, sitk.Transform(), interp, float(default), out_type)
        return Volume.from_sitk(img)

    ct_box = res(ct, sitk.sitkLinear, AIR_HU, sitk.sitkInt16)
    seg_box = res(seg, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8 if seg.array.max() < 256 else sitk.sitkUInt16)
    return ct_box, seg_box
