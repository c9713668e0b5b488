"""Image encoders from timm, one input channel, offline: pretrained weights only from a local file.

A timm backbone (ConvNeXt as the X2BR paper; any timm model with ``forward_intermediates``) gives
the global descriptor (pooled, normalised last stage, as timm's pre-logits) and, for pixel-aligned
features, the intermediate stage maps.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import X2ReconInputError


def create_backbone(name: str, *, pretrained_path: str | Path | None = None, drop_path_rate: float = 0.0) -> nn.Module:
    """A timm model with one input channel and no classifier.

    ``pretrained_path``: a local weights file (safetensors / .pth / .bin as timm reads it) for this
    backbone; timm folds the RGB stem into one channel.  Nothing is ever downloaded.
    """
    from ..deps import import_timm

    timm = import_timm()  # a torchvision built for another torch: one line on how to reinstall, not timm's traceback

    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown timm backbone {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    kwargs = dict(in_chans=1, num_classes=0, drop_path_rate=drop_path_rate)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


def _read_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Backbone weights as timm publishes them (RGB stem, with classifier) into our one-channel,
    head-less model: the stem is summed over its colour channels (timm's ``adapt_input_conv``), the
    classifier dropped; every other tensor must be in the file with the right shape."""
    from ..deps import import_timm

    import_timm()
    from timm.models import adapt_input_conv

    p = Path(path)
    if not p.is_file():
        raise X2ReconInputError(p, "pretrained backbone weights not found (give a local file; nothing is downloaded)")
    try:
        sd = _read_state_dict(p)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise X2ReconInputError(p, f"cannot load as backbone weights ({type(e).__name__}: {e})") from None
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    own = model.state_dict()
    first = cfg.get("first_conv")
    for conv in ([first] if isinstance(first, str) else first or []):
        k = f"{conv}.weight"
        if k in sd and k in own and sd[k].shape[1] != own[k].shape[1]:
            sd[k] = adapt_input_conv(own[k].shape[1], sd[k])
    heads = cfg.get("classifier")
    for h in ([heads] if isinstance(heads, str) else heads or []):
        sd = {k: v for k, v in sd.items() if not k.startswith(f"{h}.")}
    missing = sorted(set(own) - set(sd))
    shapes = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or shapes:
        detail = []
        if missing:
            detail.append(f"{len(missing)} of {len(own)} tensors missing (e.g. {', '.join(missing[:3])})")
        if shapes:
            detail.append(f"{len(shapes)} with other shapes (e.g. {', '.join(shapes[:3])})")
        raise X2ReconInputError(p, f"cannot load as {type(model).__name__} weights: " + "; ".join(detail))
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


class Encoder(nn.Module):
    """``forward(x (B, 1, H, W)) → (global (B, C), [stage maps (B, C_i, H_i, W_i)] , last map)``."""

    def __init__(self, backbone: str, *, local_stages: tuple[int, ...] = (), pretrained_path=None,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.net = create_backbone(backbone, pretrained_path=pretrained_path, drop_path_rate=drop_path_rate)
        self.local_stages = tuple(int(i) for i in local_stages)
        info = self.net.feature_info
        n_stages = len(info)
        for i in self.local_stages:
            if not 0 <= i < n_stages:
                raise ValueError(f"local stage {i} out of range: {backbone} has stages 0..{n_stages - 1}")
        self.stage_channels = [int(info[i]["num_chs"]) for i in range(n_stages)]
        self.num_features = int(self.net.num_features)
        self._last = n_stages - 1

    def forward(self, x: torch.Tensor):
        wanted = sorted(set(self.local_stages) | {self._last})
        last, inter = self.net.forward_intermediates(x, indices=wanted, norm=False, output_fmt="NCHW")
        maps = dict(zip(wanted, inter))
        g = self.net.forward_head(last, pre_logits=True)
        return g, [maps[i] for i in self.local_stages], last
