"""``--structures skeleton``: all bone from HU, without table, contrast vessels or spinal canal (dataset/skeleton.py)."""

import numpy as np
import pytest

from x2recon.dataset.config import BuildConfig
from x2recon.dataset.segmentation import segment
from x2recon.dataset.skeleton import SKELETON_NAME, skeleton_from_ct
from x2recon.errors import X2ReconInputError
from x2recon.io.volume import Volume
from x2recon.structures import resolve_structures

SP = 1.5  # mm, isotropic


def disc(shape, cx, cy, r):
    """In-plane disc mask (rows = y, cols = x; mm about the grid centre)."""
    H, W = shape
    y, x = (np.mgrid[:H, :W] - np.array([H, W])[:, None, None] / 2) * SP
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def ellipse(shape, cx, cy, a, b):
    H, W = shape
    y, x = (np.mgrid[:H, :W] - np.array([H, W])[:, None, None] / 2) * SP
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1


def phantom(seed=0):
    """A supine chest: body, two lungs, a vertebral body (cortex + fatty marrow), a rib, a contrast-filled aorta,
    a dense contrast vein between the lungs and a table slab 10 mm behind the back.  Returns (CT, parts)."""
    Z, H, W = 60, 170, 170
    sl = (H, W)
    parts = {
        "body": ellipse(sl, 0, 0, 100, 70),
        "lungs": ellipse(sl, -45, -5, 32, 40) | ellipse(sl, 45, -5, 32, 40),
        "vertebra": disc(sl, 0, 48, 15),
        "marrow": disc(sl, 0, 48, 12.5),
        "rib": ellipse(sl, -82, 10, 6, 12) & ~ellipse(sl, -82, 10, 3.5, 9),
        "aorta": disc(sl, -12, 22, 12),
        "vein": disc(sl, 14, -12, 6),
        "table": ellipse(sl, 0, 88, 110, 6),
    }
    a = np.full(sl, -1000.0)
    a[parts["body"]] = 40
    a[parts["lungs"]] = -850
    a[parts["vertebra"]] = 700
    a[parts["marrow"]] = -40  # fatty marrow: below any bone threshold, must be filled
    a[parts["rib"]] = 900
    a[parts["aorta"]] = 380
    a[parts["vein"]] = 1600
    a[parts["table"]] = 800
    vol = np.repeat(a[None], Z, axis=0)
    vol += np.random.default_rng(seed).normal(0, 20, vol.shape)
    ct = Volume(vol.astype(np.int16), (SP, SP, SP), (0.0, 0.0, 0.0), np.eye(3))
    return ct, {k: np.repeat(v[None], Z, axis=0) for k, v in parts.items()}


@pytest.fixture(scope="module")
def synthetic():
    ct, parts = phantom()
    seg, names, source = skeleton_from_ct(ct)
    return ct, parts, seg > 0, names, source


def test_bone_is_kept_and_marrow_filled(synthetic):
    ct, parts, s, names, source = synthetic
    inner = slice(5, -5)  # away from the scan's first and last slices
    assert names == {1: SKELETON_NAME} and "skeleton from HU" in source
    assert s[inner][parts["vertebra"][inner]].mean() > 0.97  # cortex and the fatty marrow inside it
    assert s[inner][parts["marrow"][inner]].mean() > 0.97
    rib_wall = parts["rib"] & ~parts["lungs"]
    assert s[inner][rib_wall[inner]].mean() > 0.9


def test_table_outside_the_body_is_excluded(synthetic):
    ct, parts, s, *_ = synthetic
    assert not s[parts["table"]].any()
    assert not (s & ~parts["body"]).any()


def test_contrast_vessels_are_excluded(synthetic):
    """A homogeneous 380 HU aorta and a 1600 HU contrast vein in the mediastinum are not bone."""
    ct, parts, s, *_ = synthetic
    assert s[parts["aorta"]].mean() < 0.01
    assert s[parts["vein"]].mean() < 0.01


def test_a_plain_threshold_would_keep_them():
    """Control: the same phantom under the HU-threshold fallback keeps table and vessels (the rules matter)."""
    from x2recon.dataset.segmentation import threshold_bones

    ct, parts = phantom()
    s = threshold_bones(ct, 165.0)[0] > 0
    assert s[parts["table"]].mean() > 0.9 and s[parts["aorta"]].mean() > 0.9 and s[parts["vein"]].mean() > 0.9


def test_same_definition_with_or_without_labels():
    """A labelled CT gets the same skeleton as an unlabelled one: labels are not used."""
    ct, parts = phantom(seed=1)
    labels = ct.with_array(parts["vertebra"].astype(np.uint8) * 30)
    cfg = BuildConfig(structures="skeleton")
    with_labels, names, source = segment(ct, labels, cfg)
    without, names2, _ = segment(ct, None, cfg)
    assert names == names2 == {1: SKELETON_NAME}
    assert np.array_equal(with_labels.array, without.array)
    with pytest.raises(X2ReconInputError, match="skeleton is defined from HU"):
        segment(ct, labels, BuildConfig(structures="skeleton", segmentation="labels"))


def test_skeleton_stands_alone_and_an_empty_ct_is_named():
    assert resolve_structures("skeleton") == ["skeleton"]
    with pytest.raises(ValueError, match="on its own"):
        resolve_structures("skeleton,ribs")
    air = Volume(np.full((20, 40, 40), -1000, np.int16), (2.0, 2.0, 2.0), (0, 0, 0), np.eye(3), path="air.nii.gz")
    with pytest.raises(X2ReconInputError, match="no bone found"):
        segment(air, None, BuildConfig(structures="skeleton"))


@pytest.mark.slow
def test_dice_against_totalsegmentator_bones_on_chest_half(chest_half):
    """Measured 0.757 (bone classes without costal cartilages, 2×2-binned chest_lidc0001); margin 0.035."""
    from x2recon.io.volume import read_ct, read_labelmap

    ct_path, labels_path = chest_half
    ct = read_ct(ct_path)
    lab = read_labelmap(labels_path).array
    bone_ids = list(range(25, 51)) + list(range(69, 79)) + [91] + list(range(92, 117))
    truth = np.isin(lab, bone_ids)
    s = skeleton_from_ct(ct)[0] > 0
    dice = 2 * (s & truth).sum() / (s.sum() + truth.sum())
    assert dice >= 0.72, dice
    vessels = np.isin(lab, list(range(51, 69)))  # heart, aorta, veins (contrast CT)
    assert (s & vessels).sum() / vessels.sum() < 0.06
