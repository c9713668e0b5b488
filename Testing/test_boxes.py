"""Box labels from geometry: containment, tightness, clipping, classes and YOLO/ultralytics files.

References are independent of the module's shortcuts (run-end corners shared by views, boundary voxels):
brute force over *all* voxels and their 8 corners, and an analytic parallel-beam case.
"""

import numpy as np
import pytest

from x2recon.dataset.config import BuildConfig
from x2recon.drr.boxes import (
    GROUP_CLASSES,
    Box,
    class_names,
    _extents_per_voxel,
    class_of,
    label_corners,
    projected_extents,
    read_yolo_labels,
    structure_boxes,
    write_dataset_yaml,
    write_yolo_labels,
    yolo_rows,
    yolo_to_pixels,
)
from x2recon.errors import X2ReconInputError
from x2recon.geometry import ProjectionGeometry
from x2recon.io.volume import Volume

CORNERS = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])


@pytest.fixture(scope="module")
def chest(chest_half_seg):
    ct, seg, names, iso = chest_half_seg
    return seg, names, iso


def brute_force_extent(seg, k, geom):
    """Unclipped (x0, y0, x1, y1) from the 8 corners of every voxel of label k, and the centres."""
    ijk = np.argwhere(seg.array == k)[:, ::-1].astype(float)
    corners = geom.project(seg.index_to_world((ijk[:, None] + CORNERS[None]).reshape(-1, 3)))
    centres = geom.project(seg.index_to_world(ijk))
    return np.r_[corners.min(0), corners.max(0)], centres


@pytest.mark.parametrize("view,kind", [("AP", "cone"), ("LAT", "cone"), (30.0, "cone"), ("PA", "parallel")])
def test_boxes_contain_every_voxel_and_touch_the_corner_extent(chest, view, kind):
    seg, names, iso = chest
    g = ProjectionGeometry.from_view(view, iso, size=(256, 256), kind=kind)
    boxes = structure_boxes(seg, names, g)
    assert [b.label for b in boxes] == sorted(names)  # the whole thorax is in view: every structure
    for b in boxes:
        ref, centres = brute_force_extent(seg, b.label, g)
        assert b.name == names[b.label] and not b.truncated and b.visible_fraction == 1.0
        # every voxel centre projects inside its box
        assert (centres[:, 0] >= b.x0).all() and (centres[:, 0] <= b.x1).all(), b.name
        assert (centres[:, 1] >= b.y0).all() and (centres[:, 1] <= b.y1).all(), b.name
        # tight: each side is where the projected voxel corners reach (well within a pixel)
        np.testing.assert_allclose([b.x0, b.y0, b.x1, b.y1], ref, atol=1e-6, err_msg=b.name)


def test_corners_shared_by_views_agree_with_the_voxel_by_voxel_extents(chest):
    seg, names, iso = chest
    corners = label_corners(seg, list(names))
    for view in ("AP", "LAT"):
        g = ProjectionGeometry.from_view(view, iso, size=(256, 256))
        assert structure_boxes(seg, names, g, corners) == structure_boxes(seg, names, g)
        fast, slow = projected_extents(seg, list(names), g, corners), _extents_per_voxel(seg, list(names), g)
        assert sorted(fast) == sorted(slow) == sorted(names)
        for k in names:
            np.testing.assert_allclose(fast[k][0], slow[k][0], rtol=0, atol=1e-9)
            assert fast[k][1] is slow[k][1] is False
    other = Volume(np.asarray(seg.array)[:, :, 1:], seg.spacing, seg.origin, seg.direction)
    with pytest.raises(ValueError, match="corners were computed"):
        structure_boxes(other, names, g, corners)


def test_analytic_parallel_box():
    # a labelled block of voxels with known world extent; AP parallel beam: col = (x − iso_x)/s + (W−1)/2,
    # row = −(z − iso_z)/s + (H−1)/2 (u = +x, v = −z)
    arr = np.zeros((20, 30, 40), np.uint8)
    arr[5:12, 10:20, 8:31] = 3  # i 8..30, j 10..19, k 5..11
    arr[0, 0, 0] = 9  # a second structure, at the grid corner
    sp = np.array([0.8, 1.0, 2.0])
    vol = Volume(arr, sp, (-10.0, 5.0, 100.0), np.eye(3))
    g = ProjectionGeometry.from_view("AP", (0.0, 0.0, 116.0), size=(64, 64), spacing=(0.5, 0.5), kind="parallel")
    (b,) = structure_boxes(vol, {3: "vertebrae_T1"}, g)
    x0, x1 = -10.0 + (8 - 0.5) * 0.8, -10.0 + (30 + 0.5) * 0.8
    z0, z1 = 100.0 + (5 - 0.5) * 2.0, 100.0 + (11 + 0.5) * 2.0
    expect = [x0 / 0.5 + 31.5, -(z1 - 116.0) / 0.5 + 31.5, x1 / 0.5 + 31.5, -(z0 - 116.0) / 0.5 + 31.5]
    np.testing.assert_allclose([b.x0, b.y0, b.x1, b.y1], expect, atol=1e-9)
    assert (b.name, b.label, b.truncated) == ("vertebrae_T1", 3, False)
    both = structure_boxes(vol, {3: "vertebrae_T1", 9: "rib_left_1", 4: "rib_left_2"}, g)  # 4 is absent
    assert [x.label for x in both] == [3, 9] and both[1].truncated  # 9 reaches past the bottom edge


def test_partly_and_fully_outside_structures(chest):
    seg, names, iso = chest
    idx = np.argwhere(seg.array > 0)
    top = seg.index_to_world(idx[idx[:, 0].argmax()][::-1])  # the most superior bone voxel
    g = ProjectionGeometry.from_view("AP", top + [0, 0, 30], size=(128, 128), detector_mm=150)
    boxes = {b.label: b for b in structure_boxes(seg, names, g)}
    w, h = g.size
    kept = dropped = clipped = 0
    for k in names:
        (x0, y0, x1, y1), _ = brute_force_extent(seg, k, g)
        if x1 <= -0.5 or y1 <= -0.5 or x0 >= w - 0.5 or y0 >= h - 0.5:
            assert k not in boxes, names[k]  # fully outside: no box
            dropped += 1
            continue
        b = boxes[k]
        kept += 1
        cx0, cy0, cx1, cy1 = max(x0, -0.5), max(y0, -0.5), min(x1, w - 0.5), min(y1, h - 0.5)
        np.testing.assert_allclose([b.x0, b.y0, b.x1, b.y1], [cx0, cy0, cx1, cy1], atol=1e-6)
        vis = (cx1 - cx0) * (cy1 - cy0) / ((x1 - x0) * (y1 - y0))
        assert b.visible_fraction == pytest.approx(vis) and b.truncated == (vis < 1)
        clipped += b.truncated
    assert kept and dropped and clipped  # the set-up exercises all three cases
    assert kept == len(boxes)


def test_structures_behind_the_source_are_not_imaged():
    arr = np.zeros((10, 10, 40), np.uint8)
    arr[4:6, 4:6, 2:6] = 1  # x ≈ −16…−12 mm: behind a source at x = −5 looking along +x
    arr[4:6, 4:6, 30:34] = 2  # x ≈ 10…14 mm: in front
    arr[4:6, 4:6, 12:24] = 3  # straddles the source plane
    vol = Volume(arr, (1.0, 1.0, 1.0), (-19.5, -4.5, -4.5), np.eye(3))
    theta = 90.0  # from_view: source direction (−sin θ, −cos θ, 0) = −x
    g = ProjectionGeometry.from_view(theta, (0, 0, 0), sdd=100.0, sod=5.0, size=(64, 64), detector_mm=64)
    boxes = {b.label: b for b in structure_boxes(vol, {1: "a", 2: "b", 3: "c"}, g)}
    assert set(boxes) == {2, 3}
    assert not boxes[2].truncated and boxes[3].truncated


def test_class_vocabulary_groups_and_structures():
    structures = BuildConfig().structures
    groups = class_names("groups", structures)
    assert groups == ["cervical", "thoracic", "lumbar", "ribs"] == list(GROUP_CLASSES)
    expect = {"vertebrae_C5": 0, "vertebrae_C7": 0, "vertebrae_T1": 1, "vertebrae_T12": 1, "vertebrae_L1": 2,
              "vertebrae_L5": 2, "rib_left_1": 3, "rib_right_12": 3, "costal_cartilages": None, "sternum": None}
    assert {n: class_of(n, groups) for n in expect} == expect
    per = class_names("structures", structures)
    assert per == structures and len(set(per)) == len(per)
    assert class_of("rib_left_3", per) == structures.index("rib_left_3")
    assert class_of("costal_cartilages", per) == structures.index("costal_cartilages")
    assert class_of("sternum", per) is None  # not selected
    with pytest.raises(ValueError, match="class mode"):
        class_names("vertebrae", structures)


def test_yolo_round_trip_and_groups_labels(tmp_path, chest):
    seg, names, iso = chest
    g = ProjectionGeometry.from_view("AP", iso, size=(320, 256), detector_mm=430)
    boxes = structure_boxes(seg, names, g)
    classes = class_names("groups", list(names.values()))
    n = write_yolo_labels(boxes, classes, g, tmp_path / "labels" / "AP.txt")
    rows = read_yolo_labels(tmp_path / "labels" / "AP.txt")
    with_class = [b for b in boxes if class_of(b.name, classes) is not None]
    assert n == len(rows) == len(with_class) == len(boxes) - 1  # costal cartilages: no group class
    W, H = g.size
    for r, b in zip(rows, with_class):
        assert r[0] == class_of(b.name, classes)
        # YOLO definition: centre and size normalised by the image, pixel centres at integer coordinates
        np.testing.assert_allclose(
            r[1:], [((b.x0 + b.x1) / 2 + 0.5) / W, ((b.y0 + b.y1) / 2 + 0.5) / H, b.width / W, b.height / H], atol=6e-7
        )
    back = yolo_to_pixels(rows, g)
    np.testing.assert_allclose(back, [[b.x0, b.y0, b.x1, b.y1] for b in with_class], atol=1e-6 * max(W, H))
    np.testing.assert_allclose(yolo_rows(boxes, classes, g), rows, atol=6e-7)
    # a box at the image edge stays within [0, 1]
    edge = Box("rib_left_1", 1, -0.5, -0.5, W - 0.5, 10.0, 0.5, True)
    write_yolo_labels([edge], classes, g, tmp_path / "edge.txt")
    expect = [[3, 0.5, 10.5 / 2 / H, 1.0, 10.5 / H]]
    np.testing.assert_allclose(read_yolo_labels(tmp_path / "edge.txt"), expect, atol=1e-6)
    write_yolo_labels([], classes, g, tmp_path / "empty.txt")
    assert read_yolo_labels(tmp_path / "empty.txt").shape == (0, 5)


@pytest.mark.parametrize(
    "text,problem",
    [("1 0.5 0.5\n", "line 1: expected 5 numbers"), ("0 0.5 0.5 0.1 0.1\n1 a 0.5 0.1 0.1\n", "line 2: not numbers"),
     ("1.5 0.5 0.5 0.1 0.1\n", "line 1: class must be a non-negative integer"),
     ("0 1.2 0.5 0.1 0.1\n", "line 1: box values must be normalised")],
)
def test_read_yolo_rejects_malformed_files(tmp_path, text, problem):
    (tmp_path / "bad.txt").write_text(text)
    with pytest.raises(X2ReconInputError, match=f"bad.txt: {problem}"):
        read_yolo_labels(tmp_path / "bad.txt")


def test_missing_label_file(tmp_path):
    with pytest.raises(X2ReconInputError, match="label file not found"):
        read_yolo_labels(tmp_path / "none.txt")


def test_dataset_yaml_is_ultralytics_format(tmp_path):
    yaml = pytest.importorskip("yaml")  # PyYAML comes with the test extra (dask)
    root = tmp_path / "my data: set"
    classes = class_names("groups", [])
    val = ["cases/a/images", "cases/b/images"]
    write_dataset_yaml(root / "dataset.yaml", classes, "splits/yolo_train.txt", val, root, test="splits/yolo_test.txt")
    d = yaml.safe_load((root / "dataset.yaml").read_text())
    assert d["path"] == str(root)
    assert d["train"] == "splits/yolo_train.txt" and d["val"] == val
    assert d["test"] == "splits/yolo_test.txt"
    assert d["names"] == {0: "cervical", 1: "thoracic", 2: "lumbar", 3: "ribs"} and d["nc"] == 4
    write_dataset_yaml(tmp_path / "d2.yaml", ['odd "name"', "rib_left_1"], "t.txt", "v.txt", tmp_path)
    d2 = yaml.safe_load((tmp_path / "d2.yaml").read_text())
    assert d2["names"] == {0: 'odd "name"', 1: "rib_left_1"} and "test" not in d2
