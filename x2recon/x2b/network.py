"""X2B (one X-ray) and X2B2 (two orthogonal X-rays) occupancy networks — X2BR paper §3.1, §6.4.

Reference configuration (the paper's): a timm ConvNeXt-B encoder whose pooled 1024-d descriptor
conditions the Occupancy-Networks decoder (5 CBN residual blocks, 256 wide).  X2B2 encodes both
views with the shared encoder and fuses their last-stage feature tokens by multi-head
cross-attention in both directions before pooling.

Beyond the paper (``local_features=True``): each query point is projected into every view with
the image's ``ProjectionGeometry`` (``box_to_grid_matrix``) and the encoder's intermediate feature
maps are sampled bilinearly there; these pixel-aligned features join the point embedding, while the
global latent still conditions the batch norms.  The reference configuration stays available so
the two can be compared (``training/``).

Points are in normalised reconstruction-box coordinates ([-½, ½]³, ``ProjectionGeometry.to_box``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from .decoder import OccupancyDecoder
from ..nn.encoders import Encoder
from ..nn.sampling import project_to_grid, sample_maps

KINDS = ("x2b", "x2b2")


@dataclass
class X2BConfig:
    """Architecture and input conventions; stored in every checkpoint's JSON."""

    kind: str = "x2b"  # "x2b" (one view) | "x2b2" (frontal + lateral)
    backbone: str = "convnext_base"
    image_size: int = 224
    latent_dim: int = 0  # 0: the encoder's descriptor size (1024 for ConvNeXt-B, as the paper)
    hidden: int = 256
    n_blocks: int = 5
    local_features: bool = False  # pixel-aligned features (beyond the paper)
    fourier: int = 0  # octaves of sin/cos point features (beyond the paper; 0 = ONet's raw coordinates)
    local_stages: list[int] = field(default_factory=lambda: [1, 2])
    attention_heads: int = 8  # X2B2 cross-attention
    image_mean: float = 0.5  # network input = (display / 65535 − mean) / std
    image_std: float = 0.25
    views: list[str] = field(default_factory=lambda: ["AP", "PA", "LAT"])  # X2B: views trained on; X2B2: [frontal, lateral]
    threshold: float = 0.2  # occupancy probability of the surface (paper: τ = 0.2)
    drop_path_rate: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")
        self.local_stages = [int(s) for s in self.local_stages]
        self.views = [str(v).upper() for v in self.views]
        if self.kind == "x2b2" and len(self.views) != 2:
            raise ValueError(f"X2B2 needs exactly two views [frontal, lateral], got {self.views}")

    @property
    def n_views(self) -> int:
        return 2 if self.kind == "x2b2" else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "X2BConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown X2B settings {unknown} (made by a newer x2recon?)")
        return cls(**d)


@dataclass
class Code:
    """What the encoder says about the X-ray(s): enough to decode any number of points."""

    latent: torch.Tensor  # (B, c_dim)
    maps: list[torch.Tensor]  # per view × stage: (B, C_i, H_i, W_i), view-major
    grid: torch.Tensor  # (B, V, 3, 4) box → grid_sample coordinates


class CrossViewFusion(nn.Module):
    """Both views' last-stage tokens attend to the other view's (multi-head cross-attention,
    residual + LayerNorm), then mean-pooled and concatenated → (B, 2C)."""

    def __init__(self, dim: int, n_tokens: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"feature width {dim} is not divisible by {heads} attention heads")
        self.pos = nn.Parameter(torch.zeros(2, n_tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.attn_ab = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.attn_ba = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_a = nn.LayerNorm(dim)
        self.norm_b = nn.LayerNorm(dim)

    def forward(self, fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
        a = fa.flatten(2).transpose(1, 2) + self.pos[0]
        b = fb.flatten(2).transpose(1, 2) + self.pos[1]
        a2 = self.norm_a(a + self.attn_ab(a, b, b, need_weights=False)[0])
        b2 = self.norm_b(b + self.attn_ba(b, a, a, need_weights=False)[0])
        return torch.cat([a2.mean(1), b2.mean(1)], dim=1)


class X2B(nn.Module):
    """X2B / X2B2.  ``forward(images (B, V, 1, S, S), grid (B, V, 3, 4), points (B, T, 3)) → logits (B, T)``;
    ``images`` are display intensities in [0, 1]; ``encode`` once and ``decode`` many point sets."""

    def __init__(self, cfg: X2BConfig, *, pretrained_path=None):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.backbone, local_stages=tuple(cfg.local_stages) if cfg.local_features else (),
                               pretrained_path=pretrained_path, drop_path_rate=cfg.drop_path_rate)
        nf = self.encoder.num_features
        c_dim = cfg.latent_dim or nf
        if cfg.kind == "x2b2":
            side = cfg.image_size // 32
            self.fusion = CrossViewFusion(nf, side * side, cfg.attention_heads)
            self.to_latent = nn.Linear(2 * nf, c_dim)
        else:
            self.fusion = None
            self.to_latent = nn.Linear(nf, c_dim) if c_dim != nf else nn.Identity()
        local_in = cfg.n_views * sum(self.encoder.stage_channels[i] for i in cfg.local_stages) if cfg.local_features else 0
        self.decoder = OccupancyDecoder(c_dim, cfg.hidden, cfg.n_blocks, local_dim=local_in, fourier=cfg.fourier)
        self.c_dim = c_dim
        self.channels_last = False

    def use_channels_last(self) -> "X2B":
        """Encoder weights and inputs in channels-last memory format (faster convolutions on GPU)."""
        self.encoder.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.cfg.image_mean) / self.cfg.image_std

    def encode(self, images: torch.Tensor, grid: torch.Tensor) -> Code:
        B, V = images.shape[:2]
        if V != self.cfg.n_views:
            raise ValueError(f"{self.cfg.kind.upper()} takes {self.cfg.n_views} view(s), got {V}")
        S = self.cfg.image_size
        if images.shape[-2:] != (S, S):
            raise ValueError(f"images must be {S}×{S}, got {tuple(images.shape[-2:])}")
        x = self.normalise(images.reshape(B * V, *images.shape[2:]))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        g, maps, last = self.encoder(x)
        if self.fusion is not None:
            last = last.reshape(B, V, *last.shape[1:])
            latent = self.to_latent(self.fusion(last[:, 0], last[:, 1]))
        else:
            latent = self.to_latent(g)
        per_view = []
        for v in range(V):
            per_view += [m.reshape(B, V, *m.shape[1:])[:, v] for m in maps]
        return Code(latent, per_view, grid)

    def sample_local(self, points: torch.Tensor, code: Code) -> torch.Tensor | None:
        """Pixel-aligned features (B, T, V·ΣC_i) at each point's projection into each view."""
        if not code.maps:
            return None
        V = code.grid.shape[1]
        n_stage = len(code.maps) // V  # maps are view-major: view 0's stages, then view 1's
        return sample_maps(code.maps, project_to_grid(points, code.grid), [i // n_stage for i in range(len(code.maps))])

    def decode(self, points: torch.Tensor, code: Code) -> torch.Tensor:
        return self.decoder(points, code.latent, self.sample_local(points, code))

    def forward(self, images: torch.Tensor, grid: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self.decode(points, self.encode(images, grid))


def build_model(cfg: X2BConfig | dict, *, pretrained_path=None) -> X2B:
    """The network for ``cfg`` (random weights, or the backbone from a local pretrained file)."""
    if isinstance(cfg, dict):
        cfg = X2BConfig.from_dict(cfg)
    return X2B(cfg, pretrained_path=pretrained_path)
