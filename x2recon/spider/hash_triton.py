"""Triton kernels of the multiresolution hash encoding (the fast GPU path of ``HashEncoding``).

Same semantics as the torch path in ``hash_encoding`` (tcnn's): per level, ``p = fma(x, scale, ½)``
in float32, cell ``floor(p)``, trilinear weights from ``p − floor(p)``, dense index
``v₀ + v₁·res + v₂·res²`` or the spatial hash ``v₀ ⊕ v₁·2654435761 ⊕ v₂·805459861`` (uint32 wrap),
then mod the table size.  One program handles ``BLOCK`` points of one level: the forward pass
gathers the 8 corners' features and writes the level's slice of the output; the backward pass
scatters ``w · ∂L/∂out`` into the level's table with atomic adds (as tcnn does).  Input gradients are
not computed here (the torch path does them; SPIDER's points need none).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256
_MASK32 = 0xFFFFFFFF


@triton.jit
def _corner_index(vx, vy, vz, res, size, HASHED: tl.constexpr, POW2: tl.constexpr):
    if HASHED:
        h = (vx ^ ((vy * 2654435761) & 0xFFFFFFFF)) ^ ((vz * 805459861) & 0xFFFFFFFF)
    else:
        h = (vx + vy * res + vz * res * res) & 0xFFFFFFFF
    if POW2:
        return h & (size - 1)
    return h % size


@triton.jit
def _cell(x_ptr, n64, m, scale):
    """Each point's cell (int64 vertex coordinates) and trilinear fractions: p = fma(x, scale, ½)."""
    px = tl.fma(tl.load(x_ptr + n64 * 3 + 0, mask=m, other=0.0), scale, 0.5)
    py = tl.fma(tl.load(x_ptr + n64 * 3 + 1, mask=m, other=0.0), scale, 0.5)
    pz = tl.fma(tl.load(x_ptr + n64 * 3 + 2, mask=m, other=0.0), scale, 0.5)
    fx, fy, fz = tl.floor(px), tl.floor(py), tl.floor(pz)
    return fx.to(tl.int64), fy.to(tl.int64), fz.to(tl.int64), px - fx, py - fy, pz - fz


@triton.jit
def _corner(c: tl.constexpr, gx, gy, gz, tx, ty, tz, res, size, HASHED: tl.constexpr, POW2: tl.constexpr):
    """Weight and table index of corner ``c`` (bit d set: the upper vertex along dimension d)."""
    bx = c & 1
    by = (c >> 1) & 1
    bz = (c >> 2) & 1
    wx = tx if bx else 1.0 - tx
    wy = ty if by else 1.0 - ty
    wz = tz if bz else 1.0 - tz
    idx = _corner_index((gx + bx) & 0xFFFFFFFF, (gy + by) & 0xFFFFFFFF, (gz + bz) & 0xFFFFFFFF, res, size, HASHED, POW2)
    return wx * wy * wz, idx


@triton.jit
def _hash_fwd_kernel(x_ptr, table_ptr, out_ptr, N, scale, res, size, offset, out_col, out_stride,
                     F: tl.constexpr, HASHED: tl.constexpr, POW2: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = n < N
    n64 = n.to(tl.int64)
    gx, gy, gz, tx, ty, tz = _cell(x_ptr, n64, m, scale)
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(8):
        w, idx = _corner(c, gx, gy, gz, tx, ty, tz, res, size, HASHED, POW2)
        base = (offset + idx) * F
        acc0 += w * tl.load(table_ptr + base, mask=m, other=0.0).to(tl.float32)
        if F > 1:
            acc1 += w * tl.load(table_ptr + base + 1, mask=m, other=0.0).to(tl.float32)
        if F > 2:
            acc2 += w * tl.load(table_ptr + base + 2, mask=m, other=0.0).to(tl.float32)
        if F > 3:
            acc3 += w * tl.load(table_ptr + base + 3, mask=m, other=0.0).to(tl.float32)
    o = out_ptr + n64 * out_stride + out_col
    tl.store(o, acc0, mask=m)
    if F > 1:
        tl.store(o + 1, acc1, mask=m)
    if F > 2:
        tl.store(o + 2, acc2, mask=m)
    if F > 3:
        tl.store(o + 3, acc3, mask=m)


@triton.jit
def _hash_bwd_kernel(x_ptr, gout_ptr, gtable_ptr, N, scale, res, size, offset, out_col, out_stride,
                     F: tl.constexpr, HASHED: tl.constexpr, POW2: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = n < N
    n64 = n.to(tl.int64)
    gx, gy, gz, tx, ty, tz = _cell(x_ptr, n64, m, scale)
    g = gout_ptr + n64 * out_stride + out_col
    g0 = tl.load(g, mask=m, other=0.0).to(tl.float32)
    g1 = tl.load(g + 1, mask=m & (F > 1), other=0.0).to(tl.float32)
    g2 = tl.load(g + 2, mask=m & (F > 2), other=0.0).to(tl.float32)
    g3 = tl.load(g + 3, mask=m & (F > 3), other=0.0).to(tl.float32)
    for c in tl.static_range(8):
        w, idx = _corner(c, gx, gy, gz, tx, ty, tz, res, size, HASHED, POW2)
        base = (offset + idx) * F
        tl.atomic_add(gtable_ptr + base, w * g0, mask=m, sem="relaxed")
        if F > 1:
            tl.atomic_add(gtable_ptr + base + 1, w * g1, mask=m, sem="relaxed")
        if F > 2:
            tl.atomic_add(gtable_ptr + base + 2, w * g2, mask=m, sem="relaxed")
        if F > 3:
            tl.atomic_add(gtable_ptr + base + 3, w * g3, mask=m, sem="relaxed")


def supported(x: torch.Tensor, params: torch.Tensor, n_dims: int, n_features: int) -> bool:
    """The kernels cover 3D float32 inputs, float32 tables and 1–4 features per level."""
    return n_dims == 3 and 1 <= n_features <= 4 and x.dtype == torch.float32 and params.dtype == torch.float32


def _launch(kernel, x, levels, n_features, *tensors):
    N = x.shape[0]
    grid = (triton.cdiv(N, BLOCK),)
    stride = len(levels) * n_features
    for li, lvl in enumerate(levels):
        kernel[grid](x, *tensors, N, lvl.scale, lvl.resolution, lvl.size, lvl.offset, li * n_features, stride,
                     F=n_features, HASHED=lvl.hashed, POW2=(lvl.size & (lvl.size - 1)) == 0, BLOCK=BLOCK)


def forward(x: torch.Tensor, params: torch.Tensor, levels, n_features: int) -> torch.Tensor:
    """(N, 3) float32 in [0, 1] → (N, L·F) float32."""
    out = torch.empty(x.shape[0], len(levels) * n_features, dtype=torch.float32, device=x.device)
    if x.shape[0]:
        _launch(_hash_fwd_kernel, x.contiguous(), levels, n_features, params, out)
    return out


def backward_params(x: torch.Tensor, grad_out: torch.Tensor, params: torch.Tensor, levels, n_features: int) -> torch.Tensor:
    """∂L/∂params from ∂L/∂out (N, L·F)."""
    gp = torch.zeros_like(params, dtype=torch.float32)
    if x.shape[0]:
        _launch(_hash_bwd_kernel, x.contiguous(), levels, n_features, grad_out.float().contiguous(), gp)
    return gp.to(params.dtype)
