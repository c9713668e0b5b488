"""X2DatasetBuilder logic with the real MRML of slicer-core: nodes in, nodes out, RAS ↔ LPS."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is part of the test extra")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "X2DatasetBuilder"))

from X2DatasetBuilderLib.logic import X2DatasetBuilderLogic  # noqa: E402
from X2DatasetBuilderLib.mrml_io import (  # noqa: E402
    LPS_RAS,
    load_model_node,
    segmentation_to_labelmap_volume,
    volume_node_to_volume,
    volume_to_volume_node,
)

from x2recon.dataset.config import BuildConfig  # noqa: E402
from x2recon.geometry import ProjectionGeometry  # noqa: E402
from x2recon.io.volume import Volume, read_ct, read_labelmap  # noqa: E402


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def ijk_to_ras(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def oblique_volume():
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1500, size=(7, 9, 11)).astype(np.int16)
    th = np.radians(20)
    R = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]])
    return Volume(arr, (0.7, 0.8, 2.5), (-100.0, 50.0, -300.0), R)


def test_volume_node_round_trip_keeps_lps_affine_and_array(scene):
    vol = oblique_volume()
    node = volume_to_volume_node(vol, scene, "ct")
    assert node.GetScene() is scene and node.GetDisplayNode() is not None
    back = volume_node_to_volume(node)
    assert np.array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-9)
    # a voxel at a known LPS position sits at (−x, −y, z) in Slicer's RAS world
    ijk = np.array([3, 5, 2, 1.0])
    lps = vol.affine @ ijk
    ras = ijk_to_ras(node) @ ijk
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-9)


def test_parent_transform_is_applied(scene):
    vol = oblique_volume()
    node = volume_to_volume_node(vol, scene, "ct")
    import vtk

    tnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 10.0)  # +10 mm towards Right in RAS = −10 in LPS x
    tnode.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    back = volume_node_to_volume(node)
    np.testing.assert_allclose(back.origin, vol.origin + [-10, 0, 0], atol=1e-9)


def test_real_ct_converts_exactly(scene, chest_half):
    import SimpleITK as sitk

    ct = read_ct(chest_half[0])
    node = volume_to_volume_node(ct, scene, "chest")
    back = volume_node_to_volume(node)
    assert np.array_equal(back.array, ct.array)
    img = sitk.ReadImage(str(chest_half[0]))
    idx = (100, 80, 60)
    lps = img.TransformIndexToPhysicalPoint(idx)
    ras = ijk_to_ras(node) @ np.array([*idx, 1.0])
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-6)


def test_preview_drr_lies_on_the_detector_plane(scene, chest_half):
    ct = read_ct(chest_half[0])
    ct_node = volume_to_volume_node(ct, scene, "chest")
    cfg = BuildConfig(drr_size=64)
    logic = X2DatasetBuilderLogic(scene)
    node = logic.preview_drr(ct_node, "LAT", cfg)
    g = ProjectionGeometry.from_json(node.GetAttribute("x2recon.geometry"))
    assert g.size == (64, 64) and g.name == "LAT"
    M = ijk_to_ras(node)
    for c, r in [(0, 0), (63, 0), (17, 40)]:
        ras = M @ np.array([c, r, 0, 1.0])
        np.testing.assert_allclose(LPS_RAS[:3, :3] @ ras[:3], g.pixel_to_world(c, r), atol=1e-6)
    k_axis = LPS_RAS[:3, :3] @ M[:3, 2]
    np.testing.assert_allclose(k_axis, g.plane_normal, atol=1e-9)
    assert node.GetImageData().GetDimensions() == (64, 64, 1)
    arr = volume_node_to_volume(node).array
    assert arr.dtype == np.uint16 and arr.max() > 60000


def synthetic_case():
    n = 64
    z, y, x = np.mgrid[:n, :n, :n]
    ct = np.full((n, n, n), -1000, np.int16)
    ct[(x - 32) ** 2 + (y - 32) ** 2 < 26**2] = 40
    rod = ((x - 32) ** 2 + (y - 40) ** 2 < 5**2) & (z > 4) & (z < 60)
    ct[rod] = 700
    vol = Volume(ct, (3.0, 3.0, 3.0), (-96.0, -96.0, -96.0), np.eye(3))
    return vol, vol.with_array((rod * 37).astype(np.uint8))  # 37 = vertebrae_T7


def test_build_case_gives_a_model_in_ras(scene, tmp_path):
    vol, lab = synthetic_case()
    ct_node = volume_to_volume_node(vol, scene, "phantom")
    lab_node = volume_to_volume_node(lab, scene, "phantom_labels", "vtkMRMLLabelMapVolumeNode")
    cfg = BuildConfig(structures=["vertebrae_T7"], views=["AP"], drr_size=64, n_points=2000, spider_grid=16, box_size=200)
    logic = X2DatasetBuilderLogic(scene)
    res, model = logic.build_case(ct_node, lab_node, tmp_path, cfg)
    assert res.status == "done", res.reason
    assert (tmp_path / "cases" / "phantom" / "meta.json").is_file()
    from x2recon.io.mesh import read_mesh

    mesh = read_mesh(res.case_dir / "meshes" / "bones.ply")
    b = model.GetPolyData().GetBounds()
    ras_min, ras_max = np.array(b[0::2]), np.array(b[1::2])
    lps_min, lps_max = mesh.bounds
    np.testing.assert_allclose(ras_min, [-lps_max[0], -lps_max[1], lps_min[2]], atol=1e-3)
    np.testing.assert_allclose(ras_max, [-lps_min[0], -lps_min[1], lps_max[2]], atol=1e-3)
    assert model.GetDisplayNode() is not None
    # the rod is at LPS y ≈ (40 − 32)·3 = +24 mm (posterior) → RAS A ≈ −24
    assert -30 < (ras_min[1] + ras_max[1]) / 2 < -18


def test_segmentation_node_becomes_a_totalsegmentator_labelmap(scene, chest_half):
    ct = read_ct(chest_half[0])
    lab = read_labelmap(chest_half[1])
    ct_node = volume_to_volume_node(ct, scene, "chest")
    keep = np.where(np.isin(lab.array, [37, 95]), lab.array, 0).astype(np.uint8)  # T7, rib_left_4
    lab_node = volume_to_volume_node(lab.with_array(keep), scene, "labels", "vtkMRMLLabelMapVolumeNode")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab_node, seg_node)
    import vtk

    ids = vtk.vtkStringArray()
    seg_node.GetSegmentation().GetSegmentIDs(ids)
    names = {"Label_37": "vertebrae T7", "Label_95": "rib_left_4"}  # as Slicer names imported labels
    for i in range(ids.GetNumberOfValues()):
        s = seg_node.GetSegmentation().GetSegment(ids.GetValue(i))
        s.SetName(names.get(s.GetName(), s.GetName()))
    vol, unknown = segmentation_to_labelmap_volume(seg_node, ct_node, scene)
    assert not unknown and vol.same_grid(ct)
    assert np.array_equal(vol.array, keep)


def test_folder_command_and_progress_lines(tmp_path):
    cmd = X2DatasetBuilderLogic.build_folder_command("/in", tmp_path, 3, ["--variants", "2"], python="py")
    assert cmd[:4] == ["py", "-m", "x2recon.cli", "build-dataset"] and "--progress-lines" in cmd
    assert cmd[cmd.index("--workers") + 1] == "3"
    p = X2DatasetBuilderLogic.parse_progress_line("X2RECON_PROGRESS 2/5 head failed /x/ct.nii.gz: no labelmap")
    assert p == (2, 5, "head", "failed", "/x/ct.nii.gz: no labelmap")
    assert X2DatasetBuilderLogic.parse_progress_line("cases: 40%|####") is None


def test_cli_progress_lines_are_what_the_panel_parses(tmp_path, shared_data):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "x2recon.cli", "build-dataset", "--ct", str(shared_data / "head_invesalius"),
                        "--out", str(tmp_path), "--progress-lines", "--quiet"], capture_output=True, text=True)
    lines = [X2DatasetBuilderLogic.parse_progress_line(ln) for ln in r.stdout.splitlines()]
    lines = [p for p in lines if p]
    assert len(lines) == 1 and lines[0][:4] == (1, 1, "head_invesalius", "failed")
    assert "no labelmap given" in lines[0][4]
    assert r.returncode == 1  # nothing could be built
