"""render_drr: CT (HU) + ProjectionGeometry → DRR (line integrals, 16-bit display image, metadata).

Files of one DRR (``write_drr``/``read_drr``), all written atomically:
``<stem>.png`` 16-bit display image, ``<stem>.json`` the geometry (``io.xray.write_geometry``),
``<stem>_mu.npy`` float32 line integrals Σ μ·mm (dimensionless).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import X2ReconInputError
from ..geometry import ProjectionGeometry
from ..io.atomic import atomic_path
from ..io.image import area_matrix
from ..io.volume import Volume
from ..io.xray import write_geometry
from .attenuation import MU_AIR, MU_WATER, hu_to_mu
from .display import to_display, to_uint16


@dataclass
class DRRImage:
    """A rendered DRR: ``line_integral`` (H, W) float32 Σ μ·mm, ``display`` (H, W) uint16,
    the ``geometry`` it was rendered with and the display ``mapping`` (for meta.json)."""

    line_integral: np.ndarray | None
    display: np.ndarray
    geometry: ProjectionGeometry
    mapping: dict = field(default_factory=dict)

    def resized(self, size: int | tuple[int, int]) -> "DRRImage":
        """Area-weighted resampling to ``size`` (an int for a square, or (width, height)), e.g. the
        224² X2B input; the geometry keeps the detector's physical extent (``geometry.resized``)."""
        w, h = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
        if w <= 0 or h <= 0:
            raise ValueError(f"size must be positive, got {size!r}")
        H, W = self.display.shape
        ry, rx = area_matrix(H, h), area_matrix(W, w)
        resample = lambda a: (ry @ np.asarray(a, dtype=np.float64) @ rx.T)
        li = None if self.line_integral is None else resample(self.line_integral).astype(np.float32)
        disp = resample(self.display.astype(np.float64) / 65535.0)
        return replace(
            self,
            line_integral=li,
            display=to_uint16(disp),
            geometry=self.geometry.resized(w, h),
            mapping={**self.mapping, "resized_from": [W, H], "resampling": "area"},
        )


def resolve_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` when torch sees a GPU, else ``"cpu"``; a clear error for a missing GPU."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA GPU (use device='cpu' or 'auto')")
    return str(device)


@dataclass
class Attenuation:
    """μ (1/mm) of one CT on one device, computed once and shared by all the views rendered from it.

    ``mu``: [k, j, i] float32; on CPU a view into ``padded``, the zero-padded flat copy the torch
    tracer reads (``siddon.padded_flat``), so neither HU → μ nor the padding is redone per view.
    """

    mu: object  # torch.Tensor
    padded: object | None  # torch.Tensor (CPU) or None
    device: str
    mu_water: float
    mu_air: float


def attenuation(ct: Volume, device: str = "auto", *, mu_water: float = MU_WATER, mu_air: float = MU_AIR) -> Attenuation:
    """HU → μ of ``ct`` on ``device`` ("auto": CUDA when available), for ``render_drr(attenuation=…)``."""
    import torch

    dev = resolve_device(device)
    hu = torch.from_numpy(np.ascontiguousarray(ct.array)).to(dev)  # transfer int16, convert there
    mu = hu_to_mu(hu.float(), mu_water=mu_water, mu_air=mu_air)
    del hu
    padded = None
    if mu.device.type == "cpu":
        from .siddon import padded_flat

        padded = padded_flat(mu)
        mu = padded.view(*(n + 2 for n in mu.shape))[1:-1, 1:-1, 1:-1]
    return Attenuation(mu, padded, dev, mu_water, mu_air)


def render_drr(
    ct: Volume,
    geometry: ProjectionGeometry,
    *,
    device: str = "auto",
    clahe: bool = True,
    clahe_clip: float = 0.01,
    progress: Callable[[float, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    mu_water: float = MU_WATER,
    mu_air: float = MU_AIR,
    percentile: float = 99.9,
    backend: str = "auto",
    attenuation: Attenuation | None = None,
) -> DRRImage:
    """Exact Siddon DRR of a CT in HU for one geometry, on CUDA (Triton kernel) or CPU (torch).

    HU → μ with the water/air references (``attenuation.py``), line integrals through the volume's
    own affine (oblique directions are exact), then the display map (``display.py``).
    ``progress(fraction, message)`` and ``cancel() -> bool`` are polled while tracing on CPU.
    ``backend``: ``"auto"`` (Triton on CUDA when triton imports, numba on CPU when numba imports, else torch),
    ``"torch"``, ``"numba"`` or ``"triton"``;
    the metadata's ``renderer`` names the path that actually traced the rays.  ``attenuation``:
    ``attenuation(ct, device, mu_water=…, mu_air=…)`` computed once for several views of ``ct``.
    """
    from .siddon import auto_backend, line_integrals

    if not isinstance(ct, Volume):
        raise TypeError(f"render_drr needs an x2recon Volume, got {type(ct).__name__}")
    if not isinstance(geometry, ProjectionGeometry):
        raise TypeError(f"render_drr needs a ProjectionGeometry, got {type(geometry).__name__}")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    att = _attenuation_for(ct, dev, mu_water, mu_air, attenuation)
    mu = att.mu
    if backend == "auto":  # decided here, so the metadata names the path taken (CUDA without triton: torch)
        backend = auto_backend(mu)
    li = line_integrals(mu, ct.affine, geometry, progress=progress, cancel=cancel, backend=backend,
                        padded=att.padded).cpu().numpy()
    seconds = time.perf_counter() - t0
    disp, mapping = to_display(li, percentile=percentile, clahe=clahe, clahe_clip=clahe_clip)
    mapping.update(
        line_integral="sum of mu [1/mm] x length [mm] (dimensionless), float32 in <stem>_mu.npy",
        mu_water_per_mm=mu_water,
        mu_air_per_mm=mu_air,
        renderer=f"siddon-exact/{backend}",
        device=dev,
        render_seconds=round(seconds, 3),
        bits=16,
    )
    if progress is not None:
        progress(1.0, "DRR rendered")
    return DRRImage(li.astype(np.float32, copy=False), to_uint16(disp), geometry, mapping)


def _attenuation_for(ct: Volume, dev: str, mu_water: float, mu_air: float, given: Attenuation | None) -> Attenuation:
    """``given`` after checking that it fits ``ct`` and the settings, else a fresh one."""
    if given is None:
        return attenuation(ct, dev, mu_water=mu_water, mu_air=mu_air)
    if not isinstance(given, Attenuation):
        raise TypeError(f"attenuation must come from drr.render.attenuation(), got {type(given).__name__}")
    if tuple(given.mu.shape) != tuple(np.shape(ct.array)) or given.device != dev or \
            (given.mu_water, given.mu_air) != (mu_water, mu_air):
        raise ValueError(f"attenuation was computed for a {tuple(given.mu.shape)} CT on {given.device} with "
                         f"mu_water={given.mu_water}, mu_air={given.mu_air}; this call renders a "
                         f"{tuple(np.shape(ct.array))} CT on {dev} with mu_water={mu_water}, mu_air={mu_air}")
    return given


def drr_paths(folder: str | Path, stem: str) -> tuple[Path, Path, Path]:
    folder = Path(folder)
    return folder / f"{stem}.png", folder / f"{stem}.json", folder / f"{stem}_mu.npy"


def write_drr(img: DRRImage, folder: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` (16-bit), ``<stem>.json`` (geometry) and ``<stem>_mu.npy`` atomically.

    The line integrals are skipped when ``img.line_integral`` is None.  Returns the written paths.
    """
    from ..io.image import write_png16

    png, js, npy = drr_paths(folder, stem)
    h, w = img.display.shape
    if (w, h) != tuple(img.geometry.size):
        raise ValueError(f"DRR image is {w}×{h} but its geometry is {img.geometry.size[0]}×{img.geometry.size[1]}")
    write_png16(img.display, png)
    write_geometry(img.geometry, js)
    written = [png, js]
    if img.line_integral is not None:
        with atomic_path(npy) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(img.line_integral, dtype=np.float32))
        written.append(npy)
    return written


def read_drr(folder: str | Path, stem: str) -> DRRImage:
    """Read a DRR written by ``write_drr`` (``line_integral`` is None when ``<stem>_mu.npy`` is absent).

    The display mapping lives in the dataset's ``meta.json``, not beside the image: ``mapping`` is
    empty here.
    """
    from ..io.image import read_png

    png, js, npy = drr_paths(folder, stem)
    geom = ProjectionGeometry.from_json(js)
    disp = read_png(png)
    if disp.dtype != np.uint16:
        raise X2ReconInputError(png, f"expected a 16-bit DRR, got {disp.dtype}")
    if disp.shape != (geom.height, geom.width):
        raise X2ReconInputError(png, f"image is {disp.shape[1]}×{disp.shape[0]} but {js.name} says "
                                     f"{geom.width}×{geom.height}")
    li = None
    if npy.exists():
        try:
            li = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise X2ReconInputError(npy, f"cannot read line integrals: {e}") from None
        if li.shape != disp.shape:
            raise X2ReconInputError(npy, f"line integrals {li.shape} do not match the image {disp.shape}")
    return DRRImage(li, disp, geom, {})
