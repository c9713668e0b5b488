"""Anatomical augmentation: seeded smooth deformations (affine + elastic) of CT and labels.

With one or few scans, each variant is a new plausible anatomy: an affine about the volume
centre (rotation, scale, shear, translation) composed with a B-spline elastic field.  Everything
is determined by the seed and the parameters, recorded in meta.json, and applied to CT (linear)
and labels (nearest) with the same transform, so they stay aligned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..io.volume import Volume


@dataclass
class DeformationParams:
    max_rotation_deg: float = 5.0
    max_scale: float = 0.06
    max_shear: float = 0.03
    max_translation_mm: float = 5.0
    elastic_mm: float = 8.0  # max control-point displacement
    control_grid: tuple[int, int, int] = (4, 4, 4)


@dataclass
class Deformation:
    seed: int
    params: DeformationParams
    center: np.ndarray  # LPS mm
    matrix: np.ndarray  # 3×3 affine part (output → input point mapping, SimpleITK convention)
    translation: np.ndarray
    domain_origin: np.ndarray
    domain_size: np.ndarray  # physical size of the B-spline domain (mm)
    domain_direction: np.ndarray
    coefficients: np.ndarray = field(repr=False)  # B-spline control point displacements (mm)
    _grid: tuple | None = field(default=None, repr=False, compare=False)  # last sampling grid (CT and labels share it)

    def transform(self):
        import SimpleITK as sitk

        aff = sitk.AffineTransform(3)
        aff.SetCenter(self.center.tolist())
        aff.SetMatrix(self.matrix.reshape(-1).tolist())
        aff.SetTranslation(self.translation.tolist())
        bs = sitk.BSplineTransform(3, 3)
        bs.SetTransformDomainOrigin(self.domain_origin.tolist())
        bs.SetTransformDomainPhysicalDimensions(self.domain_size.tolist())
        bs.SetTransformDomainDirection(self.domain_direction.reshape(-1).tolist())
        bs.SetTransformDomainMeshSize([int(x) for x in self.params.control_grid])
        bs.SetParameters(self.coefficients.reshape(-1).tolist())
        comp = sitk.CompositeTransform(3)
        comp.AddTransform(aff)
        comp.AddTransform(bs)
        return comp

    def apply(self, vol: Volume, kind: str = "ct", coarse_mm: float = 4.0) -> Volume:
        """The deformed volume on the same grid: ``kind`` ``"ct"`` (linear, air outside) or ``"labels"``.

        The transform is evaluated exactly on a coarse grid (every ``coarse_mm``), upsampled
        trilinearly (the field is smooth: B-spline control points are ~100 mm apart) and applied
X
        """
        import SimpleITK as sitk
        import torch
        import torch.nn.functional as F

        if kind not in ("ct", "labels"):
            raise ValueError(f"kind must be 'ct' or 'labels', got {kind!r}")
        key = (vol.shape_xyz, tuple(vol.spacing), tuple(vol.origin), tuple(vol.direction.ravel()), coarse_mm)
        if self._grid is None or self._grid[0] != key:
            self._grid = (key, self._sampling_grid(vol, coarse_mm))
        grid = self._grid[1]
        src = torch.from_numpy(np.asarray(vol.array, dtype=np.float32))[None, None]
        if kind == "ct":
            out = F.grid_sample(src + 1024.0, grid, mode="bilinear", padding_mode="zeros", align_corners=True) - 1024.0
            arr = out[0, 0].round().numpy().astype(vol.array.dtype)
        else:
            out = F.grid_sample(src, grid, mode="nearest", padding_mode="zeros", align_corners=True)
            arr = out[0, 0].numpy().astype(vol.array.dtype)
        return vol.with_array(arr)

    def _sampling_grid(self, vol: Volume, coarse_mm: float):
        import SimpleITK as sitk
        import torch
        import torch.nn.functional as F

        n = np.array(vol.shape_xyz)
        f = np.maximum(1, np.floor(coarse_mm / vol.spacing)).astype(int)
        nc = (n - 1 + f - 1) // f + 1
        field = sitk.TransformToDisplacementField(
            self.transform(), sitk.sitkVectorFloat64, [int(x) for x in nc], vol.origin.tolist(),
            (vol.spacing * f).tolist(), vol.direction.reshape(-1).tolist(),
        )
        disp = sitk.GetArrayFromImage(field)  # (kc, jc, ic, 3) world mm
        Ainv = np.linalg.inv(vol.affine[:3, :3])
        disp_idx = disp @ Ainv.T  # index units (i, j, k)
        t = torch.from_numpy(np.ascontiguousarray(disp_idx.transpose(3, 0, 1, 2), dtype=np.float32))[None]
        full = ((nc - 1) * f + 1)[::-1]
        up = F.interpolate(t, size=tuple(int(x) for x in full), mode="trilinear", align_corners=True)
        up = up[:, :, : n[2], : n[1], : n[0]]
        kk, jj, ii = torch.meshgrid(*(torch.arange(int(m), dtype=torch.float32) for m in n[::-1]), indexing="ij")
        grid = torch.stack([
            (ii + up[0, 0]) * (2.0 / max(n[0] - 1, 1)) - 1,
            (jj + up[0, 1]) * (2.0 / max(n[1] - 1, 1)) - 1,
            (kk + up[0, 2]) * (2.0 / max(n[2] - 1, 1)) - 1,
        ], dim=-1)[None]
        return grid

    def displacement_at(self, points: np.ndarray) -> np.ndarray:
        """Displacement (mm) of the transform at world points (N, 3): T(p) − p."""
        tr = self.transform()
        return np.array([np.subtract(tr.TransformPoint(tuple(map(float, p))), p) for p in points])

    def to_dict(self) -> dict:
        return {
            "seed": int(self.seed),
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.params).items()},
            "center": self.center.tolist(),
            "matrix": self.matrix.tolist(),
            "translation": self.translation.tolist(),
            "domain_origin": self.domain_origin.tolist(),
            "domain_size": self.domain_size.tolist(),
            "domain_direction": self.domain_direction.tolist(),
            "coefficients": self.coefficients.tolist(),
            "max_control_displacement_mm": float(np.abs(self.coefficients).max()),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Deformation":
        p = dict(d["params"])
        p["control_grid"] = tuple(p["control_grid"])
        arr = lambda k: np.asarray(d[k], dtype=np.float64)
        return cls(int(d["seed"]), DeformationParams(**p), arr("center"), arr("matrix"), arr("translation"),
                   arr("domain_origin"), arr("domain_size"), arr("domain_direction"), arr("coefficients"))


def random_deformation(seed: int, reference: Volume, params: DeformationParams | None = None, **kw) -> Deformation:
    """A deformation drawn from ``seed`` over ``reference``'s physical domain."""
    params = params or DeformationParams(**kw)
    rng = np.random.default_rng(seed)
    corners = reference.corners_world()
    center = corners.mean(0)
    ang = np.radians(rng.uniform(-params.max_rotation_deg, params.max_rotation_deg, 3))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    R = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
         @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    S = np.diag(1 + rng.uniform(-params.max_scale, params.max_scale, 3))
    H = np.eye(3) + np.triu(rng.uniform(-params.max_shear, params.max_shear, (3, 3)), 1)
    M = R @ S @ H
    t = rng.uniform(-params.max_translation_mm, params.max_translation_mm, 3)
    # B-spline domain: the volume's box in its own orientation
    dirm = reference.direction
    size = reference.spacing * np.array(reference.shape_xyz)
    origin = reference.index_to_world(np.array([-0.5, -0.5, -0.5]))
    n_ctrl = int(np.prod(np.array(params.control_grid) + 3))
    coef = rng.uniform(-1, 1, (3, n_ctrl)) * params.elastic_mm
    # keep the border still so no air is pulled in from outside the scan
    grid = np.array(params.control_grid) + 3
    mask = np.zeros(tuple(grid[::-1]), bool)
    mask[1:-1, 1:-1, 1:-1] = True
    coef = coef * mask.reshape(-1)[None, :]
    return Deformation(seed, params, center, M, t, origin, size, dirm, coef.reshape(-1))
