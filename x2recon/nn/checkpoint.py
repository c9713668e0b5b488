"""Checkpoints: one ``.safetensors`` file — the weights, and the JSON config in its metadata.

The config (architecture, the training geometry, input normalisation, training settings, package
versions) travels inside the weights file, so a model is one file a user can hand around or pick in
Slicer; ``x2recon info CKPT`` prints it.  Loading never unpickles code.  A checkpoint that does not
match the code (unknown settings, other tensor names or shapes) fails with what differs.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from ..errors import X2ReconInputError
from ..io.atomic import atomic_path

FORMAT = "x2recon.checkpoint/1"
META_KEY = "x2recon"


class CheckpointError(X2ReconInputError):
    """A checkpoint that cannot be read or does not match the code."""


def versions() -> dict:
    import x2recon

    out = {"x2recon": getattr(x2recon, "__version__", "unknown"), "torch": torch.__version__,
           "python": platform.python_version()}
    try:  # the installed version, without importing timm (which imports torchvision; a SPIDER run needs neither)
        from importlib.metadata import version

        out["timm"] = version("timm")
    except Exception:  # noqa: BLE001 - not installed, or no metadata: nothing to record
        pass
    return out


def save_checkpoint(path: str | Path, model: torch.nn.Module, config: dict, *, half: bool = False) -> Path:
    """Write ``model``'s weights and ``config`` (a JSON-able dict with at least ``network`` and
    ``model``) atomically.  ``half``: store float tensors as float16 (half the size; loading
    returns float32), for small distributable models such as the demo."""
    from safetensors.torch import save_file

    if "network" not in config or "model" not in config:
        raise ValueError("checkpoint config needs 'network' and 'model' entries")
    meta = {"format": FORMAT, **config, "versions": versions()}
    sd = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    tensors = {}
    for k, v in sd.items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        tensors[k] = v.contiguous()
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        except Exception as e:  # noqa: BLE001 - safetensors reports a failed write (a full disk) as SafetensorError
            raise _write_error(path, e) from None
    return path


def _write_error(path: Path, e: Exception) -> Exception:
    """safetensors' error for a file it could not write, as an ``OSError`` naming ``path`` when the text
    carries the OS error ("… No space left on device (os error 28)"), else a ``CheckpointError``."""
    import os
    import re

    m = re.search(r"os error (\d+)", str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    return CheckpointError(path, f"cannot write the checkpoint ({type(e).__name__}: {e})")


def rewrite_metadata(path: str | Path, change) -> Path:
    """Replace a ``.safetensors`` file's metadata by ``change(metadata)`` (a dict of strings), keeping every
    tensor byte for byte: the header is re-serialised, the data section copied unchanged (its offsets are
    relative to its own start).  Written atomically."""
    import struct

    from ..io.atomic import atomic_write_bytes

    path = Path(path)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = change(dict(header.pop("__metadata__", None) or {}))
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors metadata maps strings to strings")
    text = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned, as safetensors writes it
    atomic_write_bytes(path, struct.pack("<Q", len(text)) + text + data[8 + n:])
    return path


def read_config(path: str | Path) -> dict:
    """The JSON config of a checkpoint, without loading its weights.  Anything that is not an x2recon
    checkpoint with a ``network`` name and a ``model`` table is a ``CheckpointError`` naming the file
    (and the key)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "model file not found" if not path.exists() else "is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError on non-safetensors files
        raise CheckpointError(path, f"not a safetensors model file ({type(e).__name__}: {e})") from None
    if META_KEY not in meta:
        raise CheckpointError(path, "a safetensors file, but not an x2recon model (no x2recon config in its metadata)")
    try:
        cfg = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(path, f"its x2recon config is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(path, "its x2recon config is nested too deeply to be a model config") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(path, f"its x2recon config is a JSON {type(cfg).__name__}, not an object")
    if cfg.get("format") != FORMAT:
        raise CheckpointError(path, f"checkpoint format {cfg.get('format')!r}; this x2recon reads {FORMAT!r}")
    if not isinstance(cfg.get("network"), str):
        raise CheckpointError(path, "its config has no 'network' name (key 'network')")
    if not isinstance(cfg.get("model"), dict):
        raise CheckpointError(path, "its config has no 'model' table (key 'model')")
    return cfg


def _read_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(path, "model file not found" if not path.exists() else "is not a file")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (text file, pickle, truncated file) has no common base to name
        raise CheckpointError(path, f"not a safetensors model file ({type(e).__name__}: {e})") from None


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load ``path``'s weights into ``model``; a mismatch lists the missing, unexpected and
    differently shaped tensors."""
    path = Path(path)
    sd = _read_tensors(path)
    target = model.module if hasattr(model, "module") else model
    own = target.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing from the file (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors the model does not have (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shapes differ (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(path, "weights do not match the architecture in its config: " + "; ".join(parts))
    target.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two (nested) config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if k not in a:
            out.append(f"{key}: absent vs {b[k]!r}")
        elif k not in b:
            out.append(f"{key}: {a[k]!r} vs absent")
        elif isinstance(a[k], dict) and isinstance(b[k], dict):
            out += config_differences(a[k], b[k], key + ".")
        elif a[k] != b[k]:
            out.append(f"{key}: {a[k]!r} vs {b[k]!r}")
    return out


# Each network kind's builder, named by module so this building block imports no method package.
BUILDERS = {
    "x2b": ("x2recon.x2b.network", "build_model"),
    "x2b2": ("x2recon.x2b.network", "build_model"),
    "spider": ("x2recon.spider.network", "build_spider"),
}
NETWORKS = tuple(BUILDERS)


def build_from_config(network: str, model_cfg: dict, device=None):
    """A fresh network of kind ``network`` ("x2b", "x2b2", "spider") from its ``model`` config."""
    import importlib

    module, name = BUILDERS[network]
    build = getattr(importlib.import_module(module), name)
    return build(model_cfg, device=device) if network == "spider" else build(model_cfg)


def load_model(path: str | Path, device: str | torch.device = "cpu", *, expect: dict | None = None,
               network: str | tuple[str, ...] | None = None):
    """``(model in eval mode on device, config)`` from a checkpoint.  ``expect``: a ``model`` config
    the checkpoint must equal (e.g. when resuming training) — else the differences are named.
    ``network``: the kind(s) the caller can use (e.g. "spider"); another kind is a clear error."""
    path = Path(path)
    cfg = read_config(path)
    kind = cfg.get("network")
    if kind not in NETWORKS:
        raise CheckpointError(path, f"network {kind!r} is not one this x2recon knows ({', '.join(NETWORKS)})")
    wanted = (network,) if isinstance(network, str) else network
    if wanted and kind not in wanted:
        raise CheckpointError(path, f"is a {kind.upper()} model; this needs {' or '.join(w.upper() for w in wanted)}")
    if expect is not None:
        diff = config_differences(cfg["model"], expect)
        if diff:
            raise CheckpointError(path, "architecture differs from the one asked for: " + "; ".join(diff))
    from ..deps import DependencyError

    try:
        model = build_from_config(kind, cfg["model"], device=device)
    except DependencyError:  # the installation, not the checkpoint (e.g. a torchvision built for another torch)
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(path, f"cannot build its model from its 'model' config ({type(e).__name__}: {e})") from None
    load_weights(path, model)
    tau = calibrated_threshold(cfg)
    if tau is not None and hasattr(getattr(model, "cfg", None), "threshold"):
        model.cfg.threshold = tau  # the surface threshold its validation chose (x2b.train.validate)
    return model.to(device).eval(), cfg


def calibrated_threshold(cfg: dict) -> float | None:
    """The surface threshold a checkpoint's training calibrated on validation data, None when it has none."""
    tr = cfg.get("training") or {}
    tau = tr.get("val/threshold")
    if not tr.get("calibrate_threshold") or not isinstance(tau, (int, float)) or not 0 < float(tau) < 1:
        return None
    return float(tau)
