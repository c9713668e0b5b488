"""Metrics exactly as the papers define them (mesh metrics now; volume metrics come with SPIDER)."""

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

__all__ = [
    "MeshMetrics", "axis_errors_after_icp", "chamfer_l1", "fscore", "icp", "iou_occupancy", "iou_points",
    "iou_voxels", "mesh_metrics", "normal_consistency", "sample_surface",
    "vertex_distances",
]
