"""Many cases: input discovery, variants, sharding, worker pools or Dask, manifest and splits.

Each finished case writes ``status/<case_id>.json`` atomically; ``manifest.json`` is the
aggregate of those records, so shards on many machines (``--shard K/N``) write into one dataset
folder without clobbering each other, and ``x2recon manifest DATASET`` re-aggregates at any time.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..errors import CancelledError, X2ReconInputError
from ..io.atomic import atomic_write_text
from ..io.volume import VOLUME_SUFFIXES
from .case import CaseInput, CaseResult, build_case, read_meta, safe_case_id, sha256_file, verify_files, versions
from .config import BuildConfig
from .lock import dataset_lock

MANIFEST_FORMAT = "x2recon.manifest/1"
CT_NAMES = tuple(f"ct{s}" for s in VOLUME_SUFFIXES)
LABEL_NAMES = {f"labels{s}": None for s in VOLUME_SUFFIXES} | {f"labels_verse{s}": "verse" for s in VOLUME_SUFFIXES}


@dataclass
class Summary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # the manifest's (e.g. unreadable status records)

    def text(self) -> str:
        lines = [
            f"{len(self.done)} built, {len(self.skipped)} already complete, {len(self.failed)} failed "
            f"({self.seconds:.1f} s)"
        ]
        for cid, why in self.failed:
            lines.append(f"  FAILED {cid}: {why}")
        lines += [f"  WARNING {p}" for p in self.problems]
        return "\n".join(lines)


def _is_volume(p: Path) -> bool:
    return p.is_file() and p.name.endswith(VOLUME_SUFFIXES)


def _norm(p: Path) -> Path:
    """Absolute path with ``.``/``..`` removed lexically (names only; symlinks are not followed)."""
    return Path(os.path.normpath(os.path.abspath(p)))


def _anchor(ct: Path) -> tuple[Path, str]:
    """The path whose name is the case id (``<folder>/ct.nii.gz`` → the folder) and that name."""
    n = _norm(ct)
    if n.name in CT_NAMES:
        return n.parent, n.parent.name
    if ct.is_dir():
        return n, n.name
    cid = n.name
    for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if cid.endswith(s):
            return n, cid[: -len(s)]
    return n, cid


def _case_from_ct(ct: Path, labels: Path | None = None) -> CaseInput:
    """A case id from the file (``<folder>/ct.nii.gz`` → folder name) and labels found beside it."""
    cid = safe_case_id(_anchor(ct)[1])
    conv = None
    if labels is None and ct.is_file() and ct.name in CT_NAMES:
        for name, c in LABEL_NAMES.items():
            if (ct.parent / name).exists():
                labels, conv = ct.parent / name, c
                break
        if labels is None and (ct.parent / "segmentations").is_dir():
            labels = ct.parent / "segmentations"
    elif labels is not None and "verse" in labels.name:
        conv = "verse"
    return CaseInput(cid, str(ct), None if labels is None else str(labels), conv)


def unique_ids(cases: list[CaseInput]) -> None:
    """Make case ids unique, deterministically: a CT whose id another CT also derives is named
    by as many of its parent folders as it takes (``siteA/x/ct.nii.gz``, ``siteB/x/ct.nii.gz`` →
    ``siteA_x``, ``siteB_x``).  The same CT given twice is refused."""
    seen: dict[Path, str] = {}
    for c in cases:
        key = _norm(Path(c.ct))
        if key in seen:
            raise X2ReconInputError(c.ct, "CT given twice (also as " + seen[key] + "); give each CT once")
        seen[key] = c.ct
    groups: dict[str, list[CaseInput]] = {}
    for c in cases:
        groups.setdefault(c.case_id, []).append(c)
    for cid, group in groups.items():
        if len(group) < 2:
            continue
        anchors = [_anchor(Path(c.ct))[0] for c in group]
        for depth in range(1, max(len(a.parts) for a in anchors)):
            names = [safe_case_id("_".join(a.parts[-1 - depth : -1] + (cid,))) for a in anchors]
            if len(set(names)) == len(names):
                break
        else:  # e.g. x.nii.gz and x.nii beside each other
            raise X2ReconInputError(group[1].ct, f"derives the same case id {cid!r} as {group[0].ct}; "
                                    "rename one, or put each CT in its own folder")
        for c, n in zip(group, names):
            c.case_id = n
    from collections import Counter

    clash = sorted(i for i, n in Counter(c.case_id for c in cases).items() if n > 1)  # list.count: O(n²)
    if clash:  # a disambiguated name equals another CT's own id
        raise X2ReconInputError(None, f"case ids {clash} are derived from more than one CT; rename the CT files "
                                "or folders so that each gives its own id")


def discover(cts: Iterable[str | Path], labels: Iterable[str | Path] | None = None) -> list[CaseInput]:
    """Turn ``--ct`` arguments (files, folders, ``.txt`` lists) into case inputs.

    A folder holding ``ct.nii.gz`` (or a DICOM series) is one case; a folder of CT files or of
    case folders gives one case each.  A list file has one CT per line, optionally followed by a
    tab and its labelmap.  ``labels``, if given, pairs one-to-one with the CTs found.
    """
    found: list[tuple[Path, Path | None]] = []
    for item in cts:
        p = Path(item)
        if not p.exists():
            raise X2ReconInputError(p, "CT input not found")
        if not (p.is_file() or p.is_dir()) or (p.is_file() and not stat.S_ISREG(p.stat().st_mode)):
            raise X2ReconInputError(p, "not a regular file or folder (a device, FIFO or socket); "
                                    "give CT files, folders or .txt lists")
        if p.is_file() and p.suffix == ".txt":
            from ..io.documents import read_text

            listed = []
            for line in read_text(p, "CT list").splitlines():  # UTF-8, BOM dropped; Latin-1 is an error
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split("\t")
                ctp = Path(parts[0].strip())
                ctp = ctp if ctp.is_absolute() else _norm(p.parent / ctp)
                lp = None
                if len(parts) > 1 and parts[1].strip():
                    lp = Path(parts[1].strip())
                    lp = lp if lp.is_absolute() else (p.parent / lp).resolve()
                listed.append((ctp, lp))
            _refuse_missing(p, [q for c, lab in listed for q in (c, lab) if q is not None])
            found += listed
        elif p.is_file():
            found.append((p, None))
        elif p.is_dir():
            direct = [p / n for n in CT_NAMES if (p / n).exists()]
            if direct:
                found.append((direct[0], None))
                continue
            subs = sorted(q for q in p.iterdir() if q.is_dir())
            files = sorted(q for q in p.iterdir() if _is_volume(q) and not q.name.startswith("labels"))
            case_dirs = [next((q / n for n in CT_NAMES if (q / n).exists()), None) for q in subs]
            case_dirs = [c for c in case_dirs if c is not None]
            if case_dirs or files:
                found += [(c, None) for c in case_dirs] + [(f, None) for f in files]
            elif any(q.suffix.lower() in (".dcm", "") for q in p.iterdir() if q.is_file()):
                found.append((p, None))  # a DICOM series folder
            else:
                raise X2ReconInputError(p, "folder holds no CT (ct.nii.gz, case folders, CT files or a DICOM series)")
    labels = list(labels or [])
    _refuse_missing("--labels", [Path(q) for q in labels])
    if labels and len(labels) != len(found):
        raise X2ReconInputError(None, f"{len(labels)} labelmaps given for {len(found)} CTs: give one per CT, in order")
    cases = [_case_from_ct(c, Path(lab) if labels else lp) for (c, lp), lab in zip(found, labels or [None] * len(found))]
    unique_ids(cases)
    return cases


def _refuse_missing(where, paths: list[Path], shown: int = 5) -> None:
    """All of ``paths`` exist, checked before any case starts (a list of 100 000 missing CTs ran for an
    hour, one failed case each); else an ``X2ReconInputError`` naming ``where`` (the list file or the
    option), the first ``shown`` missing paths and how many there are."""
    missing = [q for q in paths if not q.exists()]
    if missing:
        more = f" … ({len(missing):,} of {len(paths):,} listed paths are missing)" if len(missing) > shown else ""
        raise X2ReconInputError(where, f"{'input' if len(missing) == 1 else 'inputs'} not found: "
                                + ", ".join(str(q) for q in missing[:shown]) + more + "; nothing was built")


def expand_variants(cases: list[CaseInput], n: int) -> list[CaseInput]:
    out = []
    for c in cases:
        out.append(c)
        for v in range(1, n + 1):
            out.append(CaseInput(f"{c.case_id}_v{v:02d}", c.ct, c.labels, c.label_convention, v))
    return out


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"K/N"`` (1-based) → (K, N)."""
    if not spec:
        return None
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like K/N (e.g. 2/8), got {spec!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard K/N needs 1 ≤ K ≤ N, got {spec!r}")
    return k, n


def select_shard(cases: list[CaseInput], shard: tuple[int, int] | None) -> list[CaseInput]:
    if shard is None:
        return cases
    k, n = shard
    ordered = sorted(cases, key=lambda c: c.case_id)
    return [c for i, c in enumerate(ordered) if i % n == k - 1]


# --------------------------------------------------------------------------- running


def _run_one(inp: CaseInput, out: str, config_dict: dict, threads: int) -> CaseResult:
    """Worker entry point (pickled by process pools and Dask): ``threads`` torch threads for the case, and
    the worker's own setting back afterwards (a Dask worker may run tasks as threads of a shared process)."""
    from ..nn.device import torch_threads

    with torch_threads(threads):
        res = build_case(inp, Path(out) / "cases", config=BuildConfig.from_dict(config_dict))
    _write_status(Path(out), inp, res)
    return res


def _write_status(out: Path, inp: CaseInput, res: CaseResult) -> None:
    rec = {
        "case_id": res.case_id,
        "base_id": inp.base_id,
        "variant": inp.variant,
        "ct": inp.ct,
        "labels": inp.labels,
        "status": "done" if res.status in ("done", "skipped") else "failed",
        "reason": res.reason,
        "seconds": round(res.seconds, 2),
        "meta_sha256": None,
    }
    meta = res.case_dir / "meta.json"
    if rec["status"] == "done" and meta.exists():
        rec["meta_sha256"] = sha256_file(meta)
        rec["files"] = len(res.meta.get("files", {}))
    try:
        atomic_write_text(out / "status" / f"{res.case_id}.json", json.dumps(rec, indent=1))
    except OSError as e:
        raise X2ReconInputError(out / "status", f"cannot write the case's status ({e.strerror}); fix it and "
                                "run the same command again to resume") from None


def build_dataset(
    inputs: list[CaseInput],
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    workers: int = 1,
    shard: tuple[int, int] | str | None = None,
    dask: str | None = None,
    progress: bool = True,
    cancel: Callable[[], bool] | None = None,
    on_case: Callable[[CaseResult, int, int], None] | None = None,
    wait: bool = False,
    split_by: str | None = None,
) -> Summary:
    """Build every case (after variants and sharding) into ``out``; resumable and idempotent.

    Holds the dataset's writer lock (:mod:`.lock`) throughout: a second writer refuses at once,
    or with ``wait`` waits for the first.  ``split_by``: how the manifest splits the cases
    (:data:`SPLIT_POLICIES`; None keeps the dataset's recorded policy, else ``auto``).
    """
    config = config or BuildConfig()
    out = prepare_out(out)
    if isinstance(shard, str):
        shard = parse_shard(shard)
    cases = select_shard(expand_variants(inputs, config.variants), shard)
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        clash = sorted({i for i in ids if ids.count(i) > 1})
        raise X2ReconInputError(None, f"case ids {clash} occur more than once (a CT's id equals another's "
                                "variant id?); rename the CT files or folders")
    check_split_by(split_by)
    with dataset_lock(out, shard=shard, wait=wait):
        return _build_locked(cases, out, config, workers, dask, progress, cancel, on_case, split_by)


def prepare_out(out: str | Path) -> Path:
    """The dataset folder, created if needed; a clear error when it is a file or not writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise X2ReconInputError(out, "--out exists and is not a folder")
    try:
        (out / "cases").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out / "cases"):  # the one test that also holds for root
            pass
    except OSError as e:
        raise X2ReconInputError(out, f"cannot write the dataset folder ({e.strerror})") from None
    return out


def _build_locked(cases, out: Path, config, workers, dask, progress, cancel, on_case, split_by=None) -> Summary:
    from tqdm.auto import tqdm

    summary = Summary()
    t0 = time.time()
    bar = tqdm(total=len(cases), desc="cases", unit="case", disable=not progress, position=0)
    finished = [0]

    def record(inp: CaseInput, res: CaseResult):
        finished[0] += 1
        {"done": summary.done, "skipped": summary.skipped}.get(res.status, []).append(res.case_id)
        if res.status == "failed":
            summary.failed.append((res.case_id, res.reason or "unknown"))
            if progress:
                bar.write(f"FAILED {res.case_id}: {res.reason}")
        bar.set_postfix_str(f"{res.case_id} {res.status}")
        bar.update(1)
        if on_case:
            on_case(res, finished[0], len(cases))

    ok = False
    try:
        if dask:
            _run_dask(cases, out, config, dask, record)
        elif workers > 1:
            _run_pool(cases, out, config, workers, record, cancel)
        else:
            _run_serial(cases, out, config, record, progress, cancel)
        ok = True
    finally:
        bar.close()
        summary.seconds = time.time() - t0
        try:
            summary.problems = write_manifest(out, config, split_by=split_by, _locked=True)["problems"]
        except OSError as e:
            if ok:  # after a failure, that failure is the one to report
                raise X2ReconInputError(out, f"cannot write the manifest ({e.strerror}); run "
                                        "'x2recon manifest' once fixed") from None
    return summary


def _run_serial(cases, out: Path, config, record, progress, cancel) -> None:
    from tqdm.auto import tqdm

    for inp in cases:
        if cancel and cancel():
            raise CancelledError("cancelled")
        case_bar = tqdm(total=100, desc=inp.case_id, leave=False, disable=not progress, position=1,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

        def prog(f, msg, _b=case_bar):
            _b.n = int(100 * f)
            _b.set_postfix_str(msg)
            _b.refresh()

        res = build_case(inp, out / "cases", config=config, progress=prog, cancel=cancel)
        case_bar.close()
        _write_status(out, inp, res)
        record(inp, res)


def _die_with_parent(parent: int) -> None:
    """Pool-worker initializer: the kernel kills this worker when its parent dies (Linux
    ``PR_SET_PDEATHSIG``), so a killed build leaves no orphan writing into the dataset; where
    prctl is missing, a thread polls the parent instead."""
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _run_pool(cases, out, config, workers, record, cancel):
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as ex:
        pending = {ex.submit(_run_one, c, str(out), config.to_dict(), threads): c for c in cases}
        try:
            while pending:
                done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in done:
                    record(pending.pop(f), f.result())
                if cancel and cancel():
                    raise CancelledError("cancelled")
        except BaseException:
            for f in pending:
                f.cancel()
            ex.shutdown(wait=False, cancel_futures=True)
            raise


def _run_dask(cases, out, config, address, record):
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise X2ReconInputError(None, "--dask needs the 'distributed' package (pip install 'x2recon[dask]')") from None
    client = Client(address)
    try:
        futs = {client.submit(_run_one, c, str(out), config.to_dict(), 1, pure=False): c for c in cases}
        for f in as_completed(futs):
            record(futs[f], f.result())
    finally:
        client.close()


# --------------------------------------------------------------------------- manifest


def write_manifest(out: str | Path, config: BuildConfig | None = None, *, wait: bool = False,
                   split_by: str | None = None, _locked: bool = False) -> dict:
    """Aggregate ``status/*.json`` into ``manifest.json``, ``splits/`` and the YOLO ``dataset.yaml``.

    ``split_by`` (:data:`SPLIT_POLICIES`) is recorded in the manifest; None keeps the recorded one
    (``auto`` for a dataset without one), so re-aggregating after shards keeps a build's choice.

    Refuses a missing folder or one that is not a dataset (creates nothing then).  A dataset
    without ``status/`` (e.g. copied without it) gets its status records rebuilt from the cases'
    ``meta.json``; an unreadable status record is reported in ``manifest["problems"]`` and skipped.
    Takes the dataset's writer lock unless the caller (a build) holds it.
    """
    out = Path(out)
    if not out.is_dir():
        raise X2ReconInputError(out, "dataset folder not found" if not out.exists() else "not a folder")
    if not any((out / n).exists() for n in ("status", "cases", "manifest.json")):
        raise X2ReconInputError(out, "not an x2recon dataset (no status/, cases/ or manifest.json)")
    if not _locked:
        with dataset_lock(out, wait=wait, what="manifest"):
            return write_manifest(out, config, split_by=split_by, _locked=True)
    check_split_by(split_by)
    if split_by is None:
        split_by = _recorded_split_by(out)
    problems: list[str] = []
    if not (out / "status").is_dir() and (out / "cases").is_dir() and any((out / "cases").iterdir()):
        problems += _status_from_cases(out)
    recs = []
    for p in sorted((out / "status").glob("*.json")):
        rec, why = _read_status(p)
        if rec is None:
            problems.append(f"{p}: {why}; skipped (rebuild that case or delete the file)")
            continue
        # a status says done only while its case folder is complete and intact
        if rec["status"] == "done":
            meta = read_meta(out / "cases" / rec["case_id"])
            bad = "meta.json missing or unreadable" if meta is None else verify_files(out / "cases" / rec["case_id"], meta.get("files"))
            if bad:
                rec["status"], rec["reason"] = "failed", f"case folder incomplete: {bad}"
        recs.append(rec)
    done = [r for r in recs if r["status"] == "done"]
    try:
        splits = make_splits(done, by=split_by)
    except ValueError as e:
        raise X2ReconInputError(out, f"--split-by {split_by}: {e}") from None
    for name, ids in splits.items():
        atomic_write_text(out / "splits" / f"{name}.txt", "".join(f"{i}\n" for i in ids))
    classes, views = None, None
    if done:
        meta = json.loads((out / "cases" / done[0]["case_id"] / "meta.json").read_text())
        classes, views = meta["classes"], meta["views"]
        from ..drr.boxes import write_dataset_yaml

        lists = {}
        for name, ids in splits.items():
            imgs = [str((out / "cases" / i / "images" / f"{v}.png").resolve()) for i in ids for v in views]
            atomic_write_text(out / "splits" / f"yolo_{name}.txt", "".join(f"{x}\n" for x in imgs))
            lists[name] = f"splits/yolo_{name}.txt"
        write_dataset_yaml(out / "dataset.yaml", classes, lists["train"], lists["val"] if splits["val"] else lists["train"], out.resolve())
    manifest = {
        "format": MANIFEST_FORMAT,
        "cases": recs,
        "problems": problems,
        "counts": {s: sum(r["status"] == s for r in recs) for s in ("done", "failed")},
        "splits": {k: len(v) for k, v in splits.items()},
        "split_by": split_by,
        "classes": classes,
        "views": views,
        "config": None if config is None else config.to_dict(),
        "versions": versions(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


_STATUS_KEYS = {"case_id": str, "base_id": str, "variant": int, "status": str}


def _read_status(p: Path) -> tuple[dict | None, str]:
    """A status record, or (None, what is wrong with it)."""
    try:
        rec = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable status record ({type(e).__name__})"
    if not isinstance(rec, dict):
        return None, "status record is not a JSON object"
    for key, typ in _STATUS_KEYS.items():
        if not isinstance(rec.get(key), typ):
            return None, f"status record lacks {key!r}"
    if rec["case_id"] != safe_case_id(rec["case_id"]) or rec["status"] not in ("done", "failed"):
        return None, "status record has an invalid case_id or status"
    return rec, ""


def _status_from_cases(out: Path) -> list[str]:
    """Rebuild ``status/`` from the finished case folders' meta.json (a dataset copied without it)."""
    problems = []
    for case in sorted(p for p in (out / "cases").glob("*") if p.is_dir() and not p.name.endswith(".partial")):
        meta = read_meta(case)
        if meta is None or meta.get("case_id") != case.name:
            problems.append(f"{case}: no readable meta.json; not in the manifest")
            continue
        bad = verify_files(case, meta.get("files"))
        rec = {"case_id": case.name, "base_id": meta.get("base_id", case.name), "variant": int(meta.get("variant", 0)),
               "ct": meta.get("inputs", {}).get("ct"), "labels": meta.get("inputs", {}).get("labels"),
               "status": "failed" if bad else "done", "reason": bad, "seconds": None,
               "meta_sha256": sha256_file(case / "meta.json"), "files": len(meta.get("files") or {}),
               "rebuilt_from": "meta.json"}
        atomic_write_text(out / "status" / f"{case.name}.json", json.dumps(rec, indent=1))
    problems.append(f"{out / 'status'} was missing: rebuilt from the case folders' meta.json")
    return problems


#: How ``make_splits`` divides a dataset: ``auto`` — by patient with ≥ 3 CTs, else by variant;
#: ``patient`` — whole CTs (with their variants) per split; ``variant`` — every CT's original scan
#: trains, the highest-numbered variants validate, no test split (all patients train: a leave-one-patient-out
#: fold, whose held-out patient is a dataset of its own).
SPLIT_POLICIES = ("auto", "patient", "variant")


def check_split_by(split_by: str | None) -> None:
    if split_by is not None and split_by not in SPLIT_POLICIES:
        raise ValueError(f"split_by must be one of {SPLIT_POLICIES}, got {split_by!r}")


def _recorded_split_by(out: Path) -> str:
    """The split policy recorded in ``out``'s manifest (``auto`` when there is none or it is unreadable)."""
    try:
        rec = json.loads((out / "manifest.json").read_text()).get("split_by", "auto")
    except (OSError, ValueError, AttributeError):
        return "auto"
    return rec if rec in SPLIT_POLICIES else "auto"


def make_splits(done: list[dict], val_fraction: float = 0.1, test_fraction: float = 0.1,
                by: str = "auto") -> dict[str, list[str]]:
    """Train/val/test case ids (``by``: :data:`SPLIT_POLICIES`).

    ``auto``: with ≥ 3 CTs whole CTs (all their variants) go to one split, so the splits never share
    a CT; with fewer, the split is by variant: the original scans train, the highest-numbered variants
    validate and test — the paper's single-scan situation, where variants are the only unseen anatomy.
    ``patient`` needs ≥ 3 CTs; ``variant`` splits by variant however many CTs there are, with an empty test
    split (the test is another patient's dataset).
    """
    check_split_by(by)
    bases = sorted({r["base_id"] for r in done})
    ids_of = {b: sorted(r["case_id"] for r in done if r["base_id"] == b) for b in bases}
    if by == "patient" and done and len(bases) < 3:
        raise ValueError(f"splitting by patient needs at least 3 CTs (train, val, test), the dataset has {len(bases)}")
    if len(bases) >= 3 and by != "variant":
        n_test = max(1, round(len(bases) * test_fraction))
        n_val = max(1, round(len(bases) * val_fraction))
        test_b, val_b, train_b = bases[-n_test:], bases[-n_test - n_val : -n_test], bases[: -n_test - n_val]
        pick = lambda bs: [i for b in bs for i in ids_of[b]]
        return {"train": pick(train_b), "val": pick(val_b), "test": pick(test_b)}
    variants = sorted((r for r in done if r["variant"] > 0), key=lambda r: (r["variant"], r["case_id"]))
    originals = [r["case_id"] for r in done if r["variant"] == 0]
    n_hold = len(variants)
    n_test = max(1, round(n_hold * test_fraction)) if n_hold >= 3 else (1 if n_hold >= 2 else 0)
    n_val = max(1, round(n_hold * val_fraction)) if n_hold >= 3 else (1 if n_hold >= 1 else 0)
    if by == "variant":  # the test is another dataset (a held-out patient): no variant is spent on a test split
        n_test = 0
    test = [r["case_id"] for r in variants[len(variants) - n_test :]] if n_test else []
    val = [r["case_id"] for r in variants[len(variants) - n_test - n_val : len(variants) - n_test]] if n_val else []
    train = originals + [r["case_id"] for r in variants[: len(variants) - n_test - n_val]]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
