"""2D UNet (Ronneberger et al. 2015) that turns one X-ray into a full-resolution feature map; SPIDER's
encoder (§3.1), shared by its two views.

GroupNorm instead of the original's none/BatchNorm: training batches hold few images (two views of a
handful of cases), where batch statistics are noisy, and features must not depend on what else is in
the batch (so chunked and one-shot inference agree).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class DoubleConv(nn.Sequential):
    """(3×3 conv → GroupNorm → ReLU) × 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm(cout), nn.ReLU(inplace=True))


class UNet2D(nn.Module):
    """``forward(x (N, in_ch, H, W)) → (N, out_ch, H, W)``; H and W divisible by 2^(len(channels)−1).

    ``channels``: feature widths from the finest level down (max-pool between levels); the decoder
    upsamples bilinearly, concatenates the skip connection and applies a DoubleConv, and a 1×1 conv
    gives ``out_ch`` feature channels."""

    def __init__(self, in_ch: int = 1, out_ch: int = 32, channels: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"a UNet needs at least two levels, got channels={channels}")
        self.factor = 2 ** (len(channels) - 1)
        self.down = nn.ModuleList([DoubleConv(in_ch, channels[0])] +
                                  [DoubleConv(a, b) for a, b in zip(channels[:-1], channels[1:])])
        self.up = nn.ModuleList([DoubleConv(b + a, a) for a, b in zip(channels[:-1], channels[1:])][::-1])
        self.head = nn.Conv2d(channels[0], out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if H % self.factor or W % self.factor:
            raise ValueError(f"UNet input {H}×{W} must be divisible by {self.factor}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], 1))
        return self.head(x)
