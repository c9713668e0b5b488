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


def cmd_info(a) -> int:
    print(json.dumps(read_info(a.model), indent=1))
    return 0


def add_parsers(sub) -> None:
    from ..resources import model_arg

    p = sub.add_parser("info", help="print the config of a checkpoint, detector or template library",
                       description="Print the JSON config of an X2B/X2B2/SPIDER checkpoint (architecture, geometry, "
                                   "training, versions), of detector weights (x2recon train detector: classes, "
                                   "image size) or of a template library folder (x2recon template build).")
    p.add_argument("model", type=model_arg,
                   help="a .safetensors checkpoint or detector, a template library or detector run folder, "
                        "or 'demo' (the bundled demo model)")
    p.set_defaults(func=cmd_info)
