"""x2recon's own JSON documents (detections, template libraries …): read with the format checked."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import X2ReconInputError


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


def read_document(path: str | Path, fmt: str, what: str) -> dict:
    """The JSON object in ``path`` whose ``format`` is ``fmt``; an ``X2ReconInputError`` naming the file
    when it is not UTF-8 JSON or not that kind of document (``what``, e.g. "detections file")."""
    path = Path(path)
    doc = read_json(path, what)
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise X2ReconInputError(path, f"not an x2recon {what} (expected format {fmt!r})")
    return doc


def recorded_path(path: str | Path | None) -> str | None:
    """How a record that leaves this machine (checkpoint metadata, a template library, a model card) names
    a file or folder: its name only, never the machine's absolute path."""
    if path is None or str(path) == "":
        return None if path is None else ""
    return Path(path).resolve().name


_PATH_SPLIT = r"([\s=,;\"']+)"


def _is_absolute(word: str) -> bool:
    from pathlib import PurePosixPath, PureWindowsPath

    return word.startswith("~/") or (len(word) > 1 and PurePosixPath(word).is_absolute()) or \
        PureWindowsPath(word).is_absolute()


def absolute_paths(doc) -> list[str]:
    """Every absolute path (POSIX ``/…``, ``~/…``, Windows ``C:\\…``) in a JSON-able ``doc``: in string values
    and as words of strings such as recorded command lines."""
    import re

    if isinstance(doc, dict):
        return [p for v in doc.values() for p in absolute_paths(v)]
    if isinstance(doc, (list, tuple)):
        return [p for v in doc for p in absolute_paths(v)]
    if isinstance(doc, str):
        return [w for w in re.split(_PATH_SPLIT, doc) if _is_absolute(w)]
    return []


def without_machine_paths(doc, base: str | Path | None = None):
    """``doc`` (JSON-able) with every absolute path (as :func:`absolute_paths` finds them) made relative to
    ``base`` when it lies inside it, else cut to its name: what a record that leaves this machine keeps."""
    import re

    if isinstance(doc, dict):
        return {k: without_machine_paths(v, base) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [without_machine_paths(v, base) for v in doc]
    if not isinstance(doc, str):
        return doc
    root = Path(base).resolve() if base is not None else None

    def portable(word: str) -> str:
        if not _is_absolute(word):
            return word
        from pathlib import PureWindowsPath

        if not word.startswith(("/", "~")):
            return PureWindowsPath(word).name
        p = Path(word).expanduser()
        if root is not None and p.is_relative_to(root) and p != root:
            return p.relative_to(root).as_posix()
        return p.name
    return "".join(portable(w) for w in re.split(_PATH_SPLIT, doc))
