"""Structure vocabulary: TotalSegmentator v2 class names, groups and label conventions.

TotalSegmentator names (``vertebrae_T7``, ``rib_left_3``, ``costal_cartilages``…) are the
vocabulary for structures, templates and detection classes everywhere in X2Recon.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources

#: The paper's default bone set (X2BR §4.1): ribs, vertebrae and costal cartilages; no scapulae.
DEFAULT_STRUCTURES = ("ribs", "vertebrae", "costal_cartilages")

#: All bone of a CT as one structure, defined from HU (``dataset/skeleton.py``) on labelled and unlabelled
#: CTs alike.  Not a TotalSegmentator class, so it cannot be combined with named structures.
SKELETON = "skeleton"


@lru_cache(maxsize=None)
def totalseg_v2() -> dict[int, str]:
    """Official TotalSegmentator v2 ``total`` task: class id → name."""
    with resources.files("x2recon.resources").joinpath("totalseg_v2_labels.csv").open() as f:
        return {int(r["id"]): r["name"] for r in csv.DictReader(f)}


def name_to_id() -> dict[str, int]:
    return {n: i for i, n in totalseg_v2().items()}


_VERT_ORDER = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]


def verse_to_totalseg() -> dict[int, str]:
    """VerSe labels (1–7 C1–C7, 8–19 T1–T12, 20–24 L1–L5, 26 sacrum) → TotalSegmentator names."""
    m = {i + 1: f"vertebrae_{lvl}" for i, lvl in enumerate(_VERT_ORDER)}
    m[26] = "sacrum"
    return m


LABEL_CONVENTIONS = {"totalseg": totalseg_v2, "verse": verse_to_totalseg}


def groups() -> dict[str, list[str]]:
    """Named groups of structures (also the detector's coarse classes)."""
    names = list(totalseg_v2().values())
    g = {
        "ribs": [n for n in names if n.startswith("rib_")],
        "vertebrae": [n for n in names if n.startswith("vertebrae_")],
        "cervical": [n for n in names if n.startswith("vertebrae_C")],
        "thoracic": [n for n in names if n.startswith("vertebrae_T")],
        "lumbar": [n for n in names if n.startswith("vertebrae_L")],
        "scapulae": [n for n in names if n.startswith("scapula_")],
        "claviculae": [n for n in names if n.startswith("clavicula_")],
        "sternum": ["sternum"],
        "costal_cartilages": ["costal_cartilages"],
    }
    g["bones_thorax"] = g["ribs"] + g["vertebrae"] + g["sternum"] + g["costal_cartilages"]
    return g


def group_of(name: str) -> str:
    """The paper's detection group of a structure: cervical, thoracic, lumbar, ribs, or other."""
    if name.startswith("vertebrae_C"):
        return "cervical"
    if name.startswith("vertebrae_T"):
        return "thoracic"
    if name.startswith("vertebrae_L") or name in ("vertebrae_S1", "sacrum"):
        return "lumbar"
    if name.startswith("rib_"):
        return "ribs"
    return name


def resolve_structures(spec) -> list[str]:
    """Expand a structure spec (names and/or group names, list or comma string) to names.

    ``skeleton`` (all bone from HU) stands alone.

    Raises ``ValueError`` naming any unknown entry.
    """
    if spec is None:
        spec = DEFAULT_STRUCTURES
    if isinstance(spec, str):
        spec = [s for s in (x.strip() for x in spec.split(",")) if s]
    if SKELETON in spec:
        if len(spec) != 1:
            raise ValueError(f"'{SKELETON}' (all bone from HU) is one structure on its own; it cannot be "
                             f"combined with {[x for x in spec if x != SKELETON]}")
        return [SKELETON]
    known = set(totalseg_v2().values())
    g = groups()
    out: list[str] = []
    bad = []
    for s in spec:
        if s in g:
            out += g[s]
        elif s in known:
            out.append(s)
        else:
            bad.append(s)
    if bad:
        raise ValueError(
            f"unknown structure(s) {bad}: use TotalSegmentator names or groups {sorted(g)}"
        )
    seen = set()
    return [n for n in out if not (n in seen or seen.add(n))]
