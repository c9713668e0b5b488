"""Anatomical augmentation: seeded smooth deformations (affine + elastic) of a CT and its labels.

With one or a few scans, each variant (``--variants N``) is a new plausible anatomy.  A
deformation is fully determined by the seed, the parameters and the reference volume's domain,
recorded in meta.json (``to_dict``) and rebuilt from it (``from_dict``).

Transform (SimpleITK resampling convention: the deformed image at ``p`` takes the original's
value at ``T(p)``; LPS mm)::

    T(p) = M · (p + b(p) − c) + c + t

* ``c`` — centre of the reference volume (its voxel-edge box); ``M = R·S·H``: rotation ``R``
  (angles about the x, y, z axes, each uniform in ±``max_rotation_deg``), scales ``S`` (each
  axis ``1 ±`` ``max_scale``), upper shear ``H`` (3 terms in ±``max_shear``); ``t`` — translation
  uniform in the ball of radius ``max_translation_mm``.
* ``b`` — cubic B-spline (``sitk.BSplineTransform``, ``control_grid`` spans over the reference's
  physical domain) whose control-point displacement vectors are uniform in the ball of radius
  ``elastic_mm``.  The basis is non-negative with unit sum, so ``|b(p)| ≤ elastic_mm``.

Bounds (tested): ``|T(p) − p| ≤ ‖M − I‖·|p − c| + ‖M‖·max|b| + |t|``.  The elastic Jacobian obeys
``‖∂b/∂p‖ ≤ ρ = 1.5·e·√(3·Σ 1/Δ²)`` (``Δ`` = control spacing per axis; 1.5 = max Σ|B′| of the
cubic basis); ``e`` is scaled down where needed so that ``ρ ≤ 0.5`` and the map never folds
(``elastic_scale`` in ``to_dict``) — on a chest CT the defaults give ρ ≈ 0.45, unscaled.

Applying: ``T`` is evaluated exactly (SimpleITK) on a lattice of the target grid from its first
to its last voxel centre (node spacing ``≤ min(6 mm, Δ/10)``) and interpolated trilinearly to
every voxel — exact for the affine part; for the B-spline each component is within
``3·(Δ/10)²·(4e/Δ²)/8 = 1.5 % of e`` (``4/Δ²`` = max Σ|B″|), so positions are within
``‖M‖·√3·1.5 % of e`` (≤ 0.23 mm for e = 8 mm; ~0.01 mm in practice).  CT (trilinear) and labels
(nearest) are then sampled with ``torch.grid_sample`` through the *same* positions, slab by slab
to bound memory, with SimpleITK's edge rule: within half a voxel beyond the outer voxel centres
the edge voxel is read, farther out the value is −1024 HU (CT) or 0 (labels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..io.volume import Volume

DEFORMATION_FORMAT = "x2recon.Deformation/1"
AIR_HU = -1024.0
MAX_ELASTIC_JACOBIAN = 0.5  # ρ limit: the elastic part stays a diffeomorphism with margin
_SLAB_VOXELS = 2_000_000  # voxels per grid_sample call (memory ≈ 40 B/voxel, per worker)


@dataclass(frozen=True)
class DeformationParams:
    max_rotation_deg: float = 5.0
    max_scale: float = 0.06
    max_shear: float = 0.03
    max_translation_mm: float = 5.0
    elastic_mm: float = 8.0  # max control-point displacement (and so of the elastic field)
    control_grid: tuple[int, int, int] = (4, 4, 4)  # B-spline spans per axis

    def __post_init__(self):
        for k in ("max_rotation_deg", "max_scale", "max_shear", "max_translation_mm", "elastic_mm"):
            v = float(getattr(self, k))
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"deformation {k} must be a finite number >= 0, got {getattr(self, k)!r}")
            object.__setattr__(self, k, v)
        if self.max_scale >= 1 or self.max_rotation_deg > 60:
            raise ValueError("deformation max_scale must be < 1 and max_rotation_deg <= 60")
        g = tuple(int(x) for x in np.broadcast_to(np.asarray(self.control_grid), 3))
        if min(g) < 1:
            raise ValueError(f"control_grid needs >= 1 span per axis, got {self.control_grid!r}")
        object.__setattr__(self, "control_grid", g)

    def displacement_bound(self, radius_mm: float) -> float:
        """Largest ``|T(p) − p|`` these limits allow for ``|p − c| ≤ radius_mm`` (any seed).

        ``‖R − I‖ = 2 sin(θ/2)`` with θ ≤ 3·max_rotation (rotation angles add at most);
        ``‖S − I‖ ≤ s``; ``‖H − I‖ ≤ ‖H − I‖_F ≤ √3·shear``; ``M − I = (R − I)SH + (S − I)H + (H − I)``.
        """
        s, sh = self.max_scale, math.sqrt(3) * self.max_shear
        rot = 2 * math.sin(min(math.radians(3 * self.max_rotation_deg), math.pi) / 2)
        norm_sh = (1 + s) * (1 + sh)
        m_minus_i = rot * norm_sh + s * (1 + sh) + sh
        return m_minus_i * radius_mm + norm_sh * self.elastic_mm + self.max_translation_mm


def _rotation(angles_rad) -> np.ndarray:
    ax, ay, az = angles_rad
    cx, cy, cz = np.cos([ax, ay, az])
    sx, sy, sz = np.sin([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _in_ball(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    """``n`` points uniform in the 3D ball of ``radius`` (``(n, 3)``)."""
    d = rng.standard_normal((n, 3))
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    return d * (radius * rng.uniform(0, 1, (n, 1)) ** (1 / 3))


def elastic_jacobian_bound(elastic_mm: float, control_spacing) -> float:
    """ρ: bound on the spectral norm of the B-spline field's Jacobian (see the module docstring)."""
    sp = np.asarray(control_spacing, dtype=np.float64)
    return float(1.5 * elastic_mm * math.sqrt(3 * np.sum(1.0 / sp**2)))


@dataclass(eq=False)
class Deformation:
    """A sampled deformation; see the module docstring for ``T`` and its conventions."""

    seed: int
    params: DeformationParams
    center: np.ndarray  # c, LPS mm
    matrix: np.ndarray  # M (3×3)
    translation: np.ndarray  # t (mm)
    domain_origin: np.ndarray  # B-spline domain: the reference's voxel-edge box, in its orientation
    domain_size: np.ndarray  # mm along the domain's axes
    domain_direction: np.ndarray  # 3×3, columns = domain axes
    control_points: np.ndarray = field(repr=False)  # (P, 3) displacement vectors (mm), SimpleITK order
    angles_deg: np.ndarray = field(default_factory=lambda: np.zeros(3))
    scales: np.ndarray = field(default_factory=lambda: np.ones(3))
    shear: np.ndarray = field(default_factory=lambda: np.zeros(3))  # H[0,1], H[0,2], H[1,2]
    elastic_scale: float = 1.0  # factor applied to keep ρ ≤ MAX_ELASTIC_JACOBIAN

    def __post_init__(self):
        for k in ("center", "translation", "domain_origin", "domain_size", "angles_deg", "scales", "shear"):
            setattr(self, k, np.asarray(getattr(self, k), dtype=np.float64).reshape(3))
        self.matrix = np.asarray(self.matrix, dtype=np.float64).reshape(3, 3)
        self.domain_direction = np.asarray(self.domain_direction, dtype=np.float64).reshape(3, 3)
        n_ctrl = int(np.prod(np.array(self.params.control_grid) + 3))
        self.control_points = np.asarray(self.control_points, dtype=np.float64).reshape(n_ctrl, 3)

    # ------------------------------------------------------------------ transforms
    @property
    def control_spacing(self) -> np.ndarray:
        return self.domain_size / np.array(self.params.control_grid)

    def affine_transform(self):
        import SimpleITK as sitk

        aff = sitk.AffineTransform(3)
        aff.SetCenter(self.center.tolist())
        aff.SetMatrix(self.matrix.reshape(-1).tolist())
        aff.SetTranslation(self.translation.tolist())
        return aff

    def elastic_transform(self):
        import SimpleITK as sitk

        bs = sitk.BSplineTransform(3, 3)
        bs.SetTransformDomainOrigin(self.domain_origin.tolist())
        bs.SetTransformDomainPhysicalDimensions(self.domain_size.tolist())
        bs.SetTransformDomainDirection(self.domain_direction.reshape(-1).tolist())
        bs.SetTransformDomainMeshSize(list(self.params.control_grid))
        bs.SetParameters(self.control_points.T.reshape(-1).tolist())  # all x, then all y, then all z
        return bs

    def transform(self):
        """``T`` as one SimpleITK transform (the B-spline is applied first, then the affine)."""
        import SimpleITK as sitk

        comp = sitk.CompositeTransform(3)
        comp.AddTransform(self.affine_transform())
        comp.AddTransform(self.elastic_transform())  # the last added acts first
        return comp

    def transform_points(self, points) -> np.ndarray:
        """``T(p)`` for world points ``(N, 3)`` (exact, SimpleITK; for checks, not for volumes)."""
        tr = self.transform()
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return np.array([tr.TransformPoint(tuple(p)) for p in pts.tolist()]).reshape(-1, 3)

    def displacement_at(self, points) -> np.ndarray:
        """``T(p) − p`` (mm) at world points ``(N, 3)``."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return self.transform_points(pts) - pts

    def displacement_bound(self, radius_mm: float) -> float:
        """``|T(p) − p|`` bound for ``|p − c| ≤ radius_mm`` with this sample's M, t and control points."""
        m_minus_i = np.linalg.norm(self.matrix - np.eye(3), 2)
        e = np.linalg.norm(self.control_points, axis=1).max(initial=0.0)
        return float(m_minus_i * radius_mm + np.linalg.norm(self.matrix, 2) * e + np.linalg.norm(self.translation))

    def jacobian_bound(self) -> float:
        """ρ of this sample's elastic field (≤ MAX_ELASTIC_JACOBIAN by construction)."""
        e = np.linalg.norm(self.control_points, axis=1).max(initial=0.0)
        return elastic_jacobian_bound(e, self.control_spacing)

    # ------------------------------------------------------------------ sampling positions
    def _coarse_field(self, vol: Volume, node_mm: float | None = None):
        """Exact ``T`` on a lattice of ``vol``'s grid whose first and last nodes are the first and
        last voxel centres of each axis (so every node lies inside the B-spline's domain):
        ``(nodes, disp)`` with ``disp`` the displacement in ``vol``'s index units,
        ``(3, nodes_k, nodes_j, nodes_i)`` float32 torch."""
        import SimpleITK as sitk
        import torch

        if node_mm is None:
            node_mm = min(6.0, float(self.control_spacing.min()) / 10)
        n = np.array(vol.shape_xyz)
        f = np.maximum(1.0, node_mm / vol.spacing)
        nodes = np.where(n > 1, np.ceil((n - 1) / f).astype(int) + 1, 1)
        step = np.where(n > 1, (n - 1) / np.maximum(nodes - 1, 1), 1.0)  # voxels between nodes (≤ f)
        disp = sitk.TransformToDisplacementField(
            self.transform(), sitk.sitkVectorFloat64, [int(x) for x in nodes], vol.origin.tolist(),
            (vol.spacing * step).tolist(), vol.direction.reshape(-1).tolist(),
        )
        d = sitk.GetArrayFromImage(disp)  # (nk, nj, ni, 3) world mm
        d_idx = d @ np.linalg.inv(vol.affine[:3, :3]).T  # → index units (i, j, k)
        t = torch.from_numpy(np.ascontiguousarray(d_idx.transpose(3, 0, 1, 2), dtype=np.float32))
        return nodes, t

    @staticmethod
    def _slab_index(coarse, shape_kji, k0: int, k1: int, scale=None):
        """Source positions ``(k1−k0, nj, ni, 3)`` as (i, j, k) for slices ``k0..k1−1``: continuous
        indices, or ``index·scale − 1`` (grid_sample's normalised coordinates) when ``scale`` is given.

        Trilinear interpolation of the node lattice, done separably: the node planes the slab
        needs are upsampled in-plane (bilinear) and given the voxel's own coordinates (which
        linear interpolation reproduces exactly), then each slice is a lerp of two planes.
        """
        import torch

        nodes, disp = coarse
        nk, nj, ni = shape_kji
        mk = int(nodes[2])
        s = torch.ones(3) if scale is None else torch.as_tensor(scale, dtype=torch.float32)
        shift = 0.0 if scale is None else 1.0
        step = (nk - 1) / (mk - 1) if mk > 1 else 1.0  # slices between node planes
        t = np.arange(k0, k1) / step  # node coordinate of each slice
        lo = np.clip(np.floor(t).astype(int), 0, max(mk - 2, 0))
        c0, c1 = int(lo.min()), min(int(lo.max()) + 1, mk - 1)
        planes = disp[:, c0 : c1 + 1].permute(1, 0, 2, 3)  # (planes, 3, nodes_j, nodes_i)
        if tuple(planes.shape[2:]) != (nj, ni):  # bilinear, align_corners=True
            planes = _upsample_linear(_upsample_linear(planes, 2, nj), 3, ni)
        planes = (planes.permute(0, 2, 3, 1) * s).contiguous()  # (planes, nj, ni, 3), scaled
        planes[..., 0] += torch.arange(ni, dtype=torch.float32) * s[0] - shift
        planes[..., 1] += (torch.arange(nj, dtype=torch.float32) * s[1] - shift)[:, None]
        planes[..., 2] += (torch.arange(c0, c1 + 1, dtype=torch.float32) * (step * s[2]) - shift)[:, None, None]
        g = torch.empty((k1 - k0, nj, ni, 3), dtype=torch.float32)
        if mk == 1:
            g[:] = planes[0]
            return g
        w_all = torch.from_numpy((t - lo).astype(np.float32))
        for L in np.unique(lo):  # slices between node planes L and L + 1 (a contiguous run)
            a, b = np.searchsorted(lo, L), np.searchsorted(lo, L, side="right")
            torch.lerp(planes[L - c0].expand(b - a, -1, -1, -1), planes[L + 1 - c0].expand(b - a, -1, -1, -1),
                       w_all[a:b, None, None, None].expand(b - a, nj, ni, 3), out=g[a:b])
        return g

    def source_index(self, vol: Volume) -> np.ndarray:
        """Where each voxel of the deformed ``vol`` samples the original: ``(nk, nj, ni, 3)`` (i, j, k)
        continuous indices — the positions ``apply`` uses (whole volume at once: for checks)."""
        coarse = self._coarse_field(vol)
        return self._slab_index(coarse, vol.array.shape, 0, vol.array.shape[0]).numpy()

    # ------------------------------------------------------------------ applying
    def apply(self, vol: Volume, kind: str = "ct") -> Volume:
        """The deformed volume on ``vol``'s own grid.

        ``kind="ct"``: trilinear, −1024 HU outside the scan, rounded back to an integer dtype
        (float volumes stay float).
        ``kind="labels"``: nearest neighbour, 0 outside; ids and dtype kept.
        """
        return self.apply_many((vol, kind))[0]

    def apply_many(self, *items: tuple[Volume, str]) -> list[Volume]:
        """Deform several volumes on one grid (e.g. ``(ct, "ct"), (seg, "labels")``) through the
        same sampling positions, computed once."""
        import torch
        import torch.nn.functional as F

        if not items:
            return []
        vols = [v for v, _ in items]
        for v, kind in items:
            if kind not in ("ct", "labels"):
                raise ValueError(f"kind must be 'ct' or 'labels', got {kind!r}")
            arr = np.asarray(v.array)
            if arr.ndim != 3:
                raise ValueError(f"apply needs a 3D volume, got shape {arr.shape}")
            if kind == "labels" and not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"labels must be an integer volume, got {arr.dtype}")
            if kind == "labels" and arr.size and int(arr.max()) >= 2**24:
                raise ValueError("label ids must be < 2**24 (exact in float32)")
            if not v.same_grid(vols[0]):
                raise ValueError(f"apply_many: volumes must share a grid ({v.grid_text(vols[0])} vs {vols[0].grid_text(v)})")
        shape = vols[0].array.shape
        nk, nj, ni = shape
        coarse = self._coarse_field(vols[0])
        scale = [2.0 / max(ni - 1, 1), 2.0 / max(nj - 1, 1), 2.0 / max(nk - 1, 1)]
        srcs = [torch.from_numpy(np.asarray(v.array, dtype=np.float32))[None, None] for v in vols]
        outs = [np.empty(shape, np.asarray(v.array).dtype) for v in vols]
        # SimpleITK's edge rule: a point within half a voxel beyond the outer voxel centres reads
        # the edge voxel ("border" padding); farther out it gets the default (air / background)
        lim = torch.tensor([(ni - 0.5) * scale[0] - 1, (nj - 0.5) * scale[1] - 1, (nk - 0.5) * scale[2] - 1])
        low = -1 - 0.5 * torch.tensor(scale)

        def slab(k0: int, k1: int) -> None:
            grid = self._slab_index(coarse, shape, k0, k1, scale)[None]
            outside = ((grid < low) | (grid >= lim)).any(dim=-1)[0]
            for (v, kind), src, out in zip(items, srcs, outs):
                res = F.grid_sample(src, grid, mode="bilinear" if kind == "ct" else "nearest",
                                    padding_mode="border", align_corners=True)[0, 0]
                res[outside] = AIR_HU if kind == "ct" else 0.0
                if kind == "ct" and np.issubdtype(out.dtype, np.integer):
                    info = np.iinfo(out.dtype)
                    res = torch.clamp(torch.round(res), info.min, info.max)  # (labels are exact already)
                out[k0:k1] = res.numpy().astype(out.dtype, copy=False)

        # grid_sample's 3D CPU kernel runs on one thread: slabs go to a thread pool (torch
        # releases the GIL); each slab's result does not depend on the schedule
        step = max(1, _SLAB_VOXELS // max(nj * ni, 1))
        starts = list(range(0, nk, step))
        workers = max(1, min(torch.get_num_threads(), len(starts)))
        with torch.no_grad():
            if workers == 1:
                for k0 in starts:
                    slab(k0, min(nk, k0 + step))
            else:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(workers) as ex:
                    for f in [ex.submit(slab, k0, min(nk, k0 + step)) for k0 in starts]:
                        f.result()
        return [v.with_array(out) for v, out in zip(vols, outs)]

    # ------------------------------------------------------------------ records
    def to_dict(self) -> dict:
        """Everything needed to rebuild ``T`` exactly (JSON-safe; floats round-trip exactly)."""
        norms = np.linalg.norm(self.control_points, axis=1)
        radius = float(np.linalg.norm(self.domain_size) / 2)
        return {
            "format": DEFORMATION_FORMAT,
            "convention": "deformed(p) = original(T(p)), T(p) = M (p + b(p) - c) + c + t; "
                          "b: cubic B-spline over the domain; LPS mm",
            "seed": int(self.seed),
            "params": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.params).items()},
            "center": self.center.tolist(),
            "matrix": self.matrix.tolist(),
            "translation": self.translation.tolist(),
            "angles_deg": self.angles_deg.tolist(),
            "scales": self.scales.tolist(),
            "shear": self.shear.tolist(),
            "elastic_scale": float(self.elastic_scale),
            "domain_origin": self.domain_origin.tolist(),
            "domain_size": self.domain_size.tolist(),
            "domain_direction": self.domain_direction.tolist(),
            "control_points": self.control_points.tolist(),
            "summary": {
                "max_control_displacement_mm": float(norms.max(initial=0.0)),
                "rms_control_displacement_mm": float(np.sqrt(np.mean(norms**2))) if norms.size else 0.0,
                "displacement_bound_mm": self.displacement_bound(radius),
                "elastic_jacobian_bound": self.jacobian_bound(),
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Deformation":
        if not isinstance(d, dict) or d.get("format") != DEFORMATION_FORMAT:
            raise ValueError(f"not an X2Recon deformation record (expected format {DEFORMATION_FORMAT!r})")
        try:
            p = dict(d["params"])
            p["control_grid"] = tuple(p["control_grid"])
            return cls(
                int(d["seed"]), DeformationParams(**p), d["center"], d["matrix"], d["translation"],
                d["domain_origin"], d["domain_size"], d["domain_direction"], d["control_points"],
                d["angles_deg"], d["scales"], d["shear"], float(d["elastic_scale"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid deformation record: {e}") from None


def _upsample_linear(t, dim: int, n_out: int):
    """Linear resampling of ``t`` along ``dim`` to ``n_out`` samples, end points kept (as
    ``align_corners=True``).  Only element-wise ops: the result is the same bytes whatever
    torch's thread count (``F.interpolate``'s CPU kernel rounds differently with more threads,
    which made a variant depend on what the process had run before)."""
    import torch

    n_in = t.shape[dim]
    if n_in == n_out:
        return t
    if n_in == 1:
        return t.expand(*[n_out if d == dim else -1 for d in range(t.dim())]).contiguous()
    pos = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_in - 2)
    shape = [1] * t.dim()
    shape[dim] = n_out
    w = torch.from_numpy((pos - lo).astype(np.float32)).reshape(shape)
    a = t.index_select(dim, torch.from_numpy(lo))
    b = t.index_select(dim, torch.from_numpy(lo + 1))
    return a + (b - a) * w


def random_deformation(
    seed: int,
    reference: Volume,
    *,
    max_rotation_deg: float = 5.0,
    max_scale: float = 0.06,
    max_shear: float = 0.03,
    max_translation_mm: float = 5.0,
    elastic_mm: float = 8.0,
    control_grid=(4, 4, 4),
    params: DeformationParams | None = None,
) -> Deformation:
    """A deformation drawn from ``seed`` over ``reference``'s physical domain (see module docstring).

    ``params`` (a DeformationParams) replaces the keyword limits when given.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if params is None:
        params = DeformationParams(max_rotation_deg, max_scale, max_shear, max_translation_mm, elastic_mm,
                                   tuple(control_grid))
    rng = np.random.default_rng(int(seed))
    angles = rng.uniform(-params.max_rotation_deg, params.max_rotation_deg, 3)
    scales = 1 + rng.uniform(-params.max_scale, params.max_scale, 3)
    shear = rng.uniform(-params.max_shear, params.max_shear, 3)
    t = _in_ball(rng, 1, params.max_translation_mm)[0]
    n_ctrl = int(np.prod(np.array(params.control_grid) + 3))
    ctrl = _in_ball(rng, n_ctrl, params.elastic_mm)

    H = np.eye(3)
    H[0, 1], H[0, 2], H[1, 2] = shear
    M = _rotation(np.radians(angles)) @ np.diag(scales) @ H
    center = reference.corners_world().mean(0)
    size = reference.spacing * np.array(reference.shape_xyz, dtype=np.float64)
    origin = reference.index_to_world(np.array([-0.5, -0.5, -0.5]))
    rho = elastic_jacobian_bound(params.elastic_mm, size / np.array(params.control_grid))
    scale = min(1.0, MAX_ELASTIC_JACOBIAN / rho) if rho > 0 else 1.0
    return Deformation(int(seed), params, center, M, t, origin, size, reference.direction.copy(), ctrl * scale,
                       angles, scales, shear, scale)
