"""Occupancy Networks' decoder with conditional batch normalisation (Mescheder et al. 2019, §3 and
the supplementary; X2BR Fig. 1): points are embedded by a fully connected layer, pass through
residual blocks whose batch norms take their scale γ and shift β from the image latent, and end in
one occupancy logit per point.  Optional per-point local features are added to the embedding.
"""

from __future__ import annotations

import torch
from torch import nn


def fourier_embed(p: torch.Tensor, octaves: int) -> torch.Tensor:
    """``[p, sin(2^k π p), cos(2^k π p)]`` for k < ``octaves`` (p in box units, |p| ≤ ½)."""
    if not octaves:
        return p
    freqs = (2.0 ** torch.arange(octaves, device=p.device, dtype=p.dtype)) * torch.pi
    x = p[..., None, :] * freqs[:, None]  # (..., octaves, 3)
    return torch.cat([p, torch.sin(x).flatten(-2), torch.cos(x).flatten(-2)], dim=-1)


class CBatchNorm1d(nn.Module):
    """Batch norm over (B, F, T) without its own affine; γ, β = linear maps of the latent c.
    γ starts at 1 and β at 0, so an untrained block is plain batch norm."""

    def __init__(self, c_dim: int, f_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(f_dim, affine=False)
        self.gamma = nn.Conv1d(c_dim, f_dim, 1)
        self.beta = nn.Conv1d(c_dim, f_dim, 1)
        nn.init.zeros_(self.gamma.weight)
        nn.init.ones_(self.gamma.bias)
        nn.init.zeros_(self.beta.weight)
        nn.init.zeros_(self.beta.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = c.unsqueeze(-1)
        return self.gamma(c) * self.bn(x) + self.beta(c)


class CResnetBlock(nn.Module):
    """CBN → ReLU → FC → CBN → ReLU → FC, plus the input (ONet's CResnetBlockConv1d)."""

    def __init__(self, c_dim: int, size: int):
        super().__init__()
        self.bn0 = CBatchNorm1d(c_dim, size)
        self.bn1 = CBatchNorm1d(c_dim, size)
        self.fc0 = nn.Conv1d(size, size, 1)
        self.fc1 = nn.Conv1d(size, size, 1)
        self.act = nn.ReLU()
        nn.init.zeros_(self.fc1.weight)

    def forward(self, x, c):
        h = self.fc0(self.act(self.bn0(x, c)))
        return x + self.fc1(self.act(self.bn1(h, c)))


class OccupancyDecoder(nn.Module):
    """``forward(p (B, T, 3), c (B, c_dim), local (B, T, L) | None) → logits (B, T)``."""

    def __init__(self, c_dim: int, hidden: int = 256, n_blocks: int = 5, local_dim: int = 0, fourier: int = 0):
        super().__init__()
        self.fourier = int(fourier)
        self.fc_p = nn.Conv1d(3 * (1 + 2 * self.fourier), hidden, 1)
        self.fc_local = nn.Conv1d(local_dim, hidden, 1) if local_dim else None
        self.blocks = nn.ModuleList([CResnetBlock(c_dim, hidden) for _ in range(n_blocks)])
        self.bn = CBatchNorm1d(c_dim, hidden)
        self.fc_out = nn.Conv1d(hidden, 1, 1)
        self.act = nn.ReLU()

    def embed(self, p: torch.Tensor) -> torch.Tensor:
        """Points (..., 3), with ``fourier`` octaves of sin/cos features when configured (beyond
        ONet's raw coordinates: lets the MLP draw thin structures such as ribs)."""
        return fourier_embed(p, self.fourier)

    def forward(self, p: torch.Tensor, c: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        net = self.fc_p(self.embed(p).transpose(1, 2))
        if self.fc_local is not None:
            if local is None:
                raise ValueError("this decoder was built for local features; none given")
            net = net + self.fc_local(local.transpose(1, 2))
        for block in self.blocks:
            net = block(net, c)
        return self.fc_out(self.act(self.bn(net, c))).squeeze(1)


class FoldedDecoder:
    """The decoder in eval mode for one fixed latent, with every conditional batch norm folded into
    an affine map (and ``bn1`` into the linear layer before it): two matrix products per block and
    no per-point normalisation, on points laid out (T, features).  Same values as
    ``OccupancyDecoder.forward`` in eval mode, several times faster for MISE's millions of points."""

    def __init__(self, dec: OccupancyDecoder, c: torch.Tensor):
        if dec.training:
            raise RuntimeError("fold the decoder in eval mode (running batch-norm statistics)")
        if c.shape[0] != 1:
            raise ValueError("FoldedDecoder folds one latent (batch size 1)")
        with torch.no_grad():
            def affine(bn: CBatchNorm1d):
                g = bn.gamma(c[..., None])[0, :, 0].float()
                b = bn.beta(c[..., None])[0, :, 0].float()
                inv = torch.rsqrt(bn.bn.running_var.float() + bn.bn.eps)
                a = g * inv
                return a, b - a * bn.bn.running_mean.float()

            w = lambda conv: conv.weight[:, :, 0].float()
            self.fourier = dec.fourier
            self.wp, self.bp = w(dec.fc_p).T.contiguous(), dec.fc_p.bias.float()
            self.wl = w(dec.fc_local).T.contiguous() if dec.fc_local is not None else None
            self.bl = dec.fc_local.bias.float() if dec.fc_local is not None else None
            self.blocks = []
            for blk in dec.blocks:
                a0, b0 = affine(blk.bn0)
                a1, b1 = affine(blk.bn1)
                w0 = (w(blk.fc0) * a1[:, None]).T.contiguous()  # bn1 ∘ fc0 as one linear map
                c0 = a1 * blk.fc0.bias.float() + b1
                self.blocks.append((a0, b0, w0, c0, w(blk.fc1).T.contiguous(), blk.fc1.bias.float()))
            self.a, self.b = affine(dec.bn)
            self.wo, self.bo = w(dec.fc_out).T.contiguous(), dec.fc_out.bias.float()

    def __call__(self, p: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        """``p (T, 3)``, ``local (T, L)`` → logits ``(T,)`` (differentiable w.r.t. ``p`` and ``local``
        when grad mode is on; in-place updates only under ``torch.no_grad``)."""
        inplace = not torch.is_grad_enabled()
        x = torch.addmm(self.bp, fourier_embed(p.float(), self.fourier), self.wp)
        if self.wl is not None:
            x = x.addmm_(local.float(), self.wl).add_(self.bl) if inplace else torch.addmm(x + self.bl, local.float(), self.wl)
        for a0, b0, w0, c0, w1, c1 in self.blocks:
            h = torch.addcmul(b0, x, a0)
            h = h.clamp_min_(0) if inplace else h.clamp_min(0)
            h = torch.addmm(c0, h, w0)
            h = h.clamp_min_(0) if inplace else h.clamp_min(0)
            x = x.addmm_(h, w1).add_(c1) if inplace else torch.addmm(x + c1, h, w1)
        h = torch.addcmul(self.b, x, self.a)
        h = h.clamp_min_(0) if inplace else h.clamp_min(0)
        return torch.addmm(self.bo, h, self.wo)[:, 0]
