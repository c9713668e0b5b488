"""``x2recon info``: the config of anything the project writes as a model — an X2B/X2B2/SPIDER
checkpoint, a detector's weights (``train detector``) or a template library folder (``template build``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import X2ReconInputError


def read_info(path: str | Path) -> dict:
    """The JSON config of ``path``: a network checkpoint (``x2recon.checkpoint/1``), detector weights
    (``x2recon.detector/1``), a template library folder (its ``library.json``), or a detector run
    folder (its ``detector.safetensors``).  Anything else fails naming what was expected."""
    from ..nn.checkpoint import CheckpointError, read_config
    from ..x2br.detection.yolo import WEIGHTS_FORMAT, read_detector_config

    path = Path(path)
    if path.is_dir():
        if (path / "library.json").is_file():
            from ..x2br.template import load_library

            return load_library(path).doc
        if (path / "detector.safetensors").is_file():
            return read_detector_config(path / "detector.safetensors")
        raise X2ReconInputError(path, "a folder, but neither a template library (library.json) nor a detector run "
                                      "(detector.safetensors); give a .safetensors file or one of those folders")
    try:
        return read_config(path)
    except CheckpointError as e:
        if repr(WEIGHTS_FORMAT) not in e.problem:  # not a detector either: the checkpoint reader's message stands
            raise
    return read_detector_config(path)


def bundled_table() -> str:
    """``info --bundled``: one line per bundled asset — alias, file, size, present or missing, what it is."""
    from ..resources import listing

    rows = listing()
    w = max(len(r["file"]) for r in rows)
    lines = [f"{'alias':9s} {'file':{w}s} {'MB':>6s}  {'state':7s}  what"]
    for r in rows:
        lines.append(f"{r['alias']:9s} {r['file']:{w}s} {r['size_mb']:6.1f}  {'present' if r['present'] else 'missing':7s}  "
                     f"{r['what']}")
    return "\n".join(lines)


def asset_info(value: str) -> dict:
    """``info ALIAS|PATH``: the config; for a bundled asset (by alias, or its file's path) also its card
    under ``"card"``.  A missing bundled asset or card fails naming the file."""
    from ..resources import ASSETS, bundled, card
    from ..resources.registry import alias_of

    alias = value if value in ASSETS and not Path(value).exists() else alias_of(value)
    path = bundled(alias) if alias else value
    doc = read_info(path)
    if alias:
        doc["card"] = card(alias)
    return doc


def cmd_info(a) -> int:
    if a.bundled:
        print(bundled_table())
        return 0
    if a.model is None:
        raise X2ReconInputError(None, "give a model file, folder or bundled alias, or --bundled")
    print(json.dumps(asset_info(a.model), indent=1, ensure_ascii=False))
    return 0


def add_parsers(sub) -> None:
    from ..resources import ASSETS, asset_arg

    p = sub.add_parser("info", help="print the config of a checkpoint, detector or template library (and a bundled "
                                    "one's card)",
                       description="Print the JSON config of an X2B/X2B2/SPIDER checkpoint (architecture, geometry, "
                                   "training, versions), of detector weights (x2recon train detector: classes, "
                                   "image size) or of a template library folder (x2recon template build). A bundled "
                                   "asset, named by its alias, also prints its card (key 'card': training patients, "
                                   "structures, geometry, preset, held-out figures). --bundled lists them all.")
    p.add_argument("model", nargs="?", type=asset_arg,
                   help="a .safetensors checkpoint or detector, a template library or detector run folder, or a "
                        f"bundled asset: {', '.join(ASSETS)} (a file of that name in the working directory wins)")
    p.add_argument("--bundled", action="store_true",
                   help="list the bundled assets: alias, file, size, present or missing, what each is")
    p.set_defaults(func=cmd_info)
