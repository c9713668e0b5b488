"""The bundled assets (issue 13 §4), trained by ``cross_patient.py --bundle DIR`` after its folds.

Every asset is trained on *all* the study's patients with the recipe the folds measured, so the
held-out figures on its card are those of the same recipe trained without the scored patient:

* ``x2b_skeleton.safetensors`` — X2B, ``--structures skeleton``, the X2B recipe (paper's or ours)
  with the better mean held-out IoU (paper protocol), trained on every patient's training cases
  (the folds' training datasets merged: each patient's cases were built once, by a fold that did not
  hold it out);
* ``spider_skeleton.safetensors`` — SPIDER on the same data;
* ``detector.safetensors`` and ``templates/`` — the X2BR detector (YOLOv9t, the paper's group classes)
  and template library, from the patients that carry labels (per-structure boxes and meshes need
  them; a skeleton has neither).  Their test split is the labelled patients' held-out *variants*, not
  an unseen patient: the card says so.

``cards.json`` gets one card per asset (training patients, structures, geometry, recipe, the command,
held-out figures with protocol and case counts, time, machine); an existing card of another asset
(the demo model's) is kept.

The bundled files carry no folder of the machine that built them: ``make_portable`` rewrites every path in
the cards, ``library.json`` and the ``.safetensors`` metadata relative to the study folder (or to its name),
the weights byte for byte unchanged.  ``python training/bundle.py portable DIR --study-root PATH`` does the
same to an existing bundle.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

from recipes import table_rows, train_args

from x2recon.io.atomic import atomic_write_text
from x2recon.io.documents import absolute_paths, without_machine_paths

#: Patients the bundled demo model (x2b_demo.safetensors) was trained on: deformed copies of chest_lidc0001.
DEMO_PATIENTS = {"chest_lidc0001", "chest_lidc0001_half"}
NOT_CLINICAL = "Research demo trained on very few patients on a CPU; not a clinical model."


def merge_datasets(sources: list[Path], out: Path) -> list[str]:
    """Hard-link every finished case of ``sources`` (first occurrence of an id wins) into ``out``."""
    ids = []
    for src in sources:
        for case in sorted((src / "cases").iterdir()):
            status = src / "status" / f"{case.name}.json"
            if case.name in ids or not status.is_file() or not (case / "meta.json").is_file():
                continue
            shutil.copytree(case, out / "cases" / case.name, copy_function=os.link, dirs_exist_ok=True)
            (out / "status").mkdir(parents=True, exist_ok=True)
            shutil.copy2(status, out / "status" / status.name)
            ids.append(case.name)
    return ids


def labelled(patients: list[Path]) -> list[Path]:
    """The patients whose folder holds per-structure labels (what a detector and templates need)."""
    return [p for p in patients if any((p / n).exists() for n in ("labels.nii.gz", "labels_verse.nii.gz", "segmentations"))]


def held_out(rows: list[dict], method: str) -> list[dict]:
    """The folds' rows of ``method``: per held-out patient and protocol, with case and patient counts."""
    return [{k: r[k] for k in ("held_out", "protocol", "n_train_patients", "n_test_cases", "metrics")}
            for r in rows if r["method"] == method]


def demo_rows(st, a, prof: dict) -> list[dict]:
    """The bundled demo model scored on every fold's test patient, as the folds' models are (so ``x2recon
    demo`` can use whichever does better on a patient it never saw; its card says which patients it saw)."""
    out = []
    for p in a.patients:
        csv_path = a.out / "all" / f"eval_demo_{p.name}.csv"
        st.step(f"all.eval_demo_{p.name}", ["evaluate", "--model", "demo", "--data", str(a.out / p.name / "test_data"),
                                            "--split", "all", "--out", str(csv_path), "--device", a.device, "--quiet",
                                            # the demo was trained on named bones centred on them, the test data is
                                            # all bone centred on the lungs: scored anyway, the tables say so
                                            "--allow-mismatch", *prof["eval"]])
        seen = p.name in DEMO_PATIENTS
        out += table_rows("x2b_demo", p.name + (" (seen in training)" if seen else ""), 1, csv_path)
    return out


def best_x2b(rows: list[dict]) -> str:
    """``x2b_paper`` or ``x2b_ours``: the higher mean held-out IoU in the paper's protocol."""
    def mean_iou(m):
        v = [r["metrics"].get("iou") for r in rows if r["method"] == m and r["protocol"] == "paper"]
        v = [x for x in v if x is not None]
        return sum(v) / len(v) if v else -1.0

    return max(("x2b_ours", "x2b_paper"), key=mean_iou)


def machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or platform.system()})"


def bundle_steps(st, a, prof: dict, rows: list[dict]) -> None:
    """Train, then write the assets and ``cards.json`` into ``a.bundle``."""
    root = a.out / "all"
    data = root / "train_data"
    if not st.record("all.merge").is_file():
        ids = merge_datasets([a.out / p.name / "train_data" for p in a.patients], data)
        atomic_write_text(st.record("all.merge"), json.dumps({"step": "all.merge", "cases": ids, "seconds": 0}))
    st.step("all.manifest", ["manifest", str(data)])
    rows += demo_rows(st, a, prof)
    recipe = best_x2b(rows)
    st.step("all.train_x2b", train_args(recipe, data, root / "runs" / "x2b", prof, a.device))
    st.step("all.train_spider", train_args("spider", data, root / "runs" / "spider", prof, a.device))
    lab = labelled(a.patients)
    if lab:
        lab_ds = root / "labelled_data"
        st.step("all.build_labelled", ["build-dataset", "--ct", *map(str, lab), "--out", str(lab_ds), "--quiet",
                                       "--isocenter", a.isocenter, "--xray-realism", a.train_realism,
                                       *prof.get("labelled", prof["build"])])
        st.step("all.train_detector", ["train", "detector", "--data", str(lab_ds), "--out", str(root / "runs" / "detector"),
                                       "--device", a.device, "--quiet", *prof["detector"]])
        st.step("all.templates", ["template", "build", "--data", str(lab_ds), "--out", str(root / "runs" / "templates"),
                                  "--reference", lab[0].name, "--split", "all", "--quiet"])
    else:
        print("no labelled patient: no detector and no template library are bundled", flush=True)
    install(a, prof, rows, recipe, lab)


def _seconds(record: Path) -> float | None:
    """Wall seconds of a recorded step (None if it did not run here)."""
    return json.loads(record.read_text())["seconds"] if record.is_file() else None


def _checkpoint_card(a, prof: dict, rec_dir: Path, step: str, method: str, rows: list[dict], what: str) -> dict:
    from x2recon.cli.info import read_info

    ckpt = a.out / "all" / "runs" / step / "best.safetensors"
    cfg = read_info(ckpt)
    manifest = json.loads((a.out / "all" / "train_data" / "manifest.json").read_text())
    build = (cfg.get("dataset") or {}).get("build") or {}
    command = json.loads((rec_dir / f"all.train_{step}.json").read_text())["command"]
    return {"what": what, "recipe": method, "command": " ".join(command),
            "trained_on": {"patients": [p.name for p in a.patients], "cases": len(manifest.get("cases", [])),
                           "variants_per_patient": _flag(prof["build"], "--variants"),
                           "xray_realism": a.train_realism},
            "structures": "skeleton: all bone from Hounsfield units (--structures skeleton)",
            "geometry": geometry_line(build),
            "held_out": {"protocol_note": "leave-one-patient-out: the same recipe trained without the scored patient; "
                                          "its undeformed scan's clean DRRs", "folds": held_out(rows, method)},
            "train_seconds": _seconds(rec_dir / f"all.train_{step}.json"),
            "stored": "float16 weights (loaded as float32)", "_src": str(ckpt), "_half": True}


def save_half(src: Path, target: Path) -> None:
    """A network checkpoint re-saved with float16 weights (half the package size; loads as float32)."""
    from x2recon.nn.checkpoint import load_model, read_config, save_checkpoint

    model, _ = load_model(src)
    config = {k: v for k, v in read_config(src).items() if k not in ("format", "versions")}
    save_checkpoint(target, model, config, half=True)


def _geometry_text(data: Path) -> str:
    """One line of a dataset's geometry (views, DRR size, distances, box) from its first case's meta.json."""
    manifest = json.loads((data / "manifest.json").read_text())
    meta = json.loads((data / "cases" / manifest["cases"][0]["case_id"] / "meta.json").read_text())
    return geometry_line(meta.get("config") or {})


def geometry_line(b: dict) -> str:
    """Views, DRR size, distances, box and isocentre of a build config, as one line."""
    keys = ("views", "drr_size", "sdd", "sod", "box_size", "isocenter", "xray_realism")
    return ", ".join(f"{k} {b[k]}" for k in keys if k in b) or "see the dataset's meta.json"


def _flag(args: list[str], name: str):
    return args[args.index(name) + 1] if name in args else None


def install(a, prof: dict, rows: list[dict], recipe: str, lab: list[Path]) -> None:
    """Copy the assets into ``a.bundle`` and merge their cards into its ``cards.json``."""
    rec = a.out / "steps"
    dest = a.bundle
    dest.mkdir(parents=True, exist_ok=True)
    common = {"not_clinical": True, "note": NOT_CLINICAL, "profile": a.profile, "measured_on": machine()}
    cards = {"skeleton": dict(_checkpoint_card(a, prof, rec, "x2b", recipe, rows, "X2B: one frontal X-ray → all-bone "
                                               "occupancy mesh (x2recon reconstruct --model skeleton)"),
                              file="x2b_skeleton.safetensors"),
             "spider": dict(_checkpoint_card(a, prof, rec, "spider", "spider", rows, "SPIDER: frontal + lateral X-rays → "
                                             "CT volume + skeleton labelmap (x2recon spider)"),
                            file="spider_skeleton.safetensors")}
    if lab:
        cards.update(_x2br_cards(a, rec, lab))
    for card in cards.values():
        src = Path(card.pop("_src"))
        target = dest / card["file"]
        if src.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(src, target)
        elif card.pop("_half", False):
            save_half(src, target)
        else:
            shutil.copyfile(src, target)  # the package's mode, not the run's (ultralytics writes 0600)
        card.update(common)
    path = dest / "cards.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    atomic_write_text(path, json.dumps({**old, **cards}, indent=1) + "\n")
    make_portable(dest, a.out)
    print(f"bundled assets and cards written to {dest}", flush=True)


def _portable_json_text(text: str, base: Path | None) -> str:
    """A JSON text (a metadata value or a file) without machine paths, in its own layout (indent, end)."""
    doc = json.loads(text)
    new = without_machine_paths(doc, base)
    if new == doc:
        return text
    indent = 1 if text.lstrip().startswith("{\n") else None
    out = json.dumps(new, indent=indent) if indent else json.dumps(new)
    return out + ("\n" if text.endswith("\n") else "")


def make_portable(dest: Path, base: Path | None) -> list[Path]:
    """Rewrite the records of every bundled file in ``dest`` (``*.json``, ``.safetensors`` metadata) so that
    no absolute path of this machine remains: inside ``base`` (the study folder) relative to it, elsewhere
    its name.  The weights stay byte for byte.  Returns the files changed; fails if a path is left."""
    from x2recon.nn.checkpoint import rewrite_metadata

    def metadata(meta: dict) -> dict:
        return {k: _portable_json_text(v, base) if v.lstrip().startswith(("{", "[")) else
                without_machine_paths(v, base) for k, v in meta.items()}

    changed, files = [], [f for f in sorted(Path(dest).rglob("*")) if f.suffix in (".json", ".safetensors")]
    for f in files:
        before = f.read_bytes()
        if f.suffix == ".json":
            atomic_write_text(f, _portable_json_text(before.decode("utf-8"), base))
        else:
            rewrite_metadata(f, metadata)
        if f.read_bytes() != before:
            changed.append(f)
    left = [f"{f}: {p}" for f in files for p in _paths_in(f)]
    if left:
        raise RuntimeError("machine paths left in the bundle: " + "; ".join(left))
    return changed


def _paths_in(f: Path) -> list[str]:
    """Absolute paths in a bundled file's records."""
    if f.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(f), "np") as h:
            meta = h.metadata() or {}
        return absolute_paths({k: json.loads(v) if v.lstrip().startswith(("{", "[")) else v for k, v in meta.items()})
    return absolute_paths(json.loads(f.read_text()))


def _x2br_cards(a, rec: Path, lab: list[Path]) -> dict:
    run = a.out / "all" / "runs"
    summary = json.loads((run / "detector" / "summary.json").read_text())
    lib = json.loads((run / "templates" / "library.json").read_text())
    names = [p.name for p in lab]
    geometry = _geometry_text(a.out / "all" / "labelled_data")
    detector = {"file": "detector.safetensors", "_src": str(run / "detector" / "detector.safetensors"),
                "what": "X2BR detector: YOLOv9t, the paper's groups (cervical, thoracic, lumbar, ribs) on the X-ray",
                "structures": "boxes of the builder's groups: cervical, thoracic, lumbar vertebrae, ribs",
                "geometry": geometry, "recipe": "YOLOv9t from its yaml (no pretrained weights), x2recon train detector",
                "trained_on": {"patients": names, "xray_realism": a.train_realism},
                "command": " ".join(json.loads((rec / "all.train_detector.json").read_text())["command"]),
                "held_out": {"protocol_note": "test split = deformed variants of the same labelled patient(s); no "
                                              "unseen labelled patient exists in the shared data",
                             **{k: summary[k] for k in summary if k.lower().startswith(("map", "metrics", "split", "test"))}},
                "train_seconds": _seconds(rec / "all.train_detector.json")}
    templates = {"file": "templates", "_src": str(run / "templates"),
                 "what": f"X2BR template library: {len(lib.get('structures', lib.get('templates', [])))} structures "
                         f"meshed from {names[0]}'s labels",
                 "structures": "every labelled rib and vertebra of the reference case", "geometry": geometry,
                 "recipe": "per structure the reference case's mesh (x2recon template build --reference)",
                 "trained_on": {"patients": names}, "command": " ".join(json.loads((rec / "all.templates.json").read_text())["command"]),
                 "held_out": "not learnt: meshes of one patient; X2BR's accuracy is the X2B model's and the registration's"}
    return {"detector": detector, "templates": templates}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Rewrite an existing bundle's records without this machine's folders.")
    p.add_argument("command", choices=["portable"])
    p.add_argument("dest", type=Path, help="the bundle folder, e.g. x2recon/resources/models")
    p.add_argument("--study-root", type=Path, default=None,
                   help="the study's --out: paths inside it become relative to it (others: their name)")
    a = p.parse_args(argv)
    for f in make_portable(a.dest, a.study_root):
        print(f"rewritten: {f}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
