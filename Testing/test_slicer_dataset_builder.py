"""X2DatasetBuilder logic with the real MRML of slicer-core: nodes in, nodes out, RAS ↔ LPS."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is part of the test extra")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "X2DatasetBuilder"))

from X2DatasetBuilderLib.logic import (  # noqa: E402
    X2DatasetBuilderLogic,
    config_to_cli_args,
)

from x2recon.dataset.config import BuildConfig  # noqa: E402
from x2recon.geometry import ProjectionGeometry  # noqa: E402
from x2recon.io.volume import Volume, read_ct, read_labelmap  # noqa: E402
from x2recon.slicer.mrml import (  # noqa: E402
    LPS_RAS,
    lps_ras_points,
    mesh_to_model_node,
    segmentation_to_labelmap_volume,
    volume_node_to_volume,
    volume_to_volume_node,
)
from x2recon.slicer.process import LineBuffer, _alive, kill_process_tree  # noqa: E402


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
    # as the build renders: the table under the patient (cleared by default) shows only when kept
    kept = logic.preview_drr(ct_node, "LAT", BuildConfig(drr_size=64, keep_outside_body=True))
    assert not np.array_equal(volume_node_to_volume(kept).array, arr)


def test_preview_with_labels_looks_at_the_selected_structures(scene, chest_half):
    """With labels, the preview uses the dataset's isocentre: the centre of the selected bones' bounding box."""
    from x2recon.structures import name_to_id

    ct, lab = read_ct(chest_half[0]), read_labelmap(chest_half[1])
    ct_node = volume_to_volume_node(ct, scene, "chest")
    lab_node = volume_to_volume_node(lab, scene, "labels", "vtkMRMLLabelMapVolumeNode")
    cfg = BuildConfig(drr_size=32, structures="ribs")
    node = X2DatasetBuilderLogic(scene).preview_drr(ct_node, "AP", cfg, labels_node=lab_node)
    g = ProjectionGeometry.from_json(node.GetAttribute("x2recon.geometry"))
    ids = [name_to_id()[n] for n in cfg.structures]
    k, j, i = np.nonzero(np.isin(lab.array, ids))
    corners = np.array([[a, b, c, 1.0] for a in (i.min(), i.max()) for b in (j.min(), j.max()) for c in (k.min(), k.max())])
    w = (lab.affine @ corners.T).T[:, :3]
    expected = (w.min(0) + w.max(0)) / 2
    np.testing.assert_allclose(g.isocenter, expected, atol=1e-6)
    assert np.linalg.norm(expected - ct.corners_world().mean(0)) > 5  # not simply the CT centre
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 1  # no temporary nodes left


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
    """Segments are matched by ID (SlicerTotalSegmentator: ID = TotalSegmentator name, name = display
    name) or by name; unknown segments are reported, not guessed."""
    import vtk

    ct = read_ct(chest_half[0])
    lab = read_labelmap(chest_half[1])
    ct_node = volume_to_volume_node(ct, scene, "chest")
    keep = np.where(np.isin(lab.array, [37, 95, 116]), lab.array, 0).astype(np.uint8)  # T7, rib_left_4, sternum
    lab_node = volume_to_volume_node(lab.with_array(keep), scene, "labels", "vtkMRMLLabelMapVolumeNode")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab_node, seg_node)
    segm = seg_node.GetSegmentation()
    ids = vtk.vtkStringArray()
    segm.GetSegmentIDs(ids)
    by_label = {segm.GetSegment(ids.GetValue(i)).GetName(): ids.GetValue(i) for i in range(ids.GetNumberOfValues())}
    segm.GetSegment(by_label["Label_37"]).SetName("vertebrae T7")  # a name with a space
    # copying a segment needs the representation rules the Segmentations module registers at Slicer's startup
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {r.GetClassName() for r in factory.GetConverterRules()}
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if rule.__name__ not in have:
            factory.RegisterConverterRule(rule())
    s95 = slicer.vtkSegment()
    s95.DeepCopy(segm.GetSegment(by_label["Label_95"]))
    segm.RemoveSegment(by_label["Label_95"])
    s95.SetName("Left fourth rib")  # SlicerTotalSegmentator's standard name; the ID carries the TotalSegmentator name
    segm.AddSegment(s95, "rib_left_4")
    segm.GetSegment(by_label["Label_116"]).SetName("breastbone")  # no TotalSegmentator name: left out
    vol, unknown = segmentation_to_labelmap_volume(seg_node, ct_node, scene)
    assert unknown == ["breastbone"] and vol.same_grid(ct)
    assert np.array_equal(vol.array, np.where(keep == 116, 0, keep))
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 1  # temporary node removed


def test_folder_command_and_progress_lines(tmp_path):
    cfg = BuildConfig(variants=2, angles=[-20.0], structures="thoracic")
    cmd = X2DatasetBuilderLogic.build_folder_command("/in", tmp_path, cfg, 3, python="py")
    assert cmd[:4] == ["py", "-m", "x2recon.cli", "build-dataset"] and "--progress-lines" in cmd
    from x2recon.cli import build_parser
    from x2recon.cli.dataset import _config_from_args

    a = build_parser().parse_args(cmd[3:])
    assert a.ct == ["/in"] and a.out == str(tmp_path) and a.workers == 3 and a.progress_lines
    assert _config_from_args(a).to_dict() == cfg.to_dict()
    p = X2DatasetBuilderLogic.parse_progress_line("X2RECON_PROGRESS 2/5 head failed /x/ct.nii.gz: no labelmap")
    assert p == (2, 5, "head", "failed", "/x/ct.nii.gz: no labelmap")
    assert X2DatasetBuilderLogic.parse_progress_line("X2RECON_PROGRESS 3/5 c1 done") == (3, 5, "c1", "done", None)
    assert X2DatasetBuilderLogic.parse_progress_line("cases: 40%|####") is None


def test_config_round_trips_through_the_command_line():
    """Every build setting the panel can change reaches the background process unchanged."""
    from dataclasses import fields

    from x2recon.cli import build_parser
    from x2recon.cli.dataset import _config_from_args

    def parse(args):
        a = build_parser().parse_args(["build-dataset", "--ct", "x", "--out", "y", *args])
        return _config_from_args(a).to_dict()

    assert config_to_cli_args(BuildConfig()) == [] and parse([]) == BuildConfig().to_dict()
    changed = BuildConfig(
        structures=["rib_left_3", "vertebrae_T7"], label_convention="verse", segmentation="threshold",
        threshold_hu=-120.5, views=["LAT"], angles=[-20.0, 12.5], drr_size=256, x2b_size=128, sdd=1500.25,
        sod=1400.0, detector_mm=400.0, box_size=320.0, beam="parallel", isocenter="ct", clahe=False,
        clahe_clip=0.02, device="cpu", mesh_smoothing=0.5, n_points=5000, near_surface_fraction=0.25,
        spider_grid=64, variants=3, seed=7, preset="paper", xray_realism=True, keep_outside_body=True,
        variant_scale=0.15, variant_rotation_deg=7.5, variant_shift_mm=[15.0, 25.0, 12.5],
    )
    d0, d1 = BuildConfig().to_dict(), changed.to_dict()
    no_option = {"near_surface_sigma"}  # not a command-line setting
    untested = {f.name for f in fields(BuildConfig)} - no_option - {k for k in d0 if d0[k] != d1[k]}
    assert not untested, f"new BuildConfig fields need a CLI option and a line in logic._CLI_OPTIONS: {untested}"
    assert parse(config_to_cli_args(changed)) == d1
    # under the paper preset a value equal to ours (not the paper's) must still be written out
    paper_ours = BuildConfig.from_preset("paper", near_surface_fraction=0.5)
    assert parse(config_to_cli_args(paper_ours)) == paper_ours.to_dict()
    with pytest.raises(ValueError, match="near_surface_sigma"):
        config_to_cli_args(BuildConfig(near_surface_sigma=0.02))


def test_line_buffer_reassembles_lines_split_across_reads():
    buf = LineBuffer()
    assert buf.feed("X2RECON_PROG") == []
    assert buf.feed("RESS 1/2 a done\nX2RECON_PROGRESS 2/2 b fail") == ["X2RECON_PROGRESS 1/2 a done"]
    assert buf.feed("ed bad input\r\n40%|##\rtail") == ["X2RECON_PROGRESS 2/2 b failed bad input", "40%|##"]
    assert buf.flush() == ["tail"] and buf.flush() == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
@pytest.mark.parametrize("use_psutil", [True, False])
def test_cancel_kills_the_whole_process_tree(use_psutil):
    """Cancel must stop the CLI and its pool workers, not only the process the panel started."""
    import subprocess

    if use_psutil:
        pytest.importorskip("psutil")
    code = ("import subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(c.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    killed = kill_process_tree(parent.pid, timeout=2.0, use_psutil=use_psutil)
    assert set(killed) >= {parent.pid, child}
    parent.wait(timeout=5)  # ended (psutil may already have reaped it: no reliable exit code here)
    for _ in range(100):  # the orphaned worker is reaped by init, maybe a moment later
        if not _alive(child):
            break
        import time

        time.sleep(0.05)
    assert not _alive(child)


def test_logic_imports_without_qt_and_without_heavy_packages():
    """The logic runs headless and leaves torch and the pipeline unimported until they are needed."""
    import subprocess

    code = ("import sys\nsys.modules['qt'] = sys.modules['ctk'] = sys.modules['slicer.util'] = None\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'X2DatasetBuilder')!r})\n"
            "import X2DatasetBuilderLib.logic, x2recon.slicer.mrml, x2recon.slicer.process\n"
            "heavy = [m for m in ('torch', 'x2recon.drr.render', 'x2recon.dataset.case', 'trimesh') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_mesh_to_model_node_flips_lps_to_ras(scene):
    v = np.array([[10.0, 20.0, 30.0], [15.0, 20.0, 30.0], [10.0, 26.0, 30.0], [10.0, 20.0, 37.0]])
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])
    model = mesh_to_model_node(v, f, scene, "tet")
    from vtk.util import numpy_support

    poly = model.GetPolyData()
    pts = numpy_support.vtk_to_numpy(poly.GetPoints().GetData())
    np.testing.assert_allclose(pts, np.c_[-v[:, 0], -v[:, 1], v[:, 2]])
    assert poly.GetNumberOfPolys() == 4 and model.GetDisplayNode() is not None
    np.testing.assert_allclose(lps_ras_points(pts), v)
    with pytest.raises(ValueError, match="vertex that does not exist"):
        mesh_to_model_node(v, [[0, 1, 4]], scene, "bad")


def test_cli_progress_lines_are_what_the_panel_parses(tmp_path, shared_data):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "x2recon.cli", "build-dataset", "--ct", str(shared_data / "head_invesalius"),
                        "--out", str(tmp_path), "--progress-lines", "--quiet"], capture_output=True, text=True)
    lines = [X2DatasetBuilderLogic.parse_progress_line(ln) for ln in r.stdout.splitlines()]
    lines = [p for p in lines if p]
    assert len(lines) == 1 and lines[0][:4] == (1, 1, "head_invesalius", "failed")
    assert "no labelmap given" in lines[0][4]
    assert r.returncode == 1  # nothing could be built
