"""The one ``--device`` resolver for torch code: networks, reconstruction, registration."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None → CUDA when torch sees a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested, but torch sees no CUDA GPU (use --device cpu or auto)")
    return d
