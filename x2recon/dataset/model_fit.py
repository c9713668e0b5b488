"""Does a model fit the data it is given?  The checks ``x2recon evaluate`` and ``x2recon reconstruct`` make
before any work.

A checkpoint's config records the dataset build it was trained on (``dataset.build``: structures and
geometry) and, from this version on, which cases it trained on (``dataset.training_cases``: each training
case's identity).  A dataset case records its settings (``meta.json`` ``config``) and, from this version on,
a checksum of its CT's voxels (``inputs.ct_sha256``).  So:

* structures (X2B: the set the occupancy target joins; SPIDER: each class must have a structure in the
  data) and geometry (:data:`GEOMETRY`) of the model and of each case are compared; a difference is an
  error naming both values, or with ``--allow-mismatch`` a warning that the tables carry;
* a case's identity is its CT's voxel checksum and its deformation (none for the scan itself): a case
  whose identity is a training case's was seen in training; one from a training CT under another
  deformation is the same patient.  Checkpoints or datasets that predate the records say so instead of
  guessing;
* an X-ray's geometry (its JSON, or what placement chose) is compared with the model's training geometry.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import X2ReconInputError

#: Build settings that make up the imaging geometry, compared between a model and a dataset, with the
#: names messages use.  The detector width is the image size in mm (what the image covers); the DRR's pixel
#: count is not compared: every image is resampled to the network's input size.
GEOMETRY = {"isocenter": "isocentre", "box_size": "box edge (mm)", "sdd": "SDD (mm)", "sod": "SOD (mm)",
            "beam": "beam", "detector_mm": "detector width (mm)", "clahe": "CLAHE"}
#: What each isocentre mode (``build-dataset --isocenter``) centres the reconstruction box on.
ISOCENTRE_MEANING = {"structures": "the centre of the selected bones", "thorax": "the centre of the lungs",
                     "ct": "the centre of the CT volume"}
#: How a training case is identified in ``dataset.training_cases``.
IDENTITY = "first 16 hex digits of the CT voxels' sha256 / of the deformation's sha256 ('original': the scan itself)"

SEEN, NOT_SEEN, SAME_CT, UNKNOWN, NOT_RECORDED = ("yes", "no", "same CT, other deformation", "unknown",
                                                  "not recorded")


# --------------------------------------------------------------------------- identities and records


def case_identity(meta: dict) -> str | None:
    """``<CT checksum>/<deformation checksum or 'original'>`` of a case's ``meta.json``; None for a case
    built before x2recon recorded its CT checksum."""
    ct = ((meta.get("inputs") or {}).get("ct_sha256") or "")[:16]
    if not ct:
        return None
    d = meta.get("deformation")
    part = "original" if d is None else hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    return f"{ct}/{part}"


def read_case_meta(root: Path, case_id: str) -> dict:
    """A built case's ``meta.json``; a missing or unreadable one names the case folder."""
    folder = Path(root) / "cases" / case_id
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        raise X2ReconInputError(folder, "case not built (no meta.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise X2ReconInputError(folder / "meta.json", f"unreadable ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise X2ReconInputError(folder / "meta.json", "not a JSON object")
    return meta


def training_cases(root: str | Path, train_split: str) -> dict:
    """``dataset.training_cases`` of a checkpoint config: each training case's identity (:func:`case_identity`;
    None where the dataset predates CT checksums), so ``evaluate`` can say which cases a model saw."""
    from .torch_data import read_split

    root = Path(root)
    return {"split": train_split, "identity": IDENTITY,
            "cases": {cid: case_identity(read_case_meta(root, cid)) for cid in read_split(root, train_split)}}


# --------------------------------------------------------------------------- describing values


def describe_structures(names) -> str:
    """A short name for a structure list: whole groups by their group name, ``skeleton`` spelled out."""
    from ..structures import SKELETON, groups

    names = list(names or [])
    if names == [SKELETON]:
        return "skeleton (all bone from HU)"
    g, left, parts = groups(), list(names), []
    for group in ("ribs", "vertebrae", "cervical", "thoracic", "lumbar", "scapulae", "claviculae"):
        members = g[group]
        if members and all(m in left for m in members):
            parts.append(group)
            left = [n for n in left if n not in members]
    parts += left
    text = ", ".join(parts[:6]) + (f", … ({len(parts) - 6} more)" if len(parts) > 6 else "")
    return f"{text} ({len(names)} structures)" if len(names) > 1 else text


def _value(key: str, v) -> str:
    if key == "clahe":
        return "on" if v else "off"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{float(v):g}"


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def _dataset_values(key: str, values: list) -> str:
    """``thorax`` or ``structures (2 cases), thorax (1 case)``."""
    counts: dict[str, int] = {}
    for v in values:
        counts[_value(key, v)] = counts.get(_value(key, v), 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{k} ({n} case{'s' if n > 1 else ''})" for k, n in counts.items())


# --------------------------------------------------------------------------- model vs dataset


@dataclass
class ModelFit:
    """What ``evaluate`` found out about a model and the cases it scores."""

    mismatches: list[str] = field(default_factory=list)  # "what: model … vs dataset …"
    unchecked: str = ""  # why structures and geometry could not be compared ("" when they were)
    seen: dict[str, str] = field(default_factory=dict)  # case id → SEEN, NOT_SEEN, SAME_CT, UNKNOWN, NOT_RECORDED
    allowed: bool = False  # mismatches were allowed (--allow-mismatch)
    trained_on: str = ""  # a bundled model's training patients from its card, said where no cases are recorded
    notes: list[str] = field(default_factory=list)  # differences that are no error (what lies outside the body)

    def seen_note(self) -> str:
        """``seen in training: k of n cases`` (and the same-CT and unknown counts), or why it cannot be told."""
        n = len(self.seen)
        vals = list(self.seen.values())
        if n and all(v == NOT_RECORDED for v in vals):
            return ("training cases not recorded (the model predates x2recon recording them): cannot tell whether "
                    "it trained on these cases" + (f"; its card says it was trained on {self.trained_on}"
                                                   if self.trained_on else ""))
        note = f"seen in training: {vals.count(SEEN)} of {n} cases"
        if vals.count(SAME_CT):
            note += f", {vals.count(SAME_CT)} more from a training CT deformed otherwise"
        if vals.count(UNKNOWN):
            note += (f", {vals.count(UNKNOWN)} unknown (built before x2recon recorded CT checksums, in the "
                     "dataset or the model's training data)")
        return note

    def warning(self) -> str:
        """The loud line tables carry when the model does not fit the data (or could not be checked)."""
        w = ""
        if self.mismatches:
            w = ("WARNING: MODEL/DATA MISMATCH (--allow-mismatch): " + "; ".join(self.mismatches)
                 + " — these scores do not measure the model on data it was made for")
        elif self.unchecked:
            w = f"WARNING: {self.unchecked}"
        return "; ".join(x for x in (w, *(f"NOTE: {n}" for n in self.notes)) if x)

    def title(self) -> str:
        """What every table title adds: the warning (if any) and the seen-in-training note."""
        return "; ".join(x for x in (self.warning(), self.seen_note()) if x)


def check_fit(cfg: dict, root: str | Path, case_ids: list[str], *, allow_mismatch: bool = False) -> ModelFit:
    """Compare a checkpoint's ``cfg`` with the cases ``case_ids`` of dataset ``root`` (see module doc).

    A structure or geometry mismatch raises ``X2ReconInputError`` naming each difference (model value vs
    dataset value) unless ``allow_mismatch``; a SPIDER class with no structure in the data always raises
    (its Dice would be 0 and its HD95 the box diagonal whatever the model does)."""
    root = Path(root)
    metas = {cid: read_case_meta(root, cid) for cid in case_ids}
    fit = ModelFit(allowed=allow_mismatch)
    build = (cfg.get("dataset") or {}).get("build") or {}
    configs = [m.get("config") or {} for m in metas.values()]
    if not build:
        fit.unchecked = ("the model records no training dataset settings: its structures and geometry could not "
                         "be compared with the dataset's")
    else:
        if cfg.get("network") == "spider":
            _check_spider_classes(cfg, root, configs)
        else:
            ds = [c["structures"] for c in configs if "structures" in c]
            if "structures" in build and any(set(s) != set(build["structures"]) for s in ds):
                other = next(s for s in ds if set(s) != set(build["structures"]))
                fit.mismatches.append(f"structures: model {describe_structures(build['structures'])} vs dataset "
                                      f"{describe_structures(other)}")
        for key, label in GEOMETRY.items():
            vals = [c[key] for c in configs if key in c]
            if key in build and any(not _same(build[key], v) for v in vals):
                fit.mismatches.append(f"{label}: model {_value(key, build[key])} vs dataset {_dataset_values(key, vals)}")
        fit.notes += _outside_body_notes(build, configs)
    if fit.mismatches and not allow_mismatch:
        raise X2ReconInputError(root, "the model does not fit this dataset — " + "; ".join(fit.mismatches)
                                + ". Its scores here would not measure the model: evaluate on data built with the "
                                "model's settings (x2recon info shows them), or pass --allow-mismatch to score "
                                "anyway with a warning in the tables")
    fit.seen = _seen(cfg, metas)
    return fit


def _outside_body_notes(build: dict, configs: list[dict]) -> list[str]:
    """A note when the model trained with the couch and all outside the body kept and the data has it cleared
    to air, or the other way round (``build-dataset --keep-outside-body``; a record without the key = kept)."""
    text = {True: "kept (couch in the DRRs)", False: "cleared to air"}
    model = bool(build.get("keep_outside_body", True))
    data = [bool(c.get("keep_outside_body", True)) for c in configs]
    if all(v == model for v in data):
        return []
    return [f"outside the body: model trained on data with it {text[model]} vs dataset "
            f"{_dataset_values('keep_outside_body', [text[v] for v in data])}"]


def _check_spider_classes(cfg: dict, root: Path, configs: list[dict]) -> None:
    model = cfg.get("model") or {}
    members = model.get("members") or {}
    for conf in configs:
        have = set(conf.get("structures") or [])
        absent = [c for c in model.get("classes") or [] if not ({c, *members.get(c, [])} & have)]
        if absent:
            raise X2ReconInputError(root, f"the SPIDER model's class{'es' if len(absent) > 1 else ''} "
                                    f"{', '.join(absent)} {'have' if len(absent) > 1 else 'has'} no structure in this "
                                    f"dataset (built with {describe_structures(conf.get('structures'))}): its Dice "
                                    "would be 0 and its HD95 the box diagonal whatever the model predicts. Evaluate "
                                    "on a dataset built with the model's structures (x2recon info shows them)")


def _seen(cfg: dict, metas: dict[str, dict]) -> dict[str, str]:
    rec = (cfg.get("dataset") or {}).get("training_cases")
    if not isinstance(rec, dict) or not isinstance(rec.get("cases"), dict):
        return {cid: NOT_RECORDED for cid in metas}
    known = {v for v in rec["cases"].values() if v}
    cts = {k.split("/")[0] for k in known}
    gaps = any(not v for v in rec["cases"].values())
    out = {}
    for cid, meta in metas.items():
        key = case_identity(meta)
        if key is None:
            out[cid] = UNKNOWN
        elif key in known:
            out[cid] = SEEN
        elif key.split("/")[0] in cts:
            out[cid] = SAME_CT
        else:
            out[cid] = UNKNOWN if gaps else NOT_SEEN
    return out


# --------------------------------------------------------------------------- model vs one X-ray


def xray_differences(cfg: dict, geometry) -> list[str]:
    """How an X-ray's ``ProjectionGeometry`` differs from the model's training geometry, each difference with
    what it does to the reconstruction ([] when it fits, or when the model records no geometry).  SDD and SOD
    may differ by 1 % (radiograph-like DRRs move the camera a little)."""
    build = (cfg.get("dataset") or {}).get("build") or {}
    out = []
    mode = getattr(geometry, "isocenter_mode", "")
    if mode and build.get("isocenter") and mode != build["isocenter"]:
        out.append(f"isocentre: model {build['isocenter']} ({ISOCENTRE_MEANING.get(build['isocenter'], '?')}) vs "
                   f"X-ray {mode} ({ISOCENTRE_MEANING.get(mode, '?')}) — the box sits elsewhere on the body than "
                   "the model learned, so bones come out shifted or cut off")
    if isinstance(build.get("box_size"), (int, float)) and not math.isclose(geometry.box_size, build["box_size"],
                                                                           rel_tol=1e-3):
        out.append(f"box edge: model {build['box_size']:g} mm vs X-ray {geometry.box_size:g} mm — the network's "
                   f"box maps onto another size, so the mesh is scaled by {geometry.box_size / build['box_size']:.2f}")
    sod = float((geometry.isocenter - geometry.source) @ geometry.plane_normal)
    for key, value in (("sdd", geometry.sdd), ("sod", sod)):
        if isinstance(build.get(key), (int, float)) and not math.isclose(value, build[key], rel_tol=0.01):
            out.append(f"{key.upper()}: model {build[key]:g} mm vs X-ray {value:.0f} mm — another magnification "
                       "than the model learned, so bones come out at other sizes and depths")
    if build.get("beam") and geometry.kind != build["beam"]:
        out.append(f"beam: model {build['beam']} vs X-ray {geometry.kind} — another projection than the model "
                   "learned")
    return out
