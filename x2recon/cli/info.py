"""``x2recon info``: a checkpoint's config."""

from __future__ import annotations

import json


def cmd_info(a) -> int:
    from ..nn.checkpoint import read_config

    print(json.dumps(read_config(a.model), indent=1))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="print a checkpoint's config (architecture, geometry, training, versions)")
    p.add_argument("model", help="checkpoint (.safetensors)")
    p.set_defaults(func=cmd_info)
