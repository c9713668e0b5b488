"""Segmentation sources: multi-label maps, per-structure mask folders, TotalSegmentator availability."""

import numpy as np
import pytest

from x2recon.dataset.config import BuildConfig
from x2recon.dataset.segmentation import segment, totalsegmentator_available
from x2recon.errors import X2ReconInputError
from x2recon.io.volume import read_ct, read_labelmap, write_volume
from x2recon.structures import name_to_id, resolve_structures


def test_structure_groups_follow_the_paper_default():
    names = resolve_structures(None)
    assert len([n for n in names if n.startswith("rib_")]) == 24
    assert "vertebrae_C1" in names and "vertebrae_L5" in names and "costal_cartilages" in names
    assert not any(n.startswith("scapula") for n in names)
    with pytest.raises(ValueError, match="unknown structure"):
        resolve_structures("ribs,spine")


def test_mask_folder_equals_the_multilabel_map(tmp_path, chest_half):
    ct = read_ct(chest_half[0])
    lab = read_labelmap(chest_half[1])
    ids = name_to_id()
    wanted = ["vertebrae_T7", "rib_left_3", "rib_right_10"]
    for n in wanted:  # TotalSegmentator's per-structure output layout
        write_volume(lab.with_array((lab.array == ids[n]).astype(np.uint8)), tmp_path / f"{n}.nii.gz")
    cfg = BuildConfig(structures=wanted)
    seg_a, names_a, src_a = segment(ct, tmp_path, cfg)
    seg_b, names_b, _ = segment(ct, chest_half[1], cfg)
    assert names_a == names_b == {1: "vertebrae_T7", 2: "rib_left_3", 3: "rib_right_10"}
    assert np.array_equal(seg_a.array, seg_b.array) and src_a.startswith("masks:")
    for k, n in names_b.items():
        assert (seg_b.array == k).sum() == (lab.array == ids[n]).sum() > 0


def test_totalsegmentator_is_never_downloaded(chest_half, monkeypatch, tmp_path):
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    ok, why = totalsegmentator_available()
    assert not ok and ("not installed" in why or "weights not found" in why)
    with pytest.raises(X2ReconInputError, match="ct.nii.gz: no labelmap given and TotalSegmentator"):
        segment(read_ct(chest_half[0]), None, BuildConfig())
    with pytest.raises(X2ReconInputError, match="TotalSegmentator"):
        segment(read_ct(chest_half[0]), None, BuildConfig(segmentation="totalsegmentator"))
