"""Projection-guided feature sampling (SPIDER §3.2, X2B's pixel-aligned features, X2B2).

A view's ``grid`` matrix is ``ProjectionGeometry.box_to_grid_matrix()``: normalised box coordinates
→ homogeneous ``torch.nn.functional.grid_sample`` coordinates of that image.  Every network that
samples image features at a 3D point's projection goes through these two functions, so the camera
model stays the one in ``x2recon.geometry`` (perspective and parallel beams alike: a parallel
geometry's matrix has a constant last row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def project_to_grid(points: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``points`` (B, T, 3) box coordinates, ``grid`` (B, V, 3, 4) → (B, V, T, 2) grid_sample coordinates."""
    g = grid.to(points.dtype)
    h = torch.einsum("bvij,btj->bvti", g[..., :3], points) + g[..., 3][:, :, None]
    return h[..., :2] / h[..., 2:3].clamp_min(1e-6)


def sample_maps(maps: list[torch.Tensor], uv: torch.Tensor, view_of: list[int] | None = None) -> torch.Tensor:
    """Bilinear features of ``maps`` (each (B, C_i, H_i, W_i)) at ``uv`` (B, V, T, 2) → (B, T, ΣC_i),
    concatenated in list order; zero outside the image.  ``maps[i]`` belongs to view ``view_of[i]``
    (default: one map per view, in view order)."""
    feats = []
    for i, m in enumerate(maps):
        v = i if view_of is None else view_of[i]
        s = F.grid_sample(m.to(uv.dtype), uv[:, v, :, None, :], mode="bilinear", padding_mode="zeros",
                          align_corners=False)
        feats.append(s[..., 0].transpose(1, 2))
    return torch.cat(feats, dim=-1)
