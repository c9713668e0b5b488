"""Bone segmentation input: labelmaps, per-structure masks, TotalSegmentator, or an HU fallback;
``--structures skeleton`` is all bone from HU (``skeleton.py``) whatever labels exist.

Every source ends in the same form: ``seg`` on the CT grid with values ``1..K`` indexing
``names`` (TotalSegmentator names of the selected structures), 0 elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import X2ReconInputError
from ..io.volume import VOLUME_SUFFIXES, Volume, read_labelmap
from ..structures import LABEL_CONVENTIONS, SKELETON

#: Name of the single structure the HU-threshold fallback produces (not a TotalSegmentator class).
THRESHOLD_NAME = "bone_threshold"


def _strip_suffix(name: str) -> str:
    for s in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return name[: -len(s)]
    return name


def read_structure_masks(folder: Path, ct: Volume, wanted: list[str]) -> tuple[np.ndarray, dict[int, str]]:
    """A folder of per-structure binary masks named ``<totalseg_name>.nii.gz`` (TotalSegmentator's output)."""
    files = {_strip_suffix(p.name): p for p in folder.iterdir() if p.name.endswith(VOLUME_SUFFIXES)}
    if not files:
        raise X2ReconInputError(folder, "folder holds no mask volumes (expected <structure>.nii.gz files)")
    seg = np.zeros(ct.array.shape, np.uint8)
    names: dict[int, str] = {}
    for name in wanted:
        if name not in files:
            continue
        m = read_labelmap(files[name])
        if not m.same_grid(ct):
            raise X2ReconInputError(files[name], f"mask grid ({m.grid_text(ct)}) does not match the CT ({ct.grid_text(m)})")
        k = len(names) + 1
        seg[(m.array > 0) & (seg == 0)] = k
        names[k] = name
    return seg, names


def select_structures(labels: np.ndarray, id_to_name: dict[int, str], wanted: list[str]) -> tuple[np.ndarray, dict[int, str]]:
    """Relabel a multi-label map to ``1..K`` over the wanted structures that are present."""
    present = set(np.unique(labels).tolist()) - {0}
    name_to_src = {n: i for i, n in id_to_name.items() if i in present}
    lut = np.zeros(int(labels.max()) + 1, np.uint8 if len(wanted) < 255 else np.uint16)
    names: dict[int, str] = {}
    for name in wanted:
        if name in name_to_src:
            k = len(names) + 1
            lut[name_to_src[name]] = k
            names[k] = name
    return lut[labels], names


def threshold_bones(ct: Volume, threshold_hu: float = 150.0, min_volume_ml: float = 5.0) -> tuple[np.ndarray, dict[int, str]]:
    """The clearly labelled fallback: bone = HU above a threshold, small components removed.

    No anatomy is named: the result is one structure, ``bone_threshold``.  It also keeps
    contrast-filled vessels and the table if they exceed the threshold.
    """
    from scipy import ndimage

    mask = ct.array > threshold_hu
    lab, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(ct.array.shape, np.uint8), {}
    voxel_ml = float(np.prod(ct.spacing)) / 1000.0
    sizes = np.bincount(lab.ravel())[1:] * voxel_ml
    keep = np.flatnonzero(sizes >= min_volume_ml) + 1
    seg = np.isin(lab, keep).astype(np.uint8)
    return seg, ({1: THRESHOLD_NAME} if seg.any() else {})


def totalsegmentator_available() -> tuple[bool, str]:
    """(usable, reason): TotalSegmentator is importable and its weights are already on disk."""
    try:
        import totalsegmentator  # noqa: F401
    except ImportError:
        return False, "TotalSegmentator is not installed"
    home = Path(os.environ.get("TOTALSEG_HOME_DIR", Path.home() / ".totalsegmentator"))
    weights = os.environ.get("TOTALSEG_WEIGHTS_PATH") or home / "nnunet" / "results"
    weights = Path(weights)
    if not weights.is_dir() or not any(weights.glob("Dataset*")):
        return False, f"TotalSegmentator weights not found under {weights} (it would download them; X2Recon never does)"
    return True, str(weights)


def run_totalsegmentator(ct: Volume, wanted: list[str], device: str = "cpu") -> tuple[np.ndarray, dict[int, str]]:
    """Segment with TotalSegmentator's ``total`` task (only when it and its weights are present)."""
    ok, why = totalsegmentator_available()
    if not ok:
        raise X2ReconInputError(ct.path, why)
    import nibabel as nib
    from totalsegmentator.python_api import totalsegmentator

    from ..structures import totalseg_v2

    sitk_img = ct.to_sitk()
    # nibabel image in RAS from the LPS SimpleITK geometry
    aff = ct.affine.copy()
    aff[:2] *= -1
    nii = nib.Nifti1Image(np.transpose(ct.array, (2, 1, 0)).astype(np.int16), aff)
    out = totalsegmentator(nii, None, ml=True, roi_subset=wanted, device="gpu" if device == "cuda" else device, quiet=True)
    labels = np.transpose(np.asarray(out.dataobj), (2, 1, 0)).astype(np.uint16)
    del sitk_img
    return select_structures(labels, totalseg_v2(), wanted)


def segment(ct: Volume, labels, config) -> tuple[Volume, dict[int, str], str]:
    """Return ``(seg, names, source)`` for ``ct`` according to ``config.segmentation``.

    ``labels`` is ``None``, a labelmap path, a folder of per-structure masks, or a Volume.
    Fails with :class:`X2ReconInputError` naming the file and the problem when the labels are
    unreadable, empty, on another grid, or hold none of the requested structures.
    """
    mode = config.segmentation
    wanted = list(config.structures)
    if wanted == [SKELETON]:  # one HU definition for labelled and unlabelled CTs: labels are not used
        if mode not in ("auto", "threshold"):
            raise X2ReconInputError(ct.path, f"--structures skeleton is defined from HU; --segmentation {mode} "
                                             "does not apply (use auto)")
        from .skeleton import skeleton_from_ct

        seg_arr, names, source = skeleton_from_ct(ct)
        if not names:
            raise X2ReconInputError(ct.path, "no bone found (no voxel passes the skeleton rules; is this a CT in HU?)")
        return ct.with_array(seg_arr), names, source
    if mode == "auto":
        if labels is not None:
            mode = "labels"
        elif totalsegmentator_available()[0]:
            mode = "totalsegmentator"
        else:
            raise X2ReconInputError(
                ct.path,
                "no labelmap given and " + totalsegmentator_available()[1]
                + "; pass --labels, or choose --segmentation threshold (HU fallback, unnamed bone)",
            )
    if mode == "labels":
        if labels is None:
            raise X2ReconInputError(ct.path, "--segmentation labels needs a labelmap (--labels)")
        src_path = None if isinstance(labels, Volume) else Path(labels)
        if src_path is not None and src_path.is_dir():
            seg_arr, names = read_structure_masks(src_path, ct, wanted)
            source = f"masks:{src_path}"
        else:
            lab = labels if isinstance(labels, Volume) else read_labelmap(src_path)
            where = lab.path or src_path
            if not lab.same_grid(ct):
                raise X2ReconInputError(where, f"labelmap grid ({lab.grid_text(ct)}) does not match the CT ({ct.grid_text(lab)})")
            if not lab.array.any():
                raise X2ReconInputError(where, "labelmap is empty (all zero)")
            conv = getattr(config, "label_convention", "totalseg")
            seg_arr, names = select_structures(lab.array, LABEL_CONVENTIONS[conv](), wanted)
            source = f"labelmap:{where} ({conv})"
        origin = src_path or ct.path
    elif mode == "totalsegmentator":
        seg_arr, names = run_totalsegmentator(ct, wanted, device=config.device if config.device != "auto" else "cpu")
        source, origin = "totalsegmentator", ct.path
    elif mode == "threshold":
        seg_arr, names = threshold_bones(ct, config.threshold_hu)
        source, origin = f"threshold (fallback: HU > {config.threshold_hu:g}, connected components; no anatomy named)", ct.path
    else:
        raise ValueError(f"unknown segmentation mode {mode!r}")
    if not names:
        shown = ", ".join(wanted[:6]) + (", …" if len(wanted) > 6 else "")
        raise X2ReconInputError(origin, f"none of the requested structures is present ({shown})")
    return ct.with_array(seg_arr), names, source
