"""Triton kernel of the exact incremental Siddon traversal (CUDA; CPU tests via TRITON_INTERPRET=1).

Same algorithm as ``siddon.trace_torch``: each lane owns one detector ray, steps to the nearest of
the three next plane crossings, adds value × segment length and advances the crossed axes.  A
program handles a 2D tile of pixels (``TILE_H × TILE_W``), so the lanes of a warp read
neighbouring voxels (coalesced) and run for similar numbers of steps.

The rays are generated inside the kernel: pixel ``(c, r)``'s origin and target are affine in
``(c, r)``.  ``pixel_ray_model`` reads that affine model off ``ProjectionGeometry.rays()`` itself (on
a 2 × 2 detector with the same pixel lattice) — no second projection formula — so no per-ray
arrays are built on the host or copied to the GPU.  The per-ray set-up (direction, entry/exit by
the slab method, first voxel, first crossings) is done in float64; the traversal in float32
relative to the entry point, exactly as the torch path.  A tile loops for the largest number of
plane crossings among its rays (computed up front, so no per-step block reduction is needed); rays
that finish earlier are masked.  Reads outside the grid are masked to 0.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import triton
import triton.language as tl

#: Tile of detector pixels per program (rows × columns) and warps per program.
TILE_H, TILE_W, NUM_WARPS = 8, 16, 4
_BIG = tl.constexpr(1e30)


@triton.jit(do_not_specialize=["W", "H", "NI", "NJ", "NK"])  # sizes of 1 stay runtime ints
def _siddon_kernel(
    vol_ptr, prm_ptr, out_ptr,
    W, H, NI, NJ, NK,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr, INDEX64: tl.constexpr,
):
    lane = tl.arange(0, TILE_H * TILE_W)
    col = tl.program_id(0) * TILE_W + lane % TILE_W
    row = tl.program_id(1) * TILE_H + lane // TILE_W
    pix = (col < W) & (row < H)
    c = col.to(tl.float64)
    r = row.to(tl.float64)

    # ---- ray of each pixel (float64): origin o (cells), delta q (cells), world delta w (mm)
    ox = tl.load(prm_ptr + 0) + c * tl.load(prm_ptr + 1) + r * tl.load(prm_ptr + 2)
    oy = tl.load(prm_ptr + 3) + c * tl.load(prm_ptr + 4) + r * tl.load(prm_ptr + 5)
    oz = tl.load(prm_ptr + 6) + c * tl.load(prm_ptr + 7) + r * tl.load(prm_ptr + 8)
    qx = tl.load(prm_ptr + 9) + c * tl.load(prm_ptr + 10) + r * tl.load(prm_ptr + 11)
    qy = tl.load(prm_ptr + 12) + c * tl.load(prm_ptr + 13) + r * tl.load(prm_ptr + 14)
    qz = tl.load(prm_ptr + 15) + c * tl.load(prm_ptr + 16) + r * tl.load(prm_ptr + 17)
    wx = tl.load(prm_ptr + 18) + c * tl.load(prm_ptr + 19) + r * tl.load(prm_ptr + 20)
    wy = tl.load(prm_ptr + 21) + c * tl.load(prm_ptr + 22) + r * tl.load(prm_ptr + 23)
    wz = tl.load(prm_ptr + 24) + c * tl.load(prm_ptr + 25) + r * tl.load(prm_ptr + 26)
    length = tl.sqrt(wx * wx + wy * wy + wz * wz)  # source → detector, mm
    dx = qx / length  # cells per mm
    dy = qy / length
    dz = qz / length
    fi = NI.to(tl.float64)
    fj = NJ.to(tl.float64)
    fk = NK.to(tl.float64)

    # ---- entry/exit of the grid [0, n] (slab method), clipped to [0, length]
    nzx = dx != 0
    nzy = dy != 0
    nzz = dz != 0
    ivx = 1.0 / tl.where(nzx, dx, 1.0)
    ivy = 1.0 / tl.where(nzy, dy, 1.0)
    ivz = 1.0 / tl.where(nzz, dz, 1.0)
    ax = (0.0 - ox) * ivx
    bx = (fi - ox) * ivx
    ay = (0.0 - oy) * ivy
    by = (fj - oy) * ivy
    az = (0.0 - oz) * ivz
    bz = (fk - oz) * ivz
    inx = (ox > 0.0) & (ox < fi)
    iny = (oy > 0.0) & (oy < fj)
    inz = (oz > 0.0) & (oz < fk)
    lox = tl.where(nzx, tl.minimum(ax, bx), tl.where(inx, -_BIG, _BIG))
    hix = tl.where(nzx, tl.maximum(ax, bx), tl.where(inx, _BIG, -_BIG))
    loy = tl.where(nzy, tl.minimum(ay, by), tl.where(iny, -_BIG, _BIG))
    hiy = tl.where(nzy, tl.maximum(ay, by), tl.where(iny, _BIG, -_BIG))
    loz = tl.where(nzz, tl.minimum(az, bz), tl.where(inz, -_BIG, _BIG))
    hiz = tl.where(nzz, tl.maximum(az, bz), tl.where(inz, _BIG, -_BIG))
    t_in = tl.maximum(tl.maximum(tl.maximum(lox, loy), loz), 0.0)
    t_out = tl.minimum(tl.minimum(tl.minimum(hix, hiy), hiz), length)
    hit = pix & (t_in < t_out)

    # ---- first voxel and first crossings, relative to the entry point (float64 → float32)
    ex = ox + t_in * dx
    ey = oy + t_in * dy
    ez = oz + t_in * dz
    ix = tl.minimum(tl.maximum(tl.floor(ex), 0.0), fi - 1.0)
    iy = tl.minimum(tl.maximum(tl.floor(ey), 0.0), fj - 1.0)
    iz = tl.minimum(tl.maximum(tl.floor(ez), 0.0), fk - 1.0)
    upx = tl.where(dx > 0, 1.0, 0.0)
    upy = tl.where(dy > 0, 1.0, 0.0)
    upz = tl.where(dz > 0, 1.0, 0.0)
    nx = tl.where(nzx & hit, (ix + upx - ex) * ivx, _BIG).to(tl.float32)
    ny = tl.where(nzy & hit, (iy + upy - ey) * ivy, _BIG).to(tl.float32)
    nz = tl.where(nzz & hit, (iz + upz - ez) * ivz, _BIG).to(tl.float32)
    gx = tl.where(nzx, tl.abs(ivx), _BIG).to(tl.float32)
    gy = tl.where(nzy, tl.abs(ivy), _BIG).to(tl.float32)
    gz = tl.where(nzz, tl.abs(ivz), _BIG).to(tl.float32)
    te64 = tl.where(hit, t_out - t_in, 0.0)
    te = te64.to(tl.float32)
    # plane crossings inside the grid bound the number of steps (+2 for rounding at entry/exit)
    steps = (
        tl.abs(tl.floor(ex + te64 * dx) - tl.floor(ex))
        + tl.abs(tl.floor(ey + te64 * dy) - tl.floor(ey))
        + tl.abs(tl.floor(ez + te64 * dz) - tl.floor(ez))
    )
    steps = tl.where(hit, steps + 3.0, 0.0).to(tl.int32)
    n_steps = tl.max(steps, axis=0)
    sx = tl.where(dx > 0, 1, tl.where(dx < 0, -1, 0))
    sy = tl.where(dy > 0, 1, tl.where(dy < 0, -1, 0))
    sz = tl.where(dz > 0, 1, tl.where(dz < 0, -1, 0))
    vi = ix.to(tl.int32)
    vj = iy.to(tl.int32)
    vk = iz.to(tl.int32)

    # ---- traversal (float32)
    t = tl.zeros([TILE_H * TILE_W], dtype=tl.float32)
    acc = tl.zeros([TILE_H * TILE_W], dtype=tl.float32)
    for _ in range(0, n_steps):
        tn = tl.minimum(tl.minimum(tl.minimum(nx, ny), nz), te)
        live = (t < te) & (vi >= 0) & (vi < NI) & (vj >= 0) & (vj < NJ) & (vk >= 0) & (vk < NK)
        if INDEX64:
            lin = (vk.to(tl.int64) * NJ + vj) * NI + vi
        else:
            lin = (vk * NJ + vj) * NI + vi
        v = tl.load(vol_ptr + lin, mask=live, other=0.0)
        acc += tl.where(live, v * (tn - t), 0.0)
        t = tl.maximum(t, tn)
        cx = nx <= tn
        cy = ny <= tn
        cz = nz <= tn
        vi += tl.where(cx, sx, 0)
        vj += tl.where(cy, sy, 0)
        vk += tl.where(cz, sz, 0)
        nx = tl.where(cx, nx + gx, nx)
        ny = tl.where(cy, ny + gy, ny)
        nz = tl.where(cz, nz + gz, nz)
    tl.store(out_ptr + row * W + col, acc, mask=pix)


def pixel_ray_model(geometry) -> tuple[np.ndarray, np.ndarray]:
    """Origins and targets of ``geometry``'s rays as affine maps of pixel ``(col, row)``.

    Returns ``O, T`` (3 × 3 each, columns: value at (0, 0), d/dcol, d/drow) in LPS mm, read off
    ``geometry.rays()`` for a 2 × 2 detector on the same pixel lattice (its centre moved to pixel
    (½, ½)).  The fourth pixel checks that the rays really are affine in the pixel coordinates.
    """
    sub = replace(geometry, size=(2, 2), detector_center=geometry.pixel_to_world(0.5, 0.5))
    o, d, L = sub.rays()
    tgt = o + d * L[..., None]

    def model(x):
        m = np.stack([x[0, 0], x[0, 1] - x[0, 0], x[1, 0] - x[0, 0]], axis=1)
        scale = 1.0 + np.abs(x).max()
        if np.abs(m[:, 0] + m[:, 1] + m[:, 2] - x[1, 1]).max() > 1e-9 * scale:
            raise ValueError("geometry's rays are not affine in pixel coordinates; the Triton kernel needs them to be")
        return m

    return model(o), model(tgt)


def kernel_params(affine: np.ndarray, geometry, device) -> torch.Tensor:
    """The 27 float64 numbers the kernel needs: origin and target − origin in cells, and in mm."""
    O, T = pixel_ray_model(geometry)
    ainv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    lin = ainv[:3, :3]
    o_cell = lin @ O
    o_cell[:, 0] += ainv[:3, 3] + 0.5  # translation only on the constant term
    q_cell = lin @ (T - O)
    prm = np.concatenate([o_cell.reshape(-1), q_cell.reshape(-1), (T - O).reshape(-1)])
    return torch.as_tensor(prm, dtype=torch.float64, device=device)


def line_integrals_triton(vol: torch.Tensor, affine: np.ndarray, geometry) -> torch.Tensor:
    """Exact line integrals of ``vol`` [k, j, i] (contiguous float32) for every pixel: (H, W) float32."""
    if vol.dtype != torch.float32 or not vol.is_contiguous():
        vol = vol.float().contiguous()
    K, J, I = vol.shape
    w, h = geometry.size
    out = torch.empty((h, w), dtype=torch.float32, device=vol.device)
    prm = kernel_params(affine, geometry, vol.device)
    grid = (triton.cdiv(w, TILE_W), triton.cdiv(h, TILE_H))
    _siddon_kernel[grid](
        vol, prm, out, w, h, I, J, K,
        TILE_H=TILE_H, TILE_W=TILE_W, INDEX64=vol.numel() >= 2**31, num_warps=NUM_WARPS,
    )
    return out
