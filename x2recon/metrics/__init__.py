"""Metrics exactly as the papers define them: mesh metrics (X2BR / Occupancy Networks) and volume
metrics (SPIDER: PSNR, SSIM, Dice, HD95, Chamfer distance)."""

from .mesh import (
    MeshMetrics,
    axis_errors_after_icp,
    chamfer_l1,
    fscore,
    icp,
    iou_occupancy,
    iou_points,
    iou_voxels,
    mesh_metrics,
    normal_consistency,
    sample_surface,
    vertex_distances,
)

from .volume import HU_WINDOW, VolumeMetrics, chamfer, dice, hd95, psnr, ssim, surface_distances, volume_metrics

__all__ = [
    "HU_WINDOW", "VolumeMetrics", "chamfer", "dice", "hd95", "psnr", "ssim", "surface_distances", "volume_metrics",
    "MeshMetrics", "axis_errors_after_icp", "chamfer_l1", "fscore", "icp", "iou_occupancy", "iou_points",
    "iou_voxels", "mesh_metrics", "normal_consistency", "sample_surface",
    "vertex_distances",
]
