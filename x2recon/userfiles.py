"""A user's text and JSON files, read with clean errors (encoding, syntax, nesting depth) naming the file.

Below every building block (geometry reads a user's geometry JSON with it; ``io.documents`` reads x2recon's
own documents on top of it), so it imports nothing of x2recon but ``errors``."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import X2ReconInputError


#: Deepest nesting a user's JSON document may have (x2recon's own are ≤ 5 deep); deeper is refused before
#: Python's parser recurses (a file nested 100 000 deep raised RecursionError).
MAX_JSON_DEPTH = 64


def read_text(path: str | Path, what: str) -> str:
    """A user's text file (a CT list, a JSON document) as UTF-8, a leading byte-order mark dropped.  Text in
    another encoding (Latin-1, UTF-16 without BOM …) is an ``X2ReconInputError`` naming the file, the line and
    the byte, never a guess: a guessed path or value would be silently wrong."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        encoding = "utf-16"  # a BOM says which: Windows Notepad's "Unicode"
    else:
        encoding = "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise X2ReconInputError(path, f"{what} is not UTF-8 text (byte 0x{data[e.start]:02X} on line {line}; "
                                      "Latin-1 or another legacy encoding?): save it as UTF-8") from None


def read_json(path: str | Path, what: str):
    """The JSON value in a user's file: ``read_text``, then parsed with its nesting depth checked first;
    every problem (encoding, syntax, nesting) an ``X2ReconInputError`` naming the file."""
    path = Path(path)
    return parse_json(read_text(path, what), path, what)


def parse_json(text: str, path: str | Path | None, what: str):
    """``json.loads`` of ``text`` with clear errors naming ``path`` (or ``what`` when there is no file)."""
    depth = _nesting(text)
    if depth > MAX_JSON_DEPTH:
        raise X2ReconInputError(path, f"{what} is nested {depth:,} levels deep (at most {MAX_JSON_DEPTH}): "
                                      "not an x2recon document")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise X2ReconInputError(path, f"{what} is not JSON: {e}") from None
    except RecursionError:  # nesting the scan above missed (should not happen): still a clean error
        raise X2ReconInputError(path, f"{what} is nested too deeply to be an x2recon document") from None


def _nesting(text: str) -> int:
    """Greatest depth of ``[``/``{`` outside JSON strings (a linear scan: no recursion)."""
    import re

    depth = best = 0
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', text):
        c = m.group()
        if c in "[{":
            depth += 1
            best = max(best, depth)
        elif c in "]}":
            depth -= 1
    return best
