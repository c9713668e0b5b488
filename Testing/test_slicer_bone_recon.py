"""X2BoneRecon logic with the real MRML of slicer-core: X-ray node + model file → bone model in RAS,
comparison with ground truth → metrics table and distance heat map, clear errors for bad inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is part of the test extra")
pytest.importorskip("timm", reason="the X2B encoder is a timm backbone")
pytest.importorskip("safetensors", reason="checkpoints are safetensors files")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "X2BoneRecon"))

from X2BoneReconLib.logic import (  # noqa: E402
    DISTANCE_ARRAY,
    FALLBACK_COLOR_NAME,
    X2BoneReconLogic,
    metric_rows,
)

from x2recon.errors import X2ReconInputError  # noqa: E402
from x2recon.geometry import ProjectionGeometry  # noqa: E402
from x2recon.slicer.mrml import (  # noqa: E402
    GEOMETRY_ATTRIBUTE,
    drr_to_volume_node,
    lps_ras_points,
    mesh_to_model_node,
    model_node_to_mesh,
    point_scalars,
    volume_to_volume_node,
    xray_node_to_xray,
)

VERTEBRAE = {"vertebrae_T6": 38, "vertebrae_T7": 37, "vertebrae_T8": 36, "vertebrae_T9": 35}
RIB = {"rib_left_4": 95}
TINY = dict(backbone="convnext_atto", image_size=64, hidden=32, n_blocks=2)
N_POINTS = 5000  # (the papers use 100 000; fewer keep ICP fast on 2 cores)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def drr(chest_half):
    """A 64² AP DRR of the half-resolution chest CT (geometry centred on the CT)."""
    from x2recon.dataset.config import BuildConfig
    from x2recon.drr.render import render_drr
    from x2recon.io.volume import read_ct

    ct = read_ct(chest_half[0])
    return render_drr(ct, BuildConfig(drr_size=64).geometry("AP", ct.corners_world().mean(0)))


@pytest.fixture(scope="module")
def lateral_drr(chest_half, drr):
    from x2recon.dataset.config import BuildConfig
    from x2recon.drr.render import render_drr
    from x2recon.io.volume import read_ct

    return render_drr(read_ct(chest_half[0]), BuildConfig(drr_size=64).geometry("LAT", drr.geometry.isocenter))


def _save_tiny(path, kind, views):
    import torch

    from x2recon.nn.checkpoint import save_checkpoint
    from x2recon.x2b.network import X2BConfig, build_model

    torch.manual_seed(0)
    cfg = X2BConfig(kind=kind, views=views, **TINY)
    conf = {"network": kind, "model": cfg.to_dict(), "dataset": {"build": {"structures": ["vertebrae"]}}}
    return save_checkpoint(path, build_model(cfg).eval(), conf)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random-weight X2B and X2B2 checkpoints (light backbone), saved by our own checkpoint writer."""
    d = tmp_path_factory.mktemp("ckpt")
    return {"x2b": _save_tiny(d / "x2b.safetensors", "x2b", ["AP"]),
            "x2b2": _save_tiny(d / "x2b2.safetensors", "x2b2", ["AP", "LAT"])}


@pytest.fixture(scope="module")
def direct(checkpoints, drr):
    """x2recon's own reconstruction from the DRR (what the module must put in the scene), at an
    occupancy threshold the random network crosses inside the box (its median probability)."""
    import torch

    from x2recon.nn.checkpoint import load_model
    from x2recon.x2b.reconstruct import OccupancyField, reconstruct
    from x2recon.io.xray import xray_from_array

    model, _ = load_model(checkpoints["x2b"])
    xray = xray_from_array(drr.display, drr.geometry)
    field = OccupancyField(model, [xray], torch.device("cpu"))
    pts = np.random.default_rng(0).uniform(-0.5, 0.5, size=(4000, 3))
    tau = float(np.median(field.prob(pts)))
    return tau, reconstruct(model, [xray], resolution=32, threshold=tau, device="cpu")


@pytest.fixture(scope="module")
def ground_truth(chest_half):
    """(labelmap Volume with T6–T9 and a rib, vertebrae mesh, whole mesh) in LPS mm."""
    from x2recon.io.volume import read_labelmap
    from x2recon.mesh.extract import mask_to_mesh

    lab = read_labelmap(chest_half[1])
    keep = np.where(np.isin(lab.array, list(VERTEBRAE.values()) + list(RIB.values())), lab.array, 0).astype(np.uint8)
    vert = mask_to_mesh(np.isin(keep, list(VERTEBRAE.values())), lab.affine)
    whole = mask_to_mesh(keep > 0, lab.affine)
    return lab.with_array(keep), vert, whole


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def no_bundled(tmp_path, monkeypatch):
    """An installation without bundled models: empty paths then mean 'choose one'."""
    import x2recon.resources.registry as registry

    monkeypatch.setattr(registry, "MODELS_DIR", tmp_path / "no_models")


@pytest.fixture
def logic(scene):
    return X2BoneReconLogic(scene)


def segmentation_node(scene, labels):
    """A segmentation node from a labelmap, segments named by their TotalSegmentator names."""
    lab_node = volume_to_volume_node(labels, scene, "gt_labels", "vtkMRMLLabelMapVolumeNode")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ground truth")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab_node, seg_node)
    scene.RemoveNode(lab_node)
    segm = seg_node.GetSegmentation()
    by_id = {v: k for k, v in {**VERTEBRAE, **RIB}.items()}
    for i in range(segm.GetNumberOfSegments()):
        seg = segm.GetNthSegment(i)
        seg.SetName(by_id[int(seg.GetName().split("_")[-1])])  # "Label_37" → "vertebrae_T7"
    return seg_node


def polydata_points(node) -> np.ndarray:
    from vtk.util import numpy_support

    return numpy_support.vtk_to_numpy(node.GetPolyData().GetPoints().GetData()).astype(np.float64)


# ------------------------------------------------------------------------------- reconstruction
def test_reconstruct_places_the_model_in_the_geometry_box(logic, scene, drr, checkpoints, direct):
    from vtk.util import numpy_support

    tau, rec = direct
    xnode = drr_to_volume_node(drr, scene, "chest AP")
    seen = []
    node = logic.reconstruct(xnode, checkpoints["x2b"], resolution=32, threshold=tau, device="cpu",
                             progress=lambda f, m: seen.append(f))
    assert node.GetName() == "chest AP bones" and node.IsA("vtkMRMLModelNode")
    assert seen and seen[-1] == 1.0
    ras = polydata_points(node)
    assert len(ras) > 100 and node.GetPolyData().GetNumberOfPolys() > 100
    # inside the reconstruction box of the X-ray's geometry, converted to RAS
    g = ProjectionGeometry.from_json(node.GetAttribute(GEOMETRY_ATTRIBUTE))
    assert g == drr.geometry
    lo, hi = g.box_bounds()
    corners = lps_ras_points(np.array([lo, hi]))
    ras_lo, ras_hi = corners.min(0), corners.max(0)
    half_cell = 0.5 * (ras_hi - ras_lo) / 32  # the watertight surface's cap, less than half a cell outside
    assert np.all(ras >= ras_lo - half_cell) and np.all(ras <= ras_hi + half_cell)
    # exactly x2recon's reconstruction (LPS) flipped to RAS, normals too
    np.testing.assert_allclose(ras, lps_ras_points(rec.mesh.vertices), atol=1e-6)
    normals = numpy_support.vtk_to_numpy(node.GetPolyData().GetPointData().GetNormals())
    np.testing.assert_allclose(normals, lps_ras_points(rec.mesh.vertex_normals), atol=1e-5)
    np.testing.assert_array_equal(model_node_to_mesh(node).faces, rec.mesh.faces)
    disp = node.GetDisplayNode()
    assert disp is not None and np.allclose(disp.GetColor(), (0.95, 0.92, 0.84))
    assert node.GetAttribute("x2recon.structures") == "vertebrae"


@pytest.mark.slow
def test_background_command_gives_the_same_model(logic, scene, drr, checkpoints, direct, tmp_path):
    """The panel's path: the CLI in a separate process, its progress lines, its mesh loaded back."""
    from x2recon.cli import build_parser

    tau, rec = direct
    xnode = drr_to_volume_node(drr, scene, "chest AP")
    cmd, mesh = logic.reconstruct_command(xnode, checkpoints["x2b"], tmp_path, resolution=32, threshold=tau,
                                          device="cpu")
    a = build_parser().parse_args(cmd[3:])
    assert cmd[:4] == [sys.executable, "-m", "x2recon.cli", "reconstruct"] and a.progress_lines
    assert a.resolution == 32 and a.threshold == tau and a.lateral is None and Path(a.geometry).is_file()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    progress = [p for p in map(logic.parse_progress_line, r.stdout.splitlines()) if p]
    assert progress and progress[-1] == (1.0, "done")
    node = logic.load_reconstruction(mesh, xnode, checkpoints["x2b"])
    assert node.GetName() == "chest AP bones" and node.GetAttribute("x2recon.structures") == "vertebrae"
    assert ProjectionGeometry.from_json(node.GetAttribute(GEOMETRY_ATTRIBUTE)) == drr.geometry
    got, want = polydata_points(node), lps_ras_points(rec.mesh.vertices)  # same network, same image (16-bit PNG)
    assert abs(len(got) - len(want)) <= 0.01 * len(want)
    np.testing.assert_allclose(got.min(0), want.min(0), atol=1.0)
    np.testing.assert_allclose(got.max(0), want.max(0), atol=1.0)
    assert logic.parse_progress_line("X2RECON_PROGRESS 42 evaluating occupancy (MISE)") == (0.42, "evaluating occupancy (MISE)")
    assert logic.parse_progress_line("X2RECON_PROGRESS 2/5 case done") is None
    assert logic.parse_progress_line("reconstruct: 40%|####") is None


def test_the_confidence_is_the_models_colour_map(logic, scene, drr, checkpoints, direct, tmp_path):
    """Issue 19 §5: the reconstruction's per-vertex confidence is the model node's active point scalar on a fixed
    0–1 colour scale with a legend — reconstructed in the panel, and loaded back from the background process's
    PLY (which carries it)."""
    from x2recon.io.mesh import write_mesh
    from X2BoneReconLib.logic import CONFIDENCE_TITLE, XRAY_JSON

    tau, rec = direct
    xnode = drr_to_volume_node(drr, scene, "chest AP")
    node = logic.reconstruct(xnode, checkpoints["x2b"], resolution=32, threshold=tau, device="cpu")
    for n in (node, None):
        if n is None:  # the background path: the mesh file with its geometry beside it
            write_mesh(rec.mesh, tmp_path / "bones.ply")
            (tmp_path / XRAY_JSON).write_text(drr.geometry.to_json())
            n = logic.load_reconstruction(tmp_path / "bones.ply", xnode)
        disp = n.GetDisplayNode()
        assert disp.GetActiveScalarName() == CONFIDENCE_TITLE and disp.GetScalarVisibility()
        assert tuple(disp.GetScalarRange()) == (0.0, 1.0) and disp.GetColorNodeID()
        np.testing.assert_allclose(point_scalars(n, CONFIDENCE_TITLE), rec.confidence, atol=1e-6)
    assert logic.ood_warnings == []  # no <stem>_confidence.json beside the mesh: nothing to report
    (tmp_path / "bones_confidence.json").write_text('{"ood_warnings": ["its head-foot profile ..."]}')
    logic.load_reconstruction(tmp_path / "bones.ply", xnode)
    assert logic.ood_warnings == ["its head-foot profile ..."]  # what the background reconstruct found, for the panel


def test_x2b2_takes_the_frontal_and_the_lateral_view(logic, scene, drr, lateral_drr, checkpoints, tmp_path):
    from x2recon.cli import build_parser

    ap = drr_to_volume_node(drr, scene, "AP")
    lat = drr_to_volume_node(lateral_drr, scene, "LAT")
    xs = logic.xrays(logic.model_config(checkpoints["x2b2"]), checkpoints["x2b2"], ap, lat)
    assert [x.geometry.name for x in xs] == ["AP", "LAT"]
    cmd, _ = logic.reconstruct_command(ap, checkpoints["x2b2"], tmp_path, lateral_node=lat, resolution=64, python="py")
    a = build_parser().parse_args(cmd[3:])
    assert cmd[0] == "py" and a.threshold is None and a.resolution == 64
    assert ProjectionGeometry.from_json(Path(a.lateral_geometry)) == lateral_drr.geometry
    from x2recon.io.xray import read_xray

    back = read_xray(a.lateral, geometry=a.lateral_geometry)  # the CLI reads exactly the node's image
    np.testing.assert_array_equal(back.image, xs[1].image)


# -------------------------------------------------------------------------------------- errors
def test_bad_inputs_name_the_problem(logic, scene, drr, lateral_drr, checkpoints, tmp_path, no_bundled):
    xnode = drr_to_volume_node(drr, scene, "chest AP")
    with pytest.raises(X2ReconInputError, match="missing.safetensors: model file not found"):
        logic.reconstruct(xnode, tmp_path / "missing.safetensors", resolution=32)
    with pytest.raises(X2ReconInputError, match="choose a model file"):
        logic.reconstruct(xnode, "", resolution=32)
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(X2ReconInputError, match="not a safetensors"):
        logic.reconstruct(xnode, tmp_path / "junk.safetensors", resolution=32)
    with pytest.raises(X2ReconInputError, match="choose an X-ray"):
        logic.reconstruct(None, checkpoints["x2b"], resolution=32)

    # an X-ray without geometry: the view must be chosen, and must be a view
    bare = drr_to_volume_node(drr, scene, "radiograph")
    bare.RemoveAttribute(GEOMETRY_ATTRIBUTE)
    with pytest.raises(X2ReconInputError, match=r"radiograph: has no X-ray geometry .* choose its view"):
        logic.reconstruct(bare, checkpoints["x2b"], resolution=32)
    with pytest.raises(X2ReconInputError, match="radiograph: view 'XY': unknown view"):
        logic.reconstruct_command(bare, checkpoints["x2b"], tmp_path, resolution=32, view="XY")
    x = xray_node_to_xray(bare, "AP")  # the default chest geometry of the view, the node's pixel size
    assert x.geometry.name == "AP" and x.geometry.size == (64, 64)
    np.testing.assert_allclose(x.geometry.spacing, drr.geometry.spacing)
    np.testing.assert_allclose(x.geometry.isocenter, 0)
    from x2recon.io.xray import display_map

    np.testing.assert_allclose(x.image, display_map(drr.display), atol=1e-6)  # 16-bit, not a DRR: window + CLAHE
    drr_png = drr_to_volume_node(drr, scene, "exported")  # a 16-bit PNG file is a display image already
    drr_png.RemoveAttribute(GEOMETRY_ATTRIBUTE)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "exported.png"))
    drr_png.SetAndObserveStorageNodeID(storage.GetID())
    np.testing.assert_allclose(xray_node_to_xray(drr_png, "PA").image, drr.display / 65535.0, atol=1e-7)

    # the views the checkpoint needs
    lat = drr_to_volume_node(lateral_drr, scene, "chest LAT")
    with pytest.raises(X2ReconInputError, match="x2b2.safetensors: is an X2B2 model: .* choose the lateral X-ray"):
        logic.reconstruct(xnode, checkpoints["x2b2"], resolution=32)
    with pytest.raises(X2ReconInputError, match="X2B \\(single-view\\) model: .* clear the lateral"):
        logic.reconstruct(xnode, checkpoints["x2b"], lateral_node=lat, resolution=32)
    with pytest.raises(ValueError, match="resolution must be"):
        logic.reconstruct(xnode, checkpoints["x2b"], resolution=48)

    # a CT is not an X-ray
    from x2recon.io.volume import Volume

    vol = volume_to_volume_node(Volume(np.zeros((3, 40, 40), np.int16), (1, 1, 1), (0, 0, 0), np.eye(3)), scene, "ct")
    with pytest.raises(X2ReconInputError, match="ct: is a volume of 3 slices"):
        logic.reconstruct(vol, checkpoints["x2b"], resolution=32)
    with pytest.raises(X2ReconInputError, match="choose a ground-truth"):
        logic.compare(xnode_model(scene), None)


def xnode_model(scene):
    v = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]])
    return mesh_to_model_node(v, [[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], scene, "tet")


# ------------------------------------------------------------------------------------- compare
@pytest.mark.slow
def test_compare_with_a_segmentation_equals_the_metrics(logic, scene, drr, direct, ground_truth):
    """The table holds ``x2recon evaluate``'s scores in both protocols: the ground truth cut to the model's
    reconstruction box, world F-score at 0.02 × its edge."""
    from x2recon.metrics.mesh import vertex_distances
    from x2recon.metrics.protocol import flat_row, score

    labels, vert_mesh, whole_mesh = ground_truth
    xnode = drr_to_volume_node(drr, scene, "chest AP")
    model = logic.add_reconstruction(direct[1].mesh, xnode, drr.geometry)  # as reconstruct() adds it
    seg = segmentation_node(scene, labels)
    n_tables = scene.GetNumberOfNodesByClass("vtkMRMLTableNode")
    n_nodes = scene.GetNumberOfNodes()
    # the confidence map add_reconstruction shows already made the colour table and the legend, if it did
    had_color = scene.GetFirstNodeByName(FALLBACK_COLOR_NAME) is not None
    had_legend = any(model.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode")
                     for i in range(model.GetNumberOfDisplayNodes()) if model.GetNthDisplayNode(i) is not None)

    # the bone segments only (TotalSegmentator names), meshed as the dataset builder meshes labels
    gt = logic.reference_mesh(seg, "vertebrae")
    assert len(gt.vertices) == len(vert_mesh.vertices)
    np.testing.assert_allclose(gt.vertices, vert_mesh.vertices, atol=1e-6)
    table = logic.compare(model, seg, structures="vertebrae", n_points=N_POINTS)
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == n_tables + 1
    # the table, plus a colour table and a legend where none existed: no temporary nodes left
    assert scene.GetNumberOfNodes() == n_nodes + 1 + (not had_color) + (not had_legend)
    values = logic.table_values(table)
    pred = model_node_to_mesh(model)
    box = drr.geometry.box_size
    expected = flat_row(score(pred, vert_mesh, n_points=N_POINTS, box=drr.geometry.box_bounds(), tau_mm=0.02 * box))
    d = vertex_distances(pred.vertices, vert_mesh)
    expected.update(mean_distance_mm=d.mean(), max_distance_mm=d.max(), box_size_mm=box)
    rows = metric_rows(0.02, 0.02 * box)
    assert [r[1] for r in rows] == list(values)
    for key, label in rows:
        assert values[label] == pytest.approx(float(expected[key]), rel=1e-6, abs=1e-9), label
    assert {"IoU (paper)", "IoU (world)", "Chamfer-L1 (paper, unit box)", "Chamfer-L1 (world, mm)",
            "F-score@0.02 (paper)", "F-score@7.68 mm (world)", "NC", "maxe (mm)", "maye (mm)", "maze (mm)",
            "Mean surface distance (mm)", "Max surface distance (mm)"} <= set(values)
    assert not any("box units" in label for label in values)
    assert table.GetTable().GetNumberOfColumns() == 2

    # the heat map: distances on the model's points, active, coloured, with a legend
    np.testing.assert_allclose(point_scalars(model, DISTANCE_ARRAY), d, atol=1e-9)
    disp = model.GetDisplayNode()
    assert disp.GetActiveScalarName() == DISTANCE_ARRAY and disp.GetScalarVisibility()
    assert disp.GetScalarRangeFlag() == slicer.vtkMRMLDisplayNode.UseManualScalarRange
    assert disp.GetScalarRange() == (0.0, max(1.0, float(np.ceil(np.percentile(d, 95)))))
    color = disp.GetColorNode()
    assert color is not None and color.GetName() == FALLBACK_COLOR_NAME and color.GetNumberOfColors() == 256
    legends = [model.GetNthDisplayNode(i) for i in range(model.GetNumberOfDisplayNodes())]
    legends = [n for n in legends if n.IsA("vtkMRMLColorLegendDisplayNode")]
    assert len(legends) == 1 and legends[0].GetPrimaryDisplayNode() is disp
    assert legends[0].GetTitleText() == DISTANCE_ARRAY

    # all segments merged; a second comparison reuses the colour table and the legend
    whole = logic.reference_mesh(seg)
    assert len(whole.vertices) == len(whole_mesh.vertices)
    logic.compare(model, seg, n_points=2000, max_distance=25.0)
    assert disp.GetScalarRange() == (0.0, 25.0)
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 1
    assert sum(model.GetNthDisplayNode(i).IsA("vtkMRMLColorLegendDisplayNode")
               for i in range(model.GetNumberOfDisplayNodes())) == 1
    with pytest.raises(X2ReconInputError, match="ground truth: no segment is one of the structures 'rib_right_3'"):
        logic.reference_mesh(seg, "rib_right_3")


@pytest.mark.slow
def test_compare_with_a_model_node_and_with_itself(logic, scene, ground_truth, tmp_path, capsys):
    """A model node without geometry is scored whole, as ``x2recon compare`` scores two mesh files: the
    panel's paper and world rows are that command's JSON, protocol by protocol."""
    import json

    from x2recon.cli import main
    from x2recon.io.mesh import write_mesh
    from x2recon.metrics.mesh import vertex_distances

    _, vert_mesh, _ = ground_truth
    moved = vert_mesh.copy()
    moved.vertices = moved.vertices + [0.0, 0.0, 4.0]  # 4 mm towards the head
    gt_node = mesh_to_model_node(vert_mesh.vertices, vert_mesh.faces, scene, "gt model")
    pred_node = mesh_to_model_node(moved.vertices, moved.faces, scene, "prediction")
    values = logic.table_values(logic.compare(pred_node, gt_node, n_points=N_POINTS, box_size=300.0))
    write_mesh(moved, tmp_path / "pred.ply")
    write_mesh(vert_mesh, tmp_path / "gt.ply")
    cli = {}
    for protocol, tau in (("paper", "0.02"), ("world", "6")):  # world: 0.02 × the 300 mm box
        capsys.readouterr()
        assert main(["compare", str(tmp_path / "pred.ply"), str(tmp_path / "gt.ply"), "--protocol", protocol,
                     "--points", str(N_POINTS), "--tau", tau]) == 0
        cli[protocol] = json.loads(capsys.readouterr().out)
    for protocol in ("paper", "world"):
        c = cli[protocol]
        assert values[f"IoU ({protocol})"] == pytest.approx(c["iou"], rel=1e-6)
        assert values[f"IoU(vox) ({protocol}, {'32' if protocol == 'paper' else '64'}³)"] == pytest.approx(c["iou_vox"], rel=1e-6)
    assert values["IoU (paper)"] < 0.9
    assert values["Chamfer-L1 (paper, unit box)"] == pytest.approx(cli["paper"]["chamfer_l1"], rel=1e-6)
    assert values["Chamfer-L1 (world, mm)"] == pytest.approx(cli["world"]["chamfer_l1"], rel=1e-6)
    assert values["F-score@0.02 (paper)"] == pytest.approx(cli["paper"]["fscore"], rel=1e-6)
    assert values["F-score@6 mm (world)"] == pytest.approx(cli["world"]["fscore"], rel=1e-6)
    assert values["maze (mm)"] == pytest.approx(cli["paper"]["maze"], rel=1e-6)
    # the protocols' relation: paper distances are world mm over the ground truth's longest edge
    edge = float(np.max(vert_mesh.extents))
    assert values["Ground truth's longest edge (mm)"] == pytest.approx(edge, rel=1e-6)
    assert values["Chamfer-L1 (paper, unit box)"] == pytest.approx(values["Chamfer-L1 (world, mm)"] / edge, rel=1e-6)
    assert 0.0 < values["Chamfer-L1 (world, mm)"] <= 4.0 + 1e-6  # a 4 mm shift moves no point further
    assert values["Box size (mm)"] == 300.0 and values["Ground truth cut to the box (1 = yes)"] == 0.0
    d = point_scalars(pred_node, DISTANCE_ARRAY)
    np.testing.assert_allclose(d, vertex_distances(moved.vertices, vert_mesh), atol=1e-9)
    assert 0.5 < d.max() <= 4.0 + 1e-6

    same = logic.table_values(logic.compare(gt_node, gt_node, n_points=N_POINTS))
    assert same["IoU (paper)"] == pytest.approx(1.0) and same["IoU (world)"] == pytest.approx(1.0)
    assert same["Max surface distance (mm)"] < 1e-6
    # against itself only the sampling remains: ~1 mm between two sets of 5 000 samples of the vertebrae
    assert same["Chamfer-L1 (world, mm)"] < 2.0 and same["Chamfer-L1 (paper, unit box)"] < 0.02
    assert same["F-score@0.02 (paper)"] > 0.9  # 0.02 of the vertebrae's longest edge: ~2 mm
    assert same["F-score@7.68 mm (world)"] == pytest.approx(1.0)  # no geometry: 0.02 × the default 384 mm box
    assert np.abs(point_scalars(gt_node, DISTANCE_ARRAY)).max() < 1e-6


def test_parent_transforms_are_applied_to_model_nodes(scene, ground_truth):
    import vtk

    _, vert_mesh, _ = ground_truth
    node = mesh_to_model_node(vert_mesh.vertices, vert_mesh.faces, scene, "moved")
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 10.0)  # +10 mm towards Right = −10 mm in LPS x
    t.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(t.GetID())
    mesh = model_node_to_mesh(node)
    np.testing.assert_allclose(mesh.vertices, vert_mesh.vertices + [-10.0, 0, 0], atol=1e-9)
    np.testing.assert_array_equal(mesh.faces, vert_mesh.faces)


def test_scene_colour_map_is_used_when_present(logic, scene):
    cold = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "ColdToHotRainbow")
    assert logic.distance_color_node() is cold
    model = xnode_model(scene)
    logic.show_distance_map(model, [0.0, 1.0, 2.0, 3.0])
    assert model.GetDisplayNode().GetColorNodeID() == cold.GetID()
    assert scene.GetFirstNodeByName(FALLBACK_COLOR_NAME) is None


def test_logic_imports_without_qt_and_without_heavy_packages():
    code = ("import sys\nsys.modules['qt'] = sys.modules['ctk'] = sys.modules['slicer.util'] = None\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'X2BoneRecon')!r})\n"
            "import X2BoneReconLib.logic\n"
            "heavy = [m for m in ('torch', 'timm', 'trimesh', 'x2recon.x2b.reconstruct', 'x2recon.metrics') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------ X2BR pieces
def test_detections_are_boxes_on_the_detector_plane(logic, scene, drr):
    """A detection box's curve projects back onto the box's corners, in RAS, named by class and confidence."""
    g = drr.geometry
    dets = [{"name": "thoracic", "confidence": 0.87, "box": [10.0, 12.5, 40.0, 50.0]},
            {"name": "rib_left_4", "confidence": 0.4, "box": [0.0, 0.0, 5.0, 6.0]}]
    curves = logic.show_detections(dets, g, None, group="g1")
    assert [c.GetName() for c in curves] == ["thoracic 0.87", "rib_left_4 0.40"]
    pts = np.array([curves[0].GetNthControlPointPosition(i) for i in range(4)])
    uv = g.project(lps_ras_points(pts))
    np.testing.assert_allclose(uv, [[10, 12.5], [40, 12.5], [40, 50], [10, 50]], atol=1e-6)
    assert np.allclose(g.depth(lps_ras_points(pts)), g.sdd)  # on the detector plane
    assert curves[1].GetAttribute("x2recon.x2br.refine") == "g1"


def test_structure_colours_are_stable_and_distinct():
    from X2BoneReconLib.logic import structure_color

    assert structure_color("vertebrae_T7") == structure_color("vertebrae_T7")
    cols = {n: structure_color(n) for n in ("vertebrae_C1", "vertebrae_L5", "rib_left_3", "rib_left_4", "rib_right_3",
                                            "sternum")}
    assert len(set(cols.values())) == len(cols)
    assert all(0 <= c <= 1 for rgb in cols.values() for c in rgb)


@pytest.mark.slow
def test_compare_methods_puts_each_reconstruction_in_a_column(logic, scene, ground_truth):
    from x2recon.metrics.protocol import score

    labels, vert, whole = ground_truth
    a = mesh_to_model_node(vert.vertices, vert.faces, scene, "X2B result")
    b = mesh_to_model_node(whole.vertices, whole.faces, scene, "X2BR result")
    ref = mesh_to_model_node(vert.vertices, vert.faces, scene, "truth")
    table = logic.compare_methods({"X2B": a, "X2BR": b}, ref, n_points=N_POINTS)
    t = table.GetTable()
    assert [t.GetColumnName(i) for i in range(t.GetNumberOfColumns())] == ["Metric", "X2B", "X2BR"]
    rows = {t.GetColumnByName("Metric").GetValue(i): i for i in range(t.GetNumberOfRows())}
    assert t.GetColumnByName("X2B").GetValue(rows["IoU (paper)"]) > 0.99  # the truth itself
    expect = score(whole, vert, n_points=N_POINTS)
    for protocol in ("paper", "world"):
        got = t.GetColumnByName("X2BR").GetValue(rows[f"IoU ({protocol})"])
        assert got == pytest.approx(expect[protocol]["iou"], rel=1e-6)


def test_refine_command_needs_the_detector_and_templates(logic, scene, drr, checkpoints, tmp_path, no_bundled):
    node = drr_to_volume_node(drr, scene, "AP")
    with pytest.raises(X2ReconInputError, match="detector"):
        logic.reconstruct_command(node, checkpoints["x2b"], tmp_path, resolution=32, refine="template",
                                  templates=tmp_path)
    (tmp_path / "det.pt").write_bytes(b"x")
    cmd, mesh = logic.reconstruct_command(node, checkpoints["x2b"], tmp_path / "run", resolution=32, refine="template",
                                          detector=tmp_path / "det.pt", templates=tmp_path, registration="cpd")
    i = cmd.index("--refine")
    assert cmd[i:i + 8] == ["--refine", "template", "--detector", str(tmp_path / "det.pt"), "--templates",
                            str(tmp_path), "--registration", "cpd"]


def test_empty_paths_mean_the_bundled_model_detector_and_templates(logic, scene, drr, checkpoints, tmp_path,
                                                                  monkeypatch):
    """The panel starts with the bundled files (``bundled_files``), and an empty path in the logic means
    the bundled one; a chosen path wins.  The bundled folder is a stand-in in tmp_path."""
    import shutil

    import x2recon.resources.registry as registry
    from x2recon.resources import DEFAULT_BONE_MODEL

    models = tmp_path / "models"
    (models / "templates").mkdir(parents=True)
    monkeypatch.setattr(registry, "MODELS_DIR", models)
    assert X2BoneReconLogic.bundled_files() == {}
    model = shutil.copyfile(checkpoints["x2b"], models / registry.ASSETS[DEFAULT_BONE_MODEL].file)
    (models / "detector.safetensors").write_bytes(b"stand-in")
    (models / "templates" / "library.json").write_text("{}")
    assert X2BoneReconLogic.bundled_files() == {"modelPath": model, "detectorPath": models / "detector.safetensors",
                                                "templatesPath": models / "templates"}
    node = drr_to_volume_node(drr, scene, "AP")
    cmd, _ = logic.reconstruct_command(node, ".", tmp_path / "a", resolution=32, refine="template")
    assert cmd[cmd.index("--model") + 1] == str(model)
    assert cmd[cmd.index("--detector") + 1] == str(models / "detector.safetensors")
    assert cmd[cmd.index("--templates") + 1] == str(models / "templates")
    (tmp_path / "det.pt").write_bytes(b"x")
    cmd, _ = logic.reconstruct_command(node, checkpoints["x2b"], tmp_path / "b", resolution=32, refine="template",
                                       detector=tmp_path / "det.pt")
    assert cmd[cmd.index("--model") + 1] == str(checkpoints["x2b"])
    assert cmd[cmd.index("--detector") + 1] == str(tmp_path / "det.pt")


def test_the_panel_says_how_an_xray_was_placed_and_draws_the_box(logic, scene, drr, checkpoints, tmp_path):
    """An X-ray node without geometry: the logic keeps its placement (assumed values flagged, the override
    named); the reconstruction box drawn on the detector plane is the hull of the box's projected corners."""
    bare = drr_to_volume_node(drr, scene, "radiograph")
    bare.RemoveAttribute(GEOMETRY_ATTRIBUTE)
    logic.reconstruct_command(bare, checkpoints["x2b"], tmp_path, resolution=32, view="AP")
    (p,) = logic.placements
    assert p is not None and p.assumed
    lines = logic.placement_lines(logic.placements)
    assert lines[0].startswith("X-ray: geometry: ASSUMED") and any("geometry JSON" in ln for ln in lines)
    with_geom = drr_to_volume_node(drr, scene, "drr")
    logic.reconstruct_command(with_geom, checkpoints["x2b"], tmp_path / "b", resolution=32)
    assert logic.placements == [None] and "attribute" in logic.placement_lines(logic.placements)[0]
    g = drr.geometry
    node = logic.show_reconstruction_box(g, bare)
    pts = lps_ras_points(np.array([node.GetNthControlPointPosition(i) for i in range(node.GetNumberOfControlPoints())]))
    assert np.allclose(g.depth(pts), g.sdd)  # on the detector plane
    lo, hi = g.box_bounds()
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    uv, cuv = np.asarray(g.project(pts)), np.asarray(g.project(corners))
    assert np.allclose(uv.min(0), cuv.min(0)) and np.allclose(uv.max(0), cuv.max(0))
    assert node.GetAttribute("x2recon.io.xray") == bare.GetID()


@pytest.mark.slow  # the bundled skeleton model and two DRRs in its training geometry (~30 s on 2 loaded cores)
def test_the_panel_names_an_xray_unlike_the_training_images(logic, scene, chest_half):
    """Issue 19 §5 in the panel: the sample's lateral DRR given to the bundled (thorax-framed) skeleton model as its
    frontal view is named, with the reason, in ``ood_warnings``; its AP DRR is not."""
    from dataclasses import replace

    from x2recon.dataset.config import BuildConfig
    from x2recon.dataset.thorax import lung_center
    from x2recon.drr.render import render_drr
    from x2recon.io.volume import read_ct
    from x2recon.nn.checkpoint import read_config
    from x2recon.resources import bundled

    b = read_config(bundled("skeleton"))["dataset"]["build"]
    build = BuildConfig(drr_size=64, sdd=b["sdd"], sod=b["sod"], detector_mm=b["detector_mm"], box_size=b["box_size"],
                        isocenter="thorax")
    ct = read_ct(chest_half[0])
    ap = render_drr(ct, build.geometry("AP", lung_center(ct)))
    lat = replace(render_drr(ct, build.geometry("LAT", lung_center(ct))), geometry=ap.geometry)
    logic.reconstruct(drr_to_volume_node(ap, scene, "AP"), "", resolution=32, device="cpu")
    assert logic.ood_warnings == []
    logic.reconstruct(drr_to_volume_node(lat, scene, "LAT as AP"), "", resolution=32, device="cpu")
    assert len(logic.ood_warnings) == 1 and "left–right profile" in logic.ood_warnings[0]
