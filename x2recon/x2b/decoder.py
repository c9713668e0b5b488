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


def _linear(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 ``Conv1d`` applied to features in the last dimension (its weight (out, in, 1) as a linear map)."""
    return nn.functional.linear(x, conv.weight[:, :, 0], conv.bias)


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

    def forward_points(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``forward`` on features laid out (B, T, F): the same statistics (over B and T) and running
        averages, normalised as an (B·T, F) batch."""
        B, T, F = x.shape
        y = self.bn(x.reshape(B * T, F)).view(B, T, F)
        return torch.addcmul(_linear(self.beta, c)[:, None], y, _linear(self.gamma, c)[:, None])


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

    def forward_points(self, x, c):
        """``forward`` on (B, T, F) features."""
        h = _linear(self.fc0, torch.relu(self.bn0.forward_points(x, c)))
        return x + _linear(self.fc1, torch.relu(self.bn1.forward_points(h, c)))


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
        """Computed on points laid out (B, T, features), each 1×1 convolution as the linear map it is: the
        same function and batch-norm statistics as ONet's (B, features, T) convolutions, ~20 % less CPU time
        for a training step's forward and backward (no convolution kernels, no transposes)."""
        net = _linear(self.fc_p, self.embed(p))
        if self.fc_local is not None:
            if local is None:
                raise ValueError("this decoder was built for local features; none given")
            net = net + _linear(self.fc_local, local)
        for block in self.blocks:
            net = block.forward_points(net, c)
        return _linear(self.fc_out, torch.relu(self.bn.forward_points(net, c)))[..., 0]


#: ``--precision`` choices of the folded decoder's matrix products ("auto": ``cpu_precision()`` on CPU).
PRECISIONS = ("auto", "fp32", "bf16", "int8")


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (``/proc/cpuinfo``; empty where there is none to read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_precision(flags: set[str] | None = None) -> str:
    """The decoder precision ``auto`` picks on this CPU, from its flags: "bf16" where the chip multiplies
    bf16 natively (``avx512_bf16``, or AMX's ``amx_bf16``), else "fp32" — on AVX2 alone bf16 is emulated
    (measured 12× slower than fp32 on a 2-core AMD EPYC).  Never "int8": dynamic quantisation misses the
    accuracy check on the bundled model (mesh IoU 0.977 against fp32's at 64³, vertices up to 3.6 voxels
    apart, against bf16's 0.996); it runs only when asked for."""
    flags = cpu_flags() if flags is None else flags
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"


def int8_available() -> bool:
    """Whether this torch has the eager dynamic quantisation that ``--precision int8`` uses."""
    try:
        from torch.ao.quantization import quantize_dynamic  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` ("auto", "fp32", "bf16", "int8") → the one the decoder runs on ``device``: "auto" is
    ``cpu_precision()`` on CPU and fp32 on an accelerator; int8 (dynamic quantisation) runs on CPU only."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device)
    if precision == "auto":
        return cpu_precision() if dev.type == "cpu" else "fp32"
    if precision == "int8" and dev.type != "cpu":
        raise ValueError(f"--precision int8 (dynamic quantisation) runs on CPU only, not on {dev.type}: "
                         "use bf16 or fp32 there")
    return precision


class FoldedDecoder:
    """The decoder in eval mode for one fixed latent, with every conditional batch norm folded into
    an affine map (and ``bn1`` into the linear layer before it): two matrix products per block and
    no per-point normalisation, on points laid out (T, features).  Same values as
    ``OccupancyDecoder.forward`` in eval mode, several times faster for MISE's millions of points.

    ``precision`` ("fp32", "bf16", "int8"; see ``resolve_precision``): the matrix products of the
    local-feature layer and of the residual blocks — 97 % of the FLOPs — in bfloat16 (weights cast once,
    activations per call) or int8 (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations
    quantised per call), without gradients only; the point embedding (its Fourier features need fp32),
    the affine maps, the residual sum and the output layer stay fp32.  With gradients (vertex refinement,
    network normals) the fp32 weights are used."""

    def __init__(self, dec: OccupancyDecoder, c: torch.Tensor, precision: str = "fp32"):
        if precision not in PRECISIONS[1:]:
            raise ValueError(f"precision must be fp32, bf16 or int8 (resolve 'auto' first), got {precision!r}")
        self.precision = precision
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
        self.reduced = None if precision == "fp32" else self._reduced_layers(precision)

    def _reduced_layers(self, precision: str):
        """The reduced-precision products: ``(local, [(block fc0, block fc1), …])`` as callables
        fp32 (T, in) → fp32 (T, out), bias included."""
        pairs = [(self.wl, self.bl)] if self.wl is not None else []
        pairs += [(wb[i], wb[i + 1]) for wb in self.blocks for i in (2, 4)]
        if precision == "bf16":
            def linear(w, b):
                w16, b16 = w.T.contiguous().to(torch.bfloat16), b.to(torch.bfloat16)
                return lambda x: torch.nn.functional.linear(x.to(torch.bfloat16), w16, b16).float()

            layers = [linear(w, b) for w, b in pairs]
        else:
            layers = self._int8_layers(pairs)
        local = layers.pop(0) if self.wl is not None else None
        return local, list(zip(layers[0::2], layers[1::2]))

    @staticmethod
    def _int8_layers(pairs):
        """``nn.Linear`` modules of the folded weights, dynamically quantised to int8 (fbgemm / oneDNN)."""
        import warnings

        if not int8_available():
            raise ValueError(f"--precision int8 needs torch.ao.quantization.quantize_dynamic, which torch "
                               f"{torch.__version__} does not have: use --precision bf16 or fp32")
        mods = torch.nn.ModuleList()
        for w, b in pairs:
            lin = torch.nn.Linear(w.shape[0], w.shape[1])
            with torch.no_grad():
                lin.weight.copy_(w.T)
                lin.bias.copy_(b)
            mods.append(lin)
        with warnings.catch_warnings():  # torch ≥ 2.10 marks its eager quantisation API deprecated
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            q = quantize_dynamic(mods.eval(), {torch.nn.Linear}, dtype=torch.qint8)
        return list(q)

    def __call__(self, p: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        """``p (T, 3)``, ``local (T, L)`` → logits ``(T,)`` (differentiable w.r.t. ``p`` and ``local``
        when grad mode is on, then always in fp32; in-place updates only under ``torch.no_grad``)."""
        inplace = not torch.is_grad_enabled()
        if inplace and self.reduced is not None:
            return self._call_reduced(p, local)
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

    def _call_reduced(self, p: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
        """``__call__`` without gradients, the blocks' products in ``self.precision``."""
        fc_local, fcs = self.reduced
        x = torch.addmm(self.bp, fourier_embed(p.float(), self.fourier), self.wp)
        if fc_local is not None:
            x += fc_local(local.float())
        for (a0, b0, *_), (fc0, fc1) in zip(self.blocks, fcs):
            h = torch.addcmul(b0, x, a0).clamp_min_(0)
            x += fc1(fc0(h).clamp_min_(0))
        h = torch.addcmul(self.b, x, self.a).clamp_min_(0)
        return torch.addmm(self.bo, h, self.wo)[:, 0]
