"""Box labels from geometry, SPIDER box-grid targets, and seeded anatomical deformations."""

import numpy as np
import pytest

from x2recon.dataset.augment import Deformation, random_deformation
from x2recon.dataset.config import BuildConfig
from x2recon.dataset.segmentation import segment
from x2recon.dataset.spider_targets import box_grid, resample_to_box
from x2recon.drr.boxes import class_names, class_of, read_yolo_labels, structure_boxes, write_dataset_yaml, write_yolo_labels
from x2recon.errors import X2ReconInputError
from x2recon.geometry import ProjectionGeometry
from x2recon.io.volume import Volume, read_ct, read_labelmap


@pytest.fixture(scope="module")
def chest_seg(chest_half):
    ct = read_ct(chest_half[0])
    seg, names, _ = segment(ct, chest_half[1], BuildConfig())
    return ct, seg, names


@pytest.mark.parametrize("view", ["AP", "LAT", 30.0])
def test_boxes_contain_every_projected_voxel_and_are_tight(chest_seg, view):
    ct, seg, names = chest_seg
    idx = np.argwhere(seg.array > 0)
    iso = seg.index_to_world((idx.min(0) + idx.max(0))[::-1] / 2)
    g = ProjectionGeometry.from_view(view, iso, size=(256, 256))
    boxes = structure_boxes(seg, names, g)
    assert len(boxes) == len(names)
    for b in boxes:
        kji = np.argwhere(seg.array == b.label)
        centres = g.project(seg.index_to_world(kji[:, ::-1]))
        assert (centres[:, 0] >= b.x0).all() and (centres[:, 0] <= b.x1).all(), b.name
        assert (centres[:, 1] >= b.y0).all() and (centres[:, 1] <= b.y1).all(), b.name
        # tight: every side is within one projected voxel (~2.5 mm ≈ 3.2 px) of a voxel centre
        slack = np.array([centres[:, 0].min() - b.x0, centres[:, 1].min() - b.y0,
                          b.x1 - centres[:, 0].max(), b.y1 - centres[:, 1].max()])
        assert slack.max() < 3.5, (b.name, slack)


def test_out_of_view_structures_get_no_box_and_yolo_round_trip(tmp_path, chest_seg):
    ct, seg, names = chest_seg
    idx = np.argwhere(seg.array > 0)
    top = seg.index_to_world(idx[idx[:, 0].argmax()][::-1])  # the most superior bone voxel
    g = ProjectionGeometry.from_view("AP", top + [0, 0, 40], size=(128, 128), detector_mm=120)
    boxes = structure_boxes(seg, names, g)
    assert 0 < len(boxes) < len(names)  # low ribs and lumbar vertebrae fall outside
    assert all(-0.5 <= b.x0 <= b.x1 <= 127.5 and -0.5 <= b.y0 <= b.y1 <= 127.5 for b in boxes)
    assert any(b.truncated for b in boxes)
    classes = class_names("groups", BuildConfig().structures)
    assert classes == ["cervical", "thoracic", "lumbar", "ribs"]
    assert class_of("vertebrae_T3", classes) == 1 and class_of("rib_left_2", classes) == 3
    assert class_of("costal_cartilages", classes) is None
    write_yolo_labels(boxes, classes, g, tmp_path / "AP.txt")
    rows = read_yolo_labels(tmp_path / "AP.txt")
    kept = [b for b in boxes if class_of(b.name, classes) is not None]
    assert len(rows) == len(kept)
    for r, b in zip(rows, kept):
        assert r[0] == class_of(b.name, classes)
        np.testing.assert_allclose(r[1:], [(b.x0 + b.x1 + 1) / 256, (b.y0 + b.y1 + 1) / 256, b.width / 128, b.height / 128], atol=1e-5)
    per = class_names("structures", ["vertebrae_T3", "rib_left_2"])
    assert class_of("rib_left_2", per) == 1
    write_dataset_yaml(tmp_path / "d.yaml", classes, "splits/t.txt", "splits/v.txt", tmp_path)
    text = (tmp_path / "d.yaml").read_text()
    assert 'train: "splits/t.txt"' in text and '3: "ribs"' in text
    (tmp_path / "bad.txt").write_text("1 0.5 0.5\n")
    with pytest.raises(X2ReconInputError, match="bad.txt: line 1: expected 5 numbers"):
        read_yolo_labels(tmp_path / "bad.txt")


def test_spider_grid_places_a_known_cube():
    # synthetic CT: −1000 HU with a +1000 HU cube at world [10, 30] × [−20, 0] × [40, 60] mm
    n = 64
    arr = np.full((n, n, n), -1000, np.int16)
    sp = 1.25
    origin = np.array([-20.0, -50.0, 10.0])
    ct = Volume(arr, (sp, sp, sp), origin, np.eye(3))
    w = ct.index_to_world(np.argwhere(np.ones((n, n, n), bool))[:, ::-1]).reshape(n, n, n, 3)
    cube = (w[..., 0] > 10) & (w[..., 0] < 30) & (w[..., 1] > -20) & (w[..., 1] < 0) & (w[..., 2] > 40) & (w[..., 2] < 60)
    ct.array[cube] = 1000
    seg = ct.with_array(cube.astype(np.uint8) * 7)
    iso, size, m = np.array([20.0, -10.0, 50.0]), 20.0, 16  # the box is exactly the cube
    ct_box, seg_box = resample_to_box(ct, seg, iso, size, m)
    # voxel i has its centre at iso − size/2 + (i + ½)·size/m
    g = ProjectionGeometry.from_view("AP", iso, box_size=size)
    centres = ct_box.index_to_world(np.argwhere(np.ones((m, m, m), bool))[:, ::-1])
    q = g.to_box(centres)
    np.testing.assert_allclose(q.min(0), [(0.5 / m) - 0.5] * 3)
    np.testing.assert_allclose(q.max(0), [0.5 - 0.5 / m] * 3)
    inner = np.all(np.abs(q) < 0.5 - 1.0 / m, axis=1).reshape(m, m, m)
    assert (ct_box.array[inner] > 900).all() and set(np.unique(seg_box.array[inner])) == {7}
    # the cube fills the box: labels identical to the full grid; shifted box sees air and background
    ct_off, seg_off = resample_to_box(ct, seg, iso + [40, 0, 0], size, m)
    assert (ct_off.array < -900).mean() > 0.9 and seg_off.array.max() == 0
    assert box_grid(iso, size, m).spacing.tolist() == [size / m] * 3


def test_spider_targets_keep_structure_volumes(chest_seg):
    ct, seg, names = chest_seg
    idx = np.argwhere(seg.array > 0)
    iso = seg.index_to_world((idx.min(0) + idx.max(0))[::-1] / 2)
    ct_box, seg_box = resample_to_box(ct, seg, iso, 384.0, 128)
    vox_src, vox_box = np.prod(seg.spacing), 3.0**3
    for k in (1, 30):
        v0 = (seg.array == k).sum() * vox_src
        v1 = (seg_box.array == k).sum() * vox_box
        assert abs(v1 / v0 - 1) < 0.2, names[k]  # nearest resampling at 3 mm of thin bones
    assert ct_box.array.dtype == np.int16 and ct_box.array.min() >= -1024


def test_deformation_is_seeded_bounded_and_keeps_labels_aligned(chest_seg):
    ct, seg, names = chest_seg
    d1, d1b, d2 = random_deformation(7, ct), random_deformation(7, ct), random_deformation(8, ct)
    a, b, c = (d.apply(seg, "labels").array for d in (d1, d1b, d2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    ct1 = d1.apply(ct, "ct")
    # aligned: bone HU inside the deformed labels stays what it was inside the original labels
    before = np.median(ct.array[seg.array > 0])
    after = np.median(ct1.array[a > 0])
    assert abs(after - before) < 0.05 * abs(before)
    assert set(np.unique(a)) == set(np.unique(seg.array))  # every structure survives
    # bounded: rotation 5° at ≤ 250 mm + scale 6 % + shear 3 % + 5 mm + elastic 8 mm
    pts = ct.corners_world().mean(0) + np.random.default_rng(0).uniform(-100, 100, (300, 3))
    disp = np.linalg.norm(d1.displacement_at(pts), axis=1)
    assert 1.0 < disp.max() < 45.0
    # reproducible from meta.json
    again = Deformation.from_dict(d1.to_dict()).apply(seg, "labels").array
    assert np.array_equal(again, a)


def test_cube_label_follows_the_ct_under_deformation():
    n = 48
    arr = np.full((n, n, n), -1000, np.int16)
    arr[14:34, 12:30, 16:36] = 1200
    ct = Volume(arr, (2.0, 2.0, 2.0), (-47, -47, -47), np.eye(3))
    lab = ct.with_array((arr > 0).astype(np.uint8))
    d = random_deformation(3, ct, elastic_mm=6, max_rotation_deg=8)
    c2, l2 = d.apply(ct, "ct"), d.apply(lab, "labels")
    bright = c2.array > 100
    overlap = (bright & (l2.array > 0)).sum() / max(bright.sum(), (l2.array > 0).sum())
    assert overlap > 0.95
    assert not np.array_equal(l2.array, lab.array)
