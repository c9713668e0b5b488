"""Device, precision, memory blocking and progress/cancel plumbing shared by the registrations."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from ..errors import CancelledError
from ..nn.device import resolve_device  # noqa: F401  (re-exported: the registrations import it from here)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None → float64 on CPU (exact enough to compare with references), float32 on CUDA (speed)."""
    if dtype is None:
        return torch.float64 if device.type == "cpu" else torch.float32
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64, "double": torch.float64,
                 "float": torch.float32}[dtype]
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def block_elements(device: torch.device, dtype: torch.dtype) -> int:
    """Entries of one (rows × M) block of the correspondence matrix held at a time.

    CPU: 2²² (32 MiB in float64; stays near the caches' reach). CUDA: 2²⁶ (256 MiB in float32),
    enough to keep the GPU busy, far below its memory.
    """
    return (1 << 26) if device.type == "cuda" else (1 << 22)


def sigma2_floor(dtype: torch.dtype) -> float:
    """Smallest σ² (normalised units²) the E-step resolves: float32's |x|²+|y|²−2x·y error is ~1e-7."""
    return 1e-5 if dtype == torch.float32 else 1e-12


class Monitor:
    """Calls ``progress(fraction, message)`` and checks ``cancel()``; either may stop the run.

    ``progress`` returning ``False`` or ``cancel()`` returning ``True`` raises ``CancelledError``.
    """

    def __init__(self, progress: Callable | None, cancel: Callable | None, start: float = 0.0, end: float = 1.0):
        self.progress, self.cancel, self.start, self.end = progress, cancel, start, end

    def sub(self, start: float, end: float) -> "Monitor":
        span = self.end - self.start
        return Monitor(self.progress, self.cancel, self.start + span * start, self.start + span * end)

    def __call__(self, fraction: float, message: str) -> None:
        if self.cancel is not None and self.cancel():
            raise CancelledError("registration cancelled")
        if self.progress is not None:
            f = self.start + (self.end - self.start) * min(max(fraction, 0.0), 1.0)
            if self.progress(f, message) is False:
                raise CancelledError("registration cancelled")


@contextlib.contextmanager
def full_precision_matmul(device: torch.device):
    """Disable TF32 matrix products on CUDA while registering: the E-step's ‖x‖² + ‖y‖² − 2x·y needs
    float32's full mantissa (TF32 keeps 10 bits), whatever the caller set globally."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def precise_on_cuda(fn):
    """Decorator: run ``fn`` under ``full_precision_matmul`` for its ``device`` keyword."""

    @functools.wraps(fn)
    def wrapper(*args, **kw):
        with full_precision_matmul(resolve_device(kw.get("device", "auto"))):
            return fn(*args, **kw)

    return wrapper
