"""x2recon's own JSON documents (detections, template libraries …): read with the format checked."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import X2ReconInputError


def read_document(path: str | Path, fmt: str, what: str) -> dict:
    """The JSON object in ``path`` whose ``format`` is ``fmt``; an ``X2ReconInputError`` naming the file
    when it is not JSON or not that kind of document (``what``, e.g. "detections file")."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise X2ReconInputError(path, f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise X2ReconInputError(path, f"not an x2recon {what} (expected format {fmt!r})")
    return doc
