"""SPIDER (spider-paper §3): two orthogonal X-rays → CT intensity and segmentation as one implicit field.

Each view goes through one shared 2D UNet (§3.1); a 3D query point (normalised box coordinates, see
``x2recon.geometry``) is projected into both views with their ``ProjectionGeometry`` and the feature
maps are sampled bilinearly there (§3.2, ``x2recon.nn.sampling``); its coordinates are encoded with
a multiresolution hash encoding (eq. 13–17); the concatenation goes through one MLP whose first output
is the intensity and the remaining K+1 the class logits, background included (§3.3, eq. 19–23).

Ablations (§5.3), chosen by ``decoder``:
  ``shared``       the paper's model: one MLP → 1 + (K+1) outputs;
  ``volume-only``  intensity only, no segmentation head or loss (§5.3.1, no structural information);
  ``two-branch``   two MLPs of the same shape, one for intensity, one for the logits (Strategy 1);
  ``two-stage``    an MLP for intensity, then a small MLP from the predicted intensity to the logits —
                   "a reconstruction decoding with an adaptive threshold" (Strategy 2).

Intensities are HU mapped linearly from ``[hu_min, hu_max]`` to [0, 1] (clipped); class 0 is background.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .hash_encoding import HashEncodingConfig, make_hash_encoding
from ..nn.sampling import project_to_grid, sample_maps
from .unet import UNet2D

DECODERS = ("shared", "volume-only", "two-branch", "two-stage")


@dataclass
class SpiderConfig:
    """Architecture and conventions, stored in every SPIDER checkpoint's JSON."""

    views: list[str] = field(default_factory=lambda: ["PA", "LAT"])  # [frontal, lateral]
    image_size: int = 128
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    feature_channels: int = 32  # per view, sampled at each point's projection
    hash: dict = field(default_factory=lambda: HashEncodingConfig(
        n_levels=16, n_features_per_level=2, log2_hashmap_size=19, base_resolution=16,
        per_level_scale=None, finest_resolution=512).to_dict())
    hidden: int = 128
    layers: int = 4  # hidden layers of the MLP decoder
    decoder: str = "shared"
    classes: list[str] = field(default_factory=list)  # foreground class names (class i+1); background is 0
    members: dict = field(default_factory=dict)  # class name → TotalSegmentator names it joins
    hu_min: float = -1024.0
    hu_max: float = 3071.0
    image_mean: float = 0.5
    image_std: float = 0.25
    prefer_tcnn: bool = True  # tinycudann's hash encoding on CUDA when it imports (same parameters)

    def __post_init__(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        self.views = [str(v).upper() for v in self.views]
        if len(self.views) != 2:
            raise ValueError(f"SPIDER needs exactly two views [frontal, lateral], got {self.views}")
        self.unet_channels = [int(c) for c in self.unet_channels]
        factor = 2 ** (len(self.unet_channels) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by {factor} (UNet depth)")
        if not self.hu_max > self.hu_min:
            raise ValueError(f"hu_max must exceed hu_min, got [{self.hu_min}, {self.hu_max}]")
        if self.decoder != "volume-only" and not self.classes:
            raise ValueError("a SPIDER with a segmentation head needs at least one class "
                             "(or decoder='volume-only')")
        self.hash = HashEncodingConfig.from_dict(self.hash).to_dict()

    @property
    def n_classes(self) -> int:
        """Logits per point (background included); 0 for the volume-only ablation."""
        return 0 if self.decoder == "volume-only" else len(self.classes) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpiderConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown SPIDER settings {unknown} (made by a newer x2recon?)")
        return cls(**d)

    def hu_to_unit(self, hu):
        return ((hu - self.hu_min) / (self.hu_max - self.hu_min)).clip(0.0, 1.0)

    def unit_to_hu(self, t):
        return t * (self.hu_max - self.hu_min) + self.hu_min


def mlp(n_in: int, hidden: int, layers: int, n_out: int) -> nn.Sequential:
    mods, d = [], n_in
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.ReLU(inplace=True)]
        d = hidden
    mods.append(nn.Linear(d, n_out))
    return nn.Sequential(*mods)


@dataclass
class SpiderCode:
    """The encoded pair: one feature map per view and the views' box → grid matrices."""

    maps: list[torch.Tensor]
    grid: torch.Tensor


class Spider(nn.Module):
    """``forward(images (B, 2, 1, S, S), grid (B, 2, 3, 4), points (B, T, 3)) → (B, T, 1 + n_classes)``:
    channel 0 the intensity in [0, 1] units (unbounded), the rest the class logits."""

    def __init__(self, cfg: SpiderConfig, *, device=None):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet2D(1, cfg.feature_channels, tuple(cfg.unet_channels))
        self.encoding = make_hash_encoding(cfg.hash, prefer_tcnn=cfg.prefer_tcnn, device=device)
        n_in = 2 * cfg.feature_channels + self.encoding.n_output_dims
        K = cfg.n_classes
        if cfg.decoder == "shared":
            self.decoder = mlp(n_in, cfg.hidden, cfg.layers, 1 + K)
        else:
            self.decoder = mlp(n_in, cfg.hidden, cfg.layers, 1)
        if cfg.decoder == "two-branch":
            self.seg_decoder = mlp(n_in, cfg.hidden, cfg.layers, K)
        elif cfg.decoder == "two-stage":
            self.seg_decoder = mlp(1, 32, 2, K)
        else:
            self.seg_decoder = None

    def encode(self, images: torch.Tensor, grid: torch.Tensor) -> SpiderCode:
        B, V = images.shape[:2]
        S = self.cfg.image_size
        if V != 2:
            raise ValueError(f"SPIDER takes 2 views, got {V}")
        if images.shape[-2:] != (S, S):
            raise ValueError(f"images must be {S}×{S}, got {tuple(images.shape[-2:])}")
        x = (images.reshape(B * V, 1, S, S) - self.cfg.image_mean) / self.cfg.image_std
        f = self.unet(x).reshape(B, V, -1, S, S)
        return SpiderCode([f[:, 0], f[:, 1]], grid)

    def features(self, points: torch.Tensor, code: SpiderCode) -> torch.Tensor:
        """(B, T, 2C + L·F): both views' sampled features and the hash encoding of each point."""
        B, T = points.shape[:2]
        pix = sample_maps(code.maps, project_to_grid(points.float(), code.grid))
        unit = (points.reshape(-1, 3).float() + 0.5).clamp(0.0, 1.0)
        enc = self.encoding(unit).reshape(B, T, -1).to(pix.dtype)
        return torch.cat([pix, enc], dim=-1)

    def decode(self, points: torch.Tensor, code: SpiderCode) -> torch.Tensor:
        h = self.features(points, code)
        out = self.decoder(h)
        if self.seg_decoder is None:
            return out
        if self.cfg.decoder == "two-branch":
            return torch.cat([out, self.seg_decoder(h)], dim=-1)
        return torch.cat([out, self.seg_decoder(out)], dim=-1)  # two-stage

    def forward(self, images: torch.Tensor, grid: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self.decode(points, self.encode(images, grid))


def build_spider(cfg: SpiderConfig | dict, *, device=None) -> Spider:
    """The network for ``cfg`` with random weights; ``device`` decides the hash encoding's backend."""
    if isinstance(cfg, dict):
        cfg = SpiderConfig.from_dict(cfg)
    return Spider(cfg, device=device)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss (paper eq. 25) over a batch's points: ``logits`` (B, T, C), ``target`` (B, T)
    class indices; 1 − mean of (2Σ p·g + ε)/(Σ p + Σ g + ε) over each item's points, averaged over the
    classes present in that item's target (background included).  Classes absent from an item are left
    out of its mean: their ratio is ε/(Σp + ε), which with ε = 1 and thousands of points is ~0 until the
    network has driven their probability to zero everywhere, and it swamped the gradient of rare present
    classes (measured: a chest case with two absent classes learned no segmentation in 300 steps).
    The softmax still pushes absent classes down wherever present ones are learned."""
    p = torch.softmax(logits.float(), dim=-1)
    g = torch.nn.functional.one_hot(target.long(), logits.shape[-1]).to(p.dtype)
    inter = (p * g).sum(1)
    gsum = g.sum(1)
    ratio = (2 * inter + eps) / (p.sum(1) + gsum + eps)  # (B, C)
    present = (gsum > 0).to(p.dtype)
    per_item = (ratio * present).sum(1) / present.sum(1).clamp_min(1)
    return 1.0 - per_item.mean()


def spider_loss(out: torch.Tensor, intensity: torch.Tensor, labels: torch.Tensor | None, lam: float) -> dict:
    """Paper eq. 26: L1 intensity loss + λ·Dice; returns the total and its parts."""
    l1 = (out[..., 0].float() - intensity).abs().mean()
    if out.shape[-1] == 1 or labels is None or lam == 0:
        return {"loss": l1, "l1": l1.detach(), "dice": torch.zeros((), device=out.device)}
    d = dice_loss(out[..., 1:], labels)
    return {"loss": l1 + lam * d, "l1": l1.detach(), "dice": d.detach()}
