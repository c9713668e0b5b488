"""torch Datasets for SPIDER over a built dataset folder: the frontal + lateral DRR pair and points of
the case's SPIDER targets (``spider/ct.nii.gz`` and ``spider/labels.nii.gz``, the box grid of
``x2recon.dataset.spider_targets``).

Classes.  A SPIDER class joins one or more TotalSegmentator structures (a group such as ``ribs`` or a
single name such as ``vertebrae_T7``); class 0 is background.  Each case's labelmap ids are mapped to
classes through the names in its ``meta.json``, so cases segmented with other id conventions agree.

Points are voxel centres of the target grid, so targets are exact (no interpolation of labels);
``foreground_fraction`` of them (0 = uniform, the paper's sampling) are drawn from labelled voxels.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..errors import X2ReconInputError
from ..structures import group_of, groups, resolve_structures
from .spider_targets import box_centres
from .torch_data import augment_xray, case_info, load_view, read_split


def default_classes(structures: list[str]) -> list[str]:
    """One class per detection group (cervical, thoracic, lumbar, ribs) present in ``structures``,
    and one per other structure, in order of first appearance."""
    return list(dict.fromkeys(group_of(n) for n in structures))


def class_members(classes: list[str]) -> dict[str, list[str]]:
    """Class name → the TotalSegmentator names it joins (groups expand; a name stands for itself)."""
    g = groups()
    out, seen = {}, {}
    for c in classes:
        names = g[c] if c in g else resolve_structures([c])
        for n in names:
            if n in seen:
                raise ValueError(f"structure {n} is in two classes ({seen[n]} and {c})")
            seen[n] = c
        out[c] = list(names)
    return out


def class_lut(names: dict[int, str], classes: list[str], members: dict[str, list[str]]) -> np.ndarray:
    """Lookup table labelmap id → class index (0 background) for one case's ``{id: name}``; a name is a
    class's member structure or the class's own name."""
    of = {c: i + 1 for i, c in enumerate(classes)}  # a labelmap may name a class itself (e.g. "ribs")
    of.update({n: i + 1 for i, c in enumerate(classes) for n in members.get(c, [])})
    lut = np.zeros(max([0, *names]) + 1, np.int64)
    for i, n in names.items():
        lut[int(i)] = of.get(n, 0)
    return lut


class _TargetCache:
    """A few cases' (CT, class labels) arrays per process (each 128³ case is ~6 MB)."""

    def __init__(self, size: int = 8):
        self.size, self.items = size, OrderedDict()

    def get(self, folder: Path, lut: np.ndarray):
        key = str(folder)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        from ..io.volume import read_ct, read_labelmap

        ct_path, lab_path = folder / "spider" / "ct.nii.gz", folder / "spider" / "labels.nii.gz"
        if not ct_path.is_file():
            raise X2ReconInputError(ct_path, "missing: the case has no SPIDER targets (rebuild the dataset)")
        ct = read_ct(ct_path, spacing_range=None).array.astype(np.int16)  # the box grid: any spacing
        lab = read_labelmap(lab_path).array
        if lab.shape != ct.shape:
            raise X2ReconInputError(lab_path, f"labels {lab.shape} and CT {ct.shape} are on different grids")
        cls = lut[np.clip(lab, 0, len(lut) - 1)].astype(np.uint8)
        cls[(lab < 0) | (lab >= len(lut))] = 0
        self.items[key] = (ct, cls)
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return ct, cls


class SpiderDataset(torch.utils.data.Dataset):
    """Training items: ``images`` (2, 1, S, S), ``grid`` (2, 3, 4), ``points`` (T, 3) box coordinates,
    ``intensity`` (T,) in [0, 1] units of ``hu_range``, ``labels`` (T,) class indices.  Keys are an index
    or ``(index, epoch)`` (see ``torch_data.EpochSampler``)."""

    def __init__(self, root: str | Path, split: str, *, views: list[str], classes: list[str], image_size: int,
                 n_points: int = 8192, hu_range=(-1024.0, 3071.0), augment: bool = True,
                 foreground_fraction: float = 0.0, seed: int = 0):
        self.root = Path(root)
        self.views = [v.upper() for v in views]
        self.classes, self.members = list(classes), class_members(classes)
        self.image_size, self.n_points, self.augment, self.seed = image_size, n_points, augment, seed
        self.hu_range = tuple(map(float, hu_range))
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.foreground_fraction = foreground_fraction
        self.cases = [case_info(self.root, c) for c in read_split(self.root, split)]
        self.luts = []
        for c in self.cases:
            missing = [v for v in self.views if v not in c.views]
            if missing:
                raise X2ReconInputError(c.folder, f"SPIDER needs views {self.views}; the case has {c.views}")
            meta = json.loads((c.folder / "meta.json").read_text())
            names = {int(k): v for k, v in meta["segmentation"]["names"].items()}
            self.luts.append(class_lut(names, self.classes, self.members))
        self.cache = _TargetCache()
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.cases)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The case's CT (HU, int16) and class-index labels on its target grid ([k, j, i])."""
        return self.cache.get(self.cases[index].folder, self.luts[index])

    def pair(self, index: int, gen: torch.Generator | None = None):
        """(images (2, 1, S, S), grid (2, 3, 4)) for the case's [frontal, lateral] views."""
        imgs, grids = [], []
        for v in self.views:
            x = load_view(self.cases[index].folder, v, self.image_size)
            if gen is not None:
                x = augment_xray(x, gen)
            img, grid = x.network_input(self.image_size)
            imgs.append(img)
            grids.append(grid)
        return torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(grids))

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + index)
        images, grid = self.pair(index, gen if self.augment else None)
        ct, cls = self.targets(index)
        n = ct.shape[0]
        n_fg = int(round(self.foreground_fraction * self.n_points))
        flat = torch.randint(ct.size, (self.n_points - n_fg,), generator=gen).numpy()
        if n_fg:
            fg = np.flatnonzero(cls.ravel())
            if len(fg):
                flat = np.concatenate([flat, fg[torch.randint(len(fg), (n_fg,), generator=gen).numpy()]])
            else:
                flat = np.concatenate([flat, torch.randint(ct.size, (n_fg,), generator=gen).numpy()])
        k, j, i = np.unravel_index(flat, ct.shape)
        c = box_centres(n).astype(np.float32)
        pts = np.stack([c[i], c[j], c[k]], 1)
        lo, hi = self.hu_range
        inten = np.clip((ct.ravel()[flat].astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
        return {"images": images, "grid": grid, "points": torch.from_numpy(pts),
                "intensity": torch.from_numpy(inten), "labels": torch.from_numpy(cls.ravel()[flat].astype(np.int64))}
