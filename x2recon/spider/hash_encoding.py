"""Multiresolution hash encoding (Instant-NGP, Müller et al. 2022) with tiny-cuda-nn's semantics, in
plain torch (CPU and CUDA); SPIDER (§3.2, eqs. 13–17) encodes its query points with it.

What tiny-cuda-nn's ``Grid`` encoding (``"type": "Hash"``, linear interpolation) computes, and so do we:

* level ``l`` has ``scale_l = 2^(l·log2 b)·N_min − 1`` (float32) and ``res_l = ceil(scale_l) + 1``
  vertices per axis (``N_min`` = ``base_resolution`` counts vertices, not cells);
* its table has ``T_l = min(next_multiple_of_8(res_l^D), 2^log2_hashmap_size)`` entries of
  ``n_features_per_level`` values; tables lie one after another in one flat parameter vector;
* an input ``x ∈ [0, 1]^D`` maps to ``p = x·scale_l + 0.5`` (one rounding, as ``fmaf``); the cell is
  ``floor(p)`` (as uint32), the trilinear weights come from ``p − floor(p)``;
* a vertex ``v`` indexes its table densely (``v_0 + v_1·res + v_2·res² …``) when ``res^D ≤ T_l``
  (and ``res`` is small enough not to overflow uint32), else by the spatial hash
  ``(v_0·1) ⊕ (v_1·2654435761) ⊕ (v_2·805459861)`` in uint32 arithmetic; either index is taken mod
  ``T_l`` (so the 0.5 offset's extra vertex wraps around in dense levels, as in tcnn);
* the output is the levels' interpolated features concatenated level-major (``L·F`` values);
* parameters start uniform in ±1e-4 (same distribution as tcnn, not the same random numbers).

Inputs outside [0, 1] are not clamped (tcnn does not either); the index arithmetic wraps as uint32.
Our backward recomputes indices and weights instead of storing them (as tcnn), so memory is O(N·D)
beyond the output, and points are processed in chunks.  First derivatives w.r.t. the parameters and
the inputs are supported (second derivatives are not).

``make_hash_encoding`` returns tinycudann's ``Encoding`` when it is installed and the device is CUDA,
otherwise this implementation, and says which in ``.backend`` and the log.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

#: tcnn's coherent prime hash factors (the first is 1 for cache coherence along x).
PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
#: Largest resolution per dimension count whose dense index cannot overflow uint32 (tcnn's table).
MAX_BASES = (0x0, 0xFFFFFFFF, 0xFFFF, 0x659, 0xFF, 0x54, 0x28, 0x17)
_U32 = 0xFFFFFFFF


@dataclass
class HashEncodingConfig:
    """tcnn's ``Grid``/``Hash`` settings.  ``per_level_scale`` b, or ``finest_resolution`` N_max from
    which b = exp((ln N_max − ln N_min)/(L − 1)) as in the Instant-NGP paper (tcnn's own default b is
    2.0; we default to 1.5, which with 16 levels reaches 16·1.5^15 ≈ 7000 vertices per axis)."""

    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float | None = 1.5
    finest_resolution: float | None = None
    n_input_dims: int = 3

    def __post_init__(self):
        if self.finest_resolution is not None:
            if self.n_levels < 2:
                raise ValueError("finest_resolution needs n_levels >= 2")
            self.per_level_scale = math.exp(
                (math.log(self.finest_resolution) - math.log(self.base_resolution)) / (self.n_levels - 1))
        if self.per_level_scale is None or not self.per_level_scale >= 1.0:
            raise ValueError(f"per_level_scale must be >= 1, got {self.per_level_scale}")
        if not 1 <= self.n_input_dims < len(MAX_BASES):
            raise ValueError(f"n_input_dims must be 1..{len(MAX_BASES) - 1}, got {self.n_input_dims}")
        if self.n_levels < 1 or self.n_features_per_level < 1 or self.base_resolution < 1:
            raise ValueError(f"invalid hash encoding config {self}")
        if not 0 < self.log2_hashmap_size <= 30:
            raise ValueError(f"log2_hashmap_size must be 1..30, got {self.log2_hashmap_size}")

    @classmethod
    def from_dict(cls, d: dict) -> "HashEncodingConfig":
        """From our field names or a tcnn encoding config (``otype``/``type`` keys are checked, others ignored)."""
        d = dict(d)
        otype, gtype = d.pop("otype", "HashGrid"), d.pop("type", "Hash")
        if otype not in ("HashGrid", "Grid") or gtype != "Hash" or d.pop("interpolation", "Linear") != "Linear":
            raise ValueError(f"only tcnn's hash grid with linear interpolation is implemented, got {otype}/{gtype}")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_tcnn(self) -> dict:
        """The ``encoding_config`` for ``tinycudann.Encoding``."""
        return {"otype": "Grid", "type": "Hash", "n_levels": self.n_levels,
                "n_features_per_level": self.n_features_per_level, "log2_hashmap_size": self.log2_hashmap_size,
                "base_resolution": self.base_resolution, "per_level_scale": float(self.per_level_scale),
                "interpolation": "Linear"}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Level:
    scale: float  # the float32 value tcnn uses
    resolution: int
    offset: int  # first table entry of this level in the flat table
    size: int  # T_l entries
    hashed: bool


def level_layout(cfg: HashEncodingConfig) -> list[Level]:
    """Per-level scale, resolution, table offset and size, and hash/dense choice, as tcnn computes them."""
    d = cfg.n_input_dims
    log2_b = np.log2(np.float32(cfg.per_level_scale))  # float32, as tcnn
    levels, offset = [], 0
    for lvl in range(cfg.n_levels):
        scale = np.float32(np.exp2(np.float32(lvl) * log2_b)) * np.float32(cfg.base_resolution) - np.float32(1.0)
        res = int(math.ceil(float(scale))) + 1
        dense = res ** d
        params = min(dense, 0xFFFFFFFF // 2)
        params = -(-params // 8) * 8
        size = min(params, 1 << cfg.log2_hashmap_size)
        hashed = res > MAX_BASES[d] or size < dense
        levels.append(Level(float(scale), res, offset, size, hashed))
        offset += size
    return levels


def _positions(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x·scale + 0.5`` rounded once to x's precision (fmaf for float32 inputs)."""
    if x.dtype == torch.float64:
        return x * scale + 0.5
    return (x.double() * scale + 0.5).float()  # float32 product + 0.5 is exact in float64


def _outer(parts: list[torch.Tensor], op) -> torch.Tensor:
    """Combine per-dimension (2, n) tensors into (2^D, n) over all corners; corner c takes row
    ``(c >> d) & 1`` of dimension d (dimension 0 varies fastest, as tcnn's corner loop).  Points stay
    the contiguous last axis so every broadcast runs over long rows."""
    r = parts[0]
    for p in parts[1:]:
        r = op(p[:, None, :], r[None, :, :]).reshape(-1, p.shape[-1])
    return r


def _corners(x: torch.Tensor, lvl: Level, want_frac: bool = False):
    """Table indices and trilinear weights, both (2^D, n), of the vertices around each point of
    ``x`` (n, D).  Indices are int32 for power-of-two hashed tables (the mask is applied per
    dimension, since (a ⊕ b) & m = (a & m) ⊕ (b & m)), int64 otherwise."""
    pos = _positions(x.t(), lvl.scale)  # (D, n)
    fl = torch.floor(pos)
    frac = pos - fl
    g = fl.long()
    d = len(g)
    v = torch.stack((g, g + 1), 1)  # (D, 2, n) vertex coordinates
    if lvl.hashed:
        primes = torch.tensor(PRIMES[:d], dtype=torch.int64, device=g.device).view(-1, 1, 1)
        if lvl.size & (lvl.size - 1) == 0:
            idx = _outer(list(((v * primes) & (lvl.size - 1)).int()), torch.bitwise_xor)
        else:
            idx = _outer(list((v * primes) & _U32), torch.bitwise_xor) % lvl.size
    else:
        strides = torch.tensor([lvl.resolution ** k for k in range(d)], dtype=torch.int64,
                               device=g.device).view(-1, 1, 1)
        idx = (_outer(list(v * strides), torch.add) & _U32) % lvl.size
    w = _outer(list(torch.stack((1 - frac, frac), 1)), torch.mul)
    return (idx, w, frac) if want_frac else (idx, w)


def _weight_derivatives(frac: torch.Tensor) -> list[torch.Tensor]:
    """∂w_c/∂frac_d for every dimension d, from ``frac`` (D, n): list of (2^D, n)."""
    parts = list(torch.stack((1 - frac, frac), 1))
    step = torch.tensor([[-1.0], [1.0]], dtype=frac.dtype, device=frac.device).expand(2, frac.shape[1])
    return [_outer(parts[:k] + [step] + parts[k + 1:], torch.mul) for k in range(len(parts))]


def _interpolate(idx: torch.Tensor, w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Σ_c w[c] · table[idx[c]] for (2^D, n) corners: (n, F), gathered and summed in one kernel."""
    return F.embedding_bag(idx.t().contiguous(), table, per_sample_weights=w.t().to(table.dtype).contiguous(),
                           mode="sum")


class _HashGridFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, params, enc):
        ctx.save_for_backward(x, params)
        ctx.enc = enc
        return enc._forward_impl(x, params)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, params = ctx.saved_tensors
        gx, gp = ctx.enc._backward_impl(x, params, grad_out.contiguous(), ctx.needs_input_grad[0],
                                        ctx.needs_input_grad[1])
        return gx, gp, None


class HashEncoding(nn.Module):
    """Pure-torch multiresolution hash encoding; ``forward(x)``: (..., D) in [0, 1] → (..., L·F).

    ``params`` is one flat vector laid out as tcnn's (level tables back to back, entry-major), so
    weights can be copied to and from ``tinycudann.Encoding``.  ``chunk_size`` points are processed
    at a time (default 2^18 on CPU, 2^21 on CUDA; a few hundred bytes of temporaries per point); the
    backward pass keeps only the inputs and recomputes each level's corners.  ``kernel``: on CUDA the
    Triton kernels of ``hash_triton`` do the forward pass and the parameter gradient (``auto``);
    ``torch`` forces the torch path (the reference), ``triton`` forces the kernels (on CPU only under
    ``TRITON_INTERPRET=1``)."""

    backend = "torch"

    def __init__(self, config: HashEncodingConfig | dict | None = None, *, seed: int = 1337,
                 dtype: torch.dtype = torch.float32, device=None, chunk_size: int | None = None,
                 kernel: str = "auto"):
        super().__init__()
        cfg = config if isinstance(config, HashEncodingConfig) else HashEncodingConfig.from_dict(config or {})
        self.config = cfg
        self.levels = level_layout(cfg)
        self.n_input_dims = cfg.n_input_dims
        self.n_output_dims = cfg.n_levels * cfg.n_features_per_level
        self.chunk_size = chunk_size
        self.kernel = kernel
        if kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel must be auto, torch or triton, got {kernel!r}")
        self.backend_reason = "pure torch implementation"
        n = (self.levels[-1].offset + self.levels[-1].size) * cfg.n_features_per_level
        gen = torch.Generator().manual_seed(seed)
        init = torch.empty(n, dtype=dtype).uniform_(-1e-4, 1e-4, generator=gen)
        self.params = nn.Parameter(init.to(device))

    @property
    def n_params(self) -> int:
        return self.params.numel()

    def level_table(self, level: int, params: torch.Tensor | None = None) -> torch.Tensor:
        """View (T_l, F) of one level's table."""
        p = self.params if params is None else params
        lvl, f = self.levels[level], self.config.n_features_per_level
        return p[lvl.offset * f:(lvl.offset + lvl.size) * f].view(lvl.size, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n_input_dims:
            raise ValueError(f"expected inputs (..., {self.n_input_dims}), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.n_input_dims)
        if not x2.is_floating_point():
            x2 = x2.float()
        y = _HashGridFunction.apply(x2.contiguous(), self.params, self)
        return y.reshape(*lead, self.n_output_dims)

    # -- implementation (called by the autograd function) --
    def _chunk(self, x) -> int:
        return int(self.chunk_size or (1 << 21 if x.is_cuda else 1 << 18))

    def _use_triton(self, x, params) -> bool:
        """The Triton kernels (``hash_triton``) on CUDA for what they cover (``kernel='auto'``), always
        with ``kernel='triton'`` (CPU under ``TRITON_INTERPRET=1`` for tests), never with ``'torch'``."""
        if self.kernel == "torch":
            return False
        from . import hash_triton_guard

        ok = hash_triton_guard.available() and (x.is_cuda or self.kernel == "triton")
        if ok:
            from . import hash_triton

            ok = hash_triton.supported(x, params, self.n_input_dims, self.config.n_features_per_level)
        if self.kernel == "triton" and not ok:
            raise RuntimeError("kernel='triton' but the Triton hash kernels cannot run here "
                               f"({hash_triton_guard.reason()}; inputs {x.dtype} on {x.device}, params {params.dtype})")
        return ok

    def _forward_impl(self, x, params):
        n, f, chunk = x.shape[0], self.config.n_features_per_level, self._chunk(x)
        if self._use_triton(x, params):
            from . import hash_triton

            return hash_triton.forward(x, params, self.levels, f)
        out = torch.empty(n, self.n_output_dims, dtype=params.dtype, device=x.device)
        for li, lvl in enumerate(self.levels):
            table = self.level_table(li, params)
            for s in range(0, n, chunk):
                xs = x[s:s + chunk]
                idx, w = _corners(xs, lvl)
                out[s:s + len(xs), li * f:(li + 1) * f] = _interpolate(idx, w, table)
        return out

    def _backward_impl(self, x, params, grad_out, need_x, need_p):
        n, f, chunk = x.shape[0], self.config.n_features_per_level, self._chunk(x)
        if need_p and self._use_triton(x, params):
            from . import hash_triton

            gp = hash_triton.backward_params(x, grad_out, params, self.levels, f)
            gx = self._backward_impl(x, params, grad_out, True, False)[0] if need_x else None
            return gx, gp
        gp = torch.zeros_like(params) if need_p else None
        gx = torch.zeros(x.shape, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                         device=x.device) if need_x else None
        for li, lvl in enumerate(self.levels):
            table = self.level_table(li, params)
            gtable = self.level_table(li, gp) if need_p else None
            for s in range(0, n, chunk):
                xs = x[s:s + chunk]
                go = grad_out[s:s + len(xs), li * f:(li + 1) * f]
                idx, w, frac = _corners(xs, lvl, want_frac=True)
                if need_p:  # one flat scatter per feature (long contiguous rows: fast on CPU)
                    flat = gtable.view(-1)
                    rows = idx.reshape(-1).long() * f
                    wp, go_t = w.to(params.dtype), go.t().contiguous()
                    for k in range(f):
                        flat.scatter_add_(0, rows + k if k else rows, (wp * go_t[k]).reshape(-1))
                if need_x:
                    for dim, dw in enumerate(_weight_derivatives(frac)):
                        dfeat = _interpolate(idx, dw, table)  # ∂(interpolated features)/∂frac_dim
                        gx[s:s + len(xs), dim] += lvl.scale * (dfeat * go).sum(1).to(gx.dtype)
        return (gx.to(x.dtype) if need_x else None), gp

    def extra_repr(self) -> str:
        c = self.config
        n_hashed = sum(lvl.hashed for lvl in self.levels)
        return (f"levels={c.n_levels}, features={c.n_features_per_level}, log2_T={c.log2_hashmap_size}, "
                f"N_min={c.base_resolution}, b={c.per_level_scale:.4g}, finest={self.levels[-1].resolution}, "
                f"hashed_levels={n_hashed}, params={self.n_params}")


def hash_encode_plain(x: torch.Tensor, params: torch.Tensor, levels: list[Level], n_features: int) -> torch.Tensor:
    """The same formula with autograd's own backward and no chunking: the straightforward version
    (stores every level's indices and weights for backward), kept for ``torch.compile`` comparisons."""
    outs = []
    for lvl in levels:
        idx, w = _corners(x, lvl)
        table = params[lvl.offset * n_features:(lvl.offset + lvl.size) * n_features].view(lvl.size, n_features)
        outs.append((w.to(params.dtype).unsqueeze(-1) * table[idx]).sum(0))
    return torch.cat(outs, 1)


class TcnnHashEncoding(nn.Module):
    """``tinycudann.Encoding`` behind the same interface (inputs (..., D), float32 output, and the
    same flat ``params`` layout and state_dict key as ``HashEncoding``)."""

    backend = "tcnn"

    def __init__(self, config: HashEncodingConfig, *, seed: int = 1337, dtype: torch.dtype | None = None):
        super().__init__()
        import tinycudann as tcnn

        self.config = config
        self.n_input_dims = config.n_input_dims
        self.encoding = tcnn.Encoding(config.n_input_dims, config.to_tcnn(), seed=seed, dtype=dtype)
        self.n_output_dims = self.encoding.n_output_dims
        self.backend_reason = "tinycudann is installed and the device is CUDA"
        # the same state_dict key as HashEncoding ("params"), so checkpoints move between backends
        self._register_state_dict_hook(_rename_keys("encoding.params", "params"))
        self._register_load_state_dict_pre_hook(_rename_keys_pre("params", "encoding.params"))

    @property
    def params(self) -> torch.Tensor:
        return self.encoding.params

    @property
    def n_params(self) -> int:
        return self.encoding.params.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.encoding(x.reshape(-1, self.n_input_dims))
        return y.float().reshape(*lead, self.n_output_dims)


def _rename_keys(old: str, new: str):
    def hook(module, state_dict, prefix, local_metadata):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
        return state_dict
    return hook


def _rename_keys_pre(old: str, new: str):
    def hook(state_dict, prefix, *args):
        if prefix + old in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    return hook


def tcnn_available() -> tuple[bool, str]:
    """(importable, reason) for tinycudann."""
    try:
        importlib.import_module("tinycudann")
    except Exception as e:  # ImportError, or a CUDA/driver mismatch raised at import
        return False, f"tinycudann cannot be imported ({type(e).__name__}: {e})"
    return True, "tinycudann imports"


def make_hash_encoding(config: HashEncodingConfig | dict | None = None, prefer_tcnn: bool = True, *,
                       require_tcnn: bool = False, device=None, seed: int = 1337,
                       tcnn_dtype: torch.dtype | None = None) -> nn.Module:
    """A hash encoding on ``device`` (default: CUDA when available, else CPU).

    tinycudann's ``Encoding`` when ``prefer_tcnn`` (or ``require_tcnn``), it imports and the device is
    CUDA; otherwise ``HashEncoding``.  The module's ``backend`` ("tcnn" | "torch") and
    ``backend_reason`` say which and why, and the choice is logged.  ``require_tcnn`` raises instead of
    falling back.  ``tcnn_dtype``: tcnn's precision (None: its default, half on most GPUs)."""
    cfg = config if isinstance(config, HashEncodingConfig) else HashEncodingConfig.from_dict(config or {})
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    why = None
    if prefer_tcnn or require_tcnn:
        ok, why = tcnn_available()
        if ok and dev.type != "cuda":
            ok, why = False, f"device is {dev}, tinycudann needs CUDA"
        if ok:
            with torch.cuda.device(dev):
                enc = TcnnHashEncoding(cfg, seed=seed, dtype=tcnn_dtype)
            log.info("hash encoding: tinycudann on %s (%s)", dev, cfg.to_tcnn())
            return enc
        if require_tcnn:
            raise RuntimeError(f"tinycudann was required for the hash encoding but {why}; install it "
                               "(pip install git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch) "
                               "on a CUDA machine, or drop require_tcnn to use the pure torch implementation")
    enc = HashEncoding(cfg, seed=seed, device=dev)
    enc.backend_reason = "tinycudann not preferred" if not prefer_tcnn else f"pure torch fallback: {why}"
    # on CUDA the fallback is a real loss of speed: say so louder
    (log.warning if prefer_tcnn and dev.type == "cuda" else log.info)(
        "hash encoding: pure torch on %s (%s)", dev, enc.backend_reason)
    return enc
