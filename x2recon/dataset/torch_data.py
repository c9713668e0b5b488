"""torch Datasets over a built dataset folder (``x2recon build-dataset``) for X2B and X2B2.

A training item is one case: a random one of its DRR views (X2B) or its frontal + lateral pair
(X2B2) at the network's input size, each view's box → image ``grid`` matrix from its geometry, and
``n_points`` random occupancy samples in box coordinates.  Training augmentation changes only what
the geometry can follow: intensities (gamma, contrast, brightness, noise) and an in-plane shift of
the image content with the detector slid to match (``ProjectionGeometry.pixel_shifted``).
Validation items are fixed (case, view) pairs with uniform box points whose occupancy is computed
from the case's bone mesh once (Occupancy Networks' IoU is over uniform points).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import X2ReconInputError
from ..geometry import ProjectionGeometry
from ..io.xray import XRay, xray_from_array
from .occupancy import load_points


def read_split(root: str | Path, split: str) -> list[str]:
    """Case ids of ``splits/<split>.txt`` (or every built case for ``split='all'``)."""
    root = Path(root)
    if not (root / "cases").is_dir():
        raise X2ReconInputError(root, "not an x2recon dataset (no cases/ folder); build one with 'x2recon build-dataset'")
    if split == "all":
        return sorted(p.name for p in (root / "cases").iterdir() if (p / "meta.json").is_file())
    f = root / "splits" / f"{split}.txt"
    if not f.is_file():
        raise X2ReconInputError(f, f"split {split!r} not found (run 'x2recon manifest {root}')")
    ids = [line.strip() for line in f.read_text().splitlines() if line.strip()]
    if not ids:
        raise X2ReconInputError(f, f"split {split!r} is empty")
    return ids


@dataclass
class CaseInfo:
    case_id: str
    folder: Path
    views: list[str]
    box_size: float
    isocenter: list[float]



def has_split(root: str | Path, split: str) -> bool:
    """Whether ``split`` is named and its ``splits/<split>.txt`` lists at least one case."""
    f = Path(root) / "splits" / f"{split}.txt"
    return bool(split) and f.is_file() and bool(f.read_text().strip())


def dataset_build_config(root: str | Path) -> dict:
    """The dataset's build settings (geometry, views, sizes) from its first case's meta.json."""
    root = Path(root)
    first = read_split(root, "all")[0]
    meta = json.loads((root / "cases" / first / "meta.json").read_text())
    return meta["config"]

def case_info(root: Path, case_id: str) -> CaseInfo:
    folder = root / "cases" / case_id
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise X2ReconInputError(folder, "case not built (no meta.json)")
    meta = json.loads(meta_path.read_text())
    return CaseInfo(case_id, folder, list(meta["views"]), float(meta["box_size"]), list(meta["isocenter"]))


def view_image_stem(folder: Path, view: str, size: int) -> str:
    """The stored DRR closest to ``size`` (the network input size, else the full DRR)."""
    return f"{view}_{size}" if (folder / "images" / f"{view}_{size}.png").is_file() else view


@lru_cache(maxsize=4096)
def _geometry(json_path: str) -> ProjectionGeometry:
    return ProjectionGeometry.from_json(Path(json_path))


def load_view(folder: Path, view: str, size: int) -> XRay:
    """One stored DRR of a case as an ``XRay`` resized to ``size``²."""
    from ..io.image import read_png

    stem = view_image_stem(folder, view, size)
    png, js = folder / "images" / f"{stem}.png", folder / "images" / f"{stem}.json"
    return xray_from_array(read_png(png), _geometry(str(js)), str(png)).resized(size)


def augment_xray(x: XRay, gen: torch.Generator, max_shift: float = 0.08) -> XRay:
    """Random intensity changes and an in-plane shift that the geometry follows."""
    r = lambda lo, hi: float(lo + (hi - lo) * torch.rand((), generator=gen))
    img = x.image.astype(np.float32)
    img = np.power(np.clip(img, 0, 1), np.exp(r(-0.3, 0.3)))
    img = (img - 0.5) * r(0.85, 1.15) + 0.5 + r(-0.05, 0.05)
    sigma = r(0.0, 0.02)
    if sigma > 0:
        noise = torch.randn(img.shape, generator=gen).numpy()
        img = img + sigma * noise
    H, W = img.shape
    dx = int(round(r(-max_shift, max_shift) * W))
    dy = int(round(r(-max_shift, max_shift) * H))
    if dx or dy:
        out = np.zeros_like(img)
        ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
        xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
        out[yd, xd] = img[ys, xs]
        img = out
    return XRay(np.clip(img, 0, 1).astype(np.float32), x.geometry.pixel_shifted(dx, dy), x.source)


def views_for(kind: str, available: list[str], wanted: list[str], case_id: str) -> list[str]:
    """Training view pool (X2B) or the [frontal, lateral] pair (X2B2) present in a case."""
    if kind == "x2b2":
        missing = [v for v in wanted if v not in available]
        if missing:
            raise X2ReconInputError(case_id, f"X2B2 needs views {wanted}; the case has {available}")
        return list(wanted)
    pool = [v for v in available if v in wanted] if wanted else list(available)
    if not pool:
        raise X2ReconInputError(case_id, f"none of the training views {wanted} were rendered (case has {available})")
    return pool


class OccupancyDataset(torch.utils.data.Dataset):
    """Training items for X2B (``kind='x2b'``) or X2B2 (``'x2b2'``); see module doc."""

    def __init__(self, root: str | Path, split: str = "train", *, kind: str = "x2b", views: list[str] | None = None,
                 image_size: int = 224, n_points: int = 2048, augment: bool = True, seed: int = 0):
        self.root = Path(root)
        self.kind, self.image_size, self.n_points, self.augment, self.seed = kind, image_size, n_points, augment, seed
        self.cases = [case_info(self.root, c) for c in read_split(self.root, split)]
        self.wanted = [v.upper() for v in (views or [])]
        self.pools = [views_for(kind, c.views, self.wanted, c.case_id) for c in self.cases]
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.cases)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, index: int, epoch: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + index)
        return g

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index, or ``(index, epoch)`` from :class:`EpochSampler` (data-loading workers
        keep their own copy of the dataset, so the epoch must travel with the index)."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        case, pool = self.cases[index], self.pools[index]
        gen = self._generator(index, epoch)
        if self.kind == "x2b2":
            views = pool
        else:
            views = [pool[int(torch.randint(len(pool), (), generator=gen))]]
        images, grids = [], []
        for v in views:
            x = load_view(case.folder, v, self.image_size)
            if self.augment:
                x = augment_xray(x, gen)
            img, grid = x.network_input(self.image_size)
            images.append(img)
            grids.append(grid)
        pts, occ = load_points(case.folder / "points.npz")
        idx = torch.randperm(len(pts), generator=gen)[: self.n_points].numpy()
        return {
            "images": torch.from_numpy(np.stack(images)),
            "grid": torch.from_numpy(np.stack(grids)),
            "points": torch.from_numpy(pts[idx]),
            "occupancies": torch.from_numpy(occ[idx].astype(np.float32)),
        }


class EpochSampler(torch.utils.data.Sampler):
    """Wraps a sampler (e.g. ``DistributedSampler``) to yield ``(index, epoch)``, so each epoch draws
    new views, points and augmentations even in persistent data-loading workers."""

    def __init__(self, base):
        self.base, self.epoch = base, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def __iter__(self):
        return ((i, self.epoch) for i in self.base)

    def __len__(self) -> int:
        return len(self.base)


class ValidationDataset(torch.utils.data.Dataset):
    """Every (case, view) of a split (X2B) or every case's pair (X2B2), with ``n_uniform`` uniform
    box points labelled by the case's merged bone mesh (libigl winding number), computed once."""

    def __init__(self, root: str | Path, split: str = "val", *, kind: str = "x2b", views: list[str] | None = None,
                 image_size: int = 224, n_uniform: int = 20_000, seed: int = 0):
        self.root = Path(root)
        self.kind, self.image_size = kind, image_size
        self.cases = [case_info(self.root, c) for c in read_split(self.root, split)]
        wanted = [v.upper() for v in (views or [])]
        self.items = []
        for i, c in enumerate(self.cases):
            pool = views_for(kind, c.views, wanted, c.case_id)
            if kind == "x2b2":
                self.items.append((i, tuple(pool)))
            else:
                self.items += [(i, (v,)) for v in pool]
        self.n_uniform, self.seed = n_uniform, seed
        self._labels: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def uniform_points(self, case_index: int) -> tuple[np.ndarray, np.ndarray]:
        if case_index not in self._labels:
            from ..io.mesh import read_mesh
            from .occupancy import inside

            c = self.cases[case_index]
            mesh = read_mesh(c.folder / "meshes" / "bones_box.ply")
            rng = np.random.default_rng(self.seed + case_index)
            pts = rng.uniform(-0.5, 0.5, (self.n_uniform, 3)).astype(np.float32)
            self._labels[case_index] = (pts, inside(mesh, pts).astype(np.float32))
        return self._labels[case_index]

    def __getitem__(self, index: int) -> dict:
        ci, views = self.items[index]
        c = self.cases[ci]
        images, grids = zip(*(load_view(c.folder, v, self.image_size).network_input(self.image_size) for v in views))
        pts, occ = self.uniform_points(ci)
        return {
            "images": torch.from_numpy(np.stack(images)),
            "grid": torch.from_numpy(np.stack(grids)),
            "points": torch.from_numpy(pts),
            "occupancies": torch.from_numpy(occ),
            "case_id": c.case_id,
            "view": "+".join(views),
        }
