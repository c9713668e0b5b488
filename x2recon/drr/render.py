"""render_drr: CT volume + ProjectionGeometry → DRR (line integrals, display image, metadata)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..geometry import ProjectionGeometry
from ..io.atomic import atomic_path
from ..io.volume import Volume
from .attenuation import MU_WATER, hu_to_mu
from .display import to_display, to_uint16


@dataclass
class DRRImage:
    line_integral: np.ndarray  # (H, W) float32, Σ μ·mm (dimensionless)
    display: np.ndarray  # (H, W) uint16
    geometry: ProjectionGeometry
    mapping: dict = field(default_factory=dict)

    def resized(self, size: int | tuple[int, int]) -> "DRRImage":
        """Area-averaged resampling to ``size`` (e.g. 224² for X2B) with the matching geometry."""
        import torch
        import torch.nn.functional as F

        w, h = (size, size) if isinstance(size, int) else size
        def area(a):
            t = torch.from_numpy(np.asarray(a, np.float32))[None, None]
            return F.interpolate(t, size=(h, w), mode="area")[0, 0].numpy()
        disp = area(self.display.astype(np.float32) / 65535.0)
        return replace(
            self,
            line_integral=area(self.line_integral),
            display=to_uint16(disp),
            geometry=self.geometry.resized(w, h),
            mapping={**self.mapping, "resized_from": list(self.geometry.size)},
        )


def _device(device: str):
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no CUDA GPU")
    return device


def render_drr(ct: Volume, geometry: ProjectionGeometry, *, device: str = "auto", clahe: bool = True,
               clahe_clip: float = 0.01, mu_water: float = MU_WATER, progress=None, cancel=None) -> DRRImage:
    """Exact Siddon DRR of a CT (HU) for one geometry, on CUDA (Triton) or CPU (torch)."""
    import torch

    from .siddon import line_integrals

    dev = _device(device)
    mu = hu_to_mu(torch.from_numpy(np.asarray(ct.array, dtype=np.float32)).to(dev), mu_water=mu_water)
    li = line_integrals(mu, ct.affine, geometry, progress=progress, cancel=cancel).cpu().numpy()
    disp, mapping = to_display(li, clahe=clahe, clahe_clip=clahe_clip)
    mapping.update(mu_water_per_mm=mu_water, renderer="siddon-exact", device=str(dev))
    return DRRImage(li, to_uint16(disp), geometry, mapping)


def write_drr(img: DRRImage, folder: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` (16-bit), ``<stem>.json`` (geometry) and ``<stem>_mu.npy`` atomically."""
    from ..io.image import write_png16

    folder = Path(folder)
    png, js, npy = folder / f"{stem}.png", folder / f"{stem}.json", folder / f"{stem}_mu.npy"
    write_png16(img.display, png)
    img.geometry.to_json(js)
    with atomic_path(npy) as tmp:
        np.save(tmp, img.line_integral.astype(np.float32))
    return [png, js, npy]


def read_drr(folder: str | Path, stem: str) -> DRRImage:
    from ..io.image import read_png

    folder = Path(folder)
    geom = ProjectionGeometry.from_json(folder / f"{stem}.json")
    li_path = folder / f"{stem}_mu.npy"
    li = np.load(li_path) if li_path.exists() else None
    return DRRImage(li, read_png(folder / f"{stem}.png"), geom, {})
