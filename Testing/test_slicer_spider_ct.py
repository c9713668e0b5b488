"""SpiderCT logic with the real MRML of slicer-core: X-ray pair (or CT) nodes + a SPIDER model → the
background command; its CT and labelmap → a CT node (window, RAS geometry, volume rendering) and a
named segmentation with closed surfaces; comparison with ground truth → SPIDER's metrics table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is part of the test extra")
pytest.importorskip("safetensors", reason="checkpoints are safetensors files")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SpiderCT"))

from SpiderCTLib.logic import (  # noqa: E402
    LABELS_ATTRIBUTE,
    SEGMENTATION_ATTRIBUTE,
    WINDOWS,
    SpiderCTLogic,
    SpiderJob,
    metric_rows,
    segment_class,
)

from x2recon.errors import X2ReconInputError  # noqa: E402
from x2recon.geometry import ProjectionGeometry  # noqa: E402
from x2recon.io.volume import Volume  # noqa: E402
from x2recon.slicer.mrml import (  # noqa: E402
    GEOMETRY_ATTRIBUTE,
    drr_to_volume_node,
    lps_ras_points,
    segment_ids,
    volume_node_to_volume,
    volume_to_volume_node,
    xray_node_to_xray,
)
from x2recon.slicer.process import process_environment  # noqa: E402

THORACIC = {f"vertebrae_T{i}" for i in range(1, 13)}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def logic(scene):
    return SpiderCTLogic(scene)


def _spider_checkpoint(path, decoder="shared", views=("AP", "LAT")):
    import torch

    from x2recon.dataset.config import BuildConfig
    from x2recon.dataset.spider_data import class_members
    from x2recon.nn.checkpoint import save_checkpoint
    from x2recon.spider.network import SpiderConfig, build_spider

    torch.manual_seed(0)
    classes = [] if decoder == "volume-only" else ["thoracic", "ribs"]
    cfg = SpiderConfig(views=list(views), image_size=32, unet_channels=[8, 16], feature_channels=8, hidden=16,
                       layers=1, classes=classes, members=class_members(classes) if classes else {}, decoder=decoder,
                       hash=dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                                 per_level_scale=None, finest_resolution=32), prefer_tcnn=False)
    build = BuildConfig(views=list(views), drr_size=64, structures=["vertebrae"]).to_dict()
    return save_checkpoint(path, build_spider(cfg).eval(), {"network": "spider", "model": cfg.to_dict(),
                                                            "dataset": {"build": build}})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Random-weight SPIDER checkpoints (segmenting and volume-only) and an X2B one: for the inputs,
    the command line and the errors (the trained tiny_spider_model is for the end-to-end runs)."""
    d = tmp_path_factory.mktemp("spider_ckpt")
    out = {"spider": _spider_checkpoint(d / "spider.safetensors"),
           "volume_only": _spider_checkpoint(d / "vol.safetensors", decoder="volume-only")}
    try:
        import timm  # noqa: F401
        import torch

        from x2recon.nn.checkpoint import save_checkpoint
        from x2recon.x2b.network import X2BConfig, build_model

        torch.manual_seed(0)
        cfg = X2BConfig(backbone="convnext_atto", image_size=64, hidden=32, n_blocks=2, views=["AP"])
        out["x2b"] = save_checkpoint(d / "x2b.safetensors", build_model(cfg).eval(),
                                     {"network": "x2b", "model": cfg.to_dict()})
    except ImportError:
        out["x2b"] = None
    return out


def xray_node(scene, folder: Path, view: str, name: str | None = None):
    """A dataset DRR (16-bit PNG + geometry JSON) as the X-ray volume node X2DatasetBuilder makes."""
    from types import SimpleNamespace

    from x2recon.io.image import read_png

    g = ProjectionGeometry.from_json(folder / "images" / f"{view}.json")
    drr = SimpleNamespace(display=read_png(folder / "images" / f"{view}.png"), geometry=g)
    return drr_to_volume_node(drr, scene, name or f"chest {view}")


@pytest.fixture(scope="module")
def case(tiny_x2b_dataset):
    return tiny_x2b_dataset / "cases" / "chest"


@pytest.fixture(scope="module")
def chest(chest_half):
    from x2recon.io.volume import read_ct, read_labelmap

    return read_ct(chest_half[0]), read_labelmap(chest_half[1])


def labelmap_node(scene, labels: Volume, name="gt labels"):
    return volume_to_volume_node(labels, scene, name, "vtkMRMLLabelMapVolumeNode")


def segmentation_node(scene, labels: Volume, name="ground truth"):
    """A segmentation node from a TotalSegmentator labelmap, segments named by their names."""
    from x2recon.structures import totalseg_v2

    lab = labelmap_node(scene, labels, "tmp")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(lab, seg)
    scene.RemoveNode(lab)
    names = totalseg_v2()
    segm = seg.GetSegmentation()
    for sid in segment_ids(seg):
        s = segm.GetSegment(sid)
        s.SetName(names[s.GetLabelValue()])
    return seg


def subset(labels: Volume, names) -> Volume:
    from x2recon.structures import name_to_id

    ids = [name_to_id()[n] for n in names]
    return labels.with_array(np.where(np.isin(labels.array, ids), labels.array, 0).astype(np.uint8))


# ---------------------------------------------------------------------------- the command line
def test_command_for_an_xray_pair_writes_the_nodes_images_and_geometry(logic, scene, case, checkpoints, tmp_path):
    from x2recon.cli import build_parser
    from x2recon.io.xray import read_xray

    ap, lat = xray_node(scene, case, "AP"), xray_node(scene, case, "LAT")
    cmd, job = logic.reconstruct_command(checkpoints["spider"], tmp_path, ap, lat, resolution=64, device="cpu",
                                         chunk=5000, python="PythonSlicer")
    assert cmd[:4] == ["PythonSlicer", "-m", "x2recon.cli", "spider"]
    a = build_parser().parse_args(cmd[3:])
    assert a.progress_lines and a.quiet and a.resolution == 64 and a.device == "cpu" and a.chunk == 5000
    assert a.model == str(checkpoints["spider"]) and a.out == str(job.ct) and a.labels == str(job.labels)
    assert job.name == "chest AP SPIDER" and not job.from_ct and job.ct.parent == tmp_path
    for node, img, geo in ((ap, a.pa, a.pa_geometry), (lat, a.lat, a.lat_geometry)):
        x = xray_node_to_xray(node)
        back = read_xray(img, geometry=geo)  # exactly what the CLI will read
        np.testing.assert_array_equal(back.image, x.image)
        assert back.geometry == ProjectionGeometry.from_json(node.GetAttribute(GEOMETRY_ATTRIBUTE))
    # a volume-only model writes no labelmap
    cmd, job = logic.reconstruct_command(checkpoints["volume_only"], tmp_path / "v", ap, lat)
    assert job.labels is None and "--labels" not in cmd and "--chunk" not in cmd and cmd[0] == sys.executable


def test_radiograph_without_geometry_gets_the_models_training_geometry(logic, scene, case, checkpoints, tmp_path):
    from x2recon.nn.checkpoint import read_config
    from x2recon.spider.inference import training_geometry

    ap, lat = xray_node(scene, case, "AP", "film AP"), xray_node(scene, case, "LAT", "film LAT")
    for n in (ap, lat):
        n.RemoveAttribute(GEOMETRY_ATTRIBUTE)
    cfg = read_config(checkpoints["spider"])
    xs = logic.xray_pair(cfg, checkpoints["spider"], ap, lat)
    assert [x.geometry for x in xs] == [training_geometry(cfg, "AP", size=(128, 128)),
                                        training_geometry(cfg, "LAT", size=(128, 128))]
    np.testing.assert_allclose(xs[0].geometry.isocenter, 0.0)
    cmd, job = logic.reconstruct_command(checkpoints["spider"], tmp_path, ap, lat)
    assert ProjectionGeometry.from_json(job.lateral.with_suffix(".json")) == xs[1].geometry


def test_an_empty_model_path_means_the_bundled_spider_model(logic, scene, case, checkpoints, tmp_path, monkeypatch):
    """The panel starts with the bundled SPIDER model (``bundled_files``) and an empty path in the logic
    means it; a chosen path wins.  The bundled folder is a stand-in in tmp_path."""
    import shutil

    import x2recon.resources.registry as registry

    monkeypatch.setattr(registry, "MODELS_DIR", tmp_path / "models")
    assert SpiderCTLogic.bundled_files() == {}
    (tmp_path / "models").mkdir()
    model = shutil.copyfile(checkpoints["spider"], tmp_path / "models" / "spider_skeleton.safetensors")
    assert SpiderCTLogic.bundled_files() == {"modelPath": model}
    ap, lat = xray_node(scene, case, "AP"), xray_node(scene, case, "LAT")
    cmd, job = logic.reconstruct_command("", tmp_path / "a", ap, lat)
    assert cmd[cmd.index("--model") + 1] == str(model) == job.model
    cmd, job = logic.reconstruct_command(checkpoints["volume_only"], tmp_path / "b", ap, lat)
    assert cmd[cmd.index("--model") + 1] == str(checkpoints["volume_only"])


def test_missing_or_wrong_inputs_name_the_problem(logic, scene, case, checkpoints, tmp_path, monkeypatch):
    import x2recon.resources.registry as registry

    monkeypatch.setattr(registry, "MODELS_DIR", tmp_path / "no_models")  # no bundled SPIDER: '' means 'choose one'
    ap, lat = xray_node(scene, case, "AP"), xray_node(scene, case, "LAT")
    ck = checkpoints["spider"]
    with pytest.raises(X2ReconInputError, match="choose a SPIDER model file"):
        logic.reconstruct_command("", tmp_path, ap, lat)
    with pytest.raises(X2ReconInputError, match="missing.safetensors: model file not found"):
        logic.reconstruct_command(tmp_path / "missing.safetensors", tmp_path, ap, lat)
    (tmp_path / "junk.safetensors").write_bytes(b"not a model")
    with pytest.raises(X2ReconInputError, match="not a safetensors"):
        logic.reconstruct_command(tmp_path / "junk.safetensors", tmp_path, ap, lat)
    if checkpoints["x2b"] is not None:
        with pytest.raises(X2ReconInputError, match="x2b.safetensors: network 'x2b' is not a SPIDER model"):
            logic.reconstruct_command(checkpoints["x2b"], tmp_path, ap, lat)
    with pytest.raises(X2ReconInputError, match=r"choose the frontal \(AP\) X-ray"):
        logic.reconstruct_command(ck, tmp_path, None, lat)
    with pytest.raises(X2ReconInputError, match=r"choose the lateral \(LAT\) X-ray"):
        logic.reconstruct_command(ck, tmp_path, ap, None)
    with pytest.raises(X2ReconInputError, match="chest AP: is chosen as both the frontal and the lateral"):
        logic.reconstruct_command(ck, tmp_path, ap, ap)
    ap2 = xray_node(scene, case, "AP", "another AP")
    with pytest.raises(X2ReconInputError, match="another AP: the views are 0° apart; SPIDER needs a frontal and a lateral"):
        logic.reconstruct_command(ck, tmp_path, ap, ap2)
    vol = volume_to_volume_node(Volume(np.zeros((3, 40, 40), np.int16), (1, 1, 1), (0, 0, 0), np.eye(3)), scene, "ct")
    with pytest.raises(X2ReconInputError, match="ct: is a volume of 3 slices"):
        logic.reconstruct_command(ck, tmp_path, ap, vol)
    with pytest.raises(ValueError, match="resolution must be at least 2"):
        logic.reconstruct_command(ck, tmp_path, ap, lat, resolution=1)
    with pytest.raises(ValueError, match="precision"):
        logic.reconstruct_command(ck, tmp_path, ap, lat, precision="fp8")
    labels = labelmap_node(scene, Volume(np.zeros((4, 4, 4), np.uint8), (1, 1, 1), (0, 0, 0), np.eye(3)))
    with pytest.raises(X2ReconInputError, match="gt labels: is not a CT"):
        logic.reconstruct_command(ck, tmp_path, ct_node=labels)
    with pytest.raises(X2ReconInputError, match="choose the reconstructed CT"):
        logic.compare(None, None, vol)
    with pytest.raises(X2ReconInputError, match="choose a ground-truth CT and/or segmentation"):
        logic.compare(vol)


def test_command_for_a_ct_writes_the_ct_and_its_labels(logic, scene, chest, checkpoints, tmp_path):
    from x2recon.io.volume import read_ct, read_labelmap

    ct, labels = chest
    ct_node = volume_to_volume_node(ct, scene, "chest CT")
    sub = subset(labels, ["vertebrae_T7", "vertebrae_T8", "rib_left_5"])
    seg = segmentation_node(scene, sub)
    n_nodes = scene.GetNumberOfNodes()
    cmd, job = logic.reconstruct_command(checkpoints["spider"], tmp_path, ct_node=ct_node, ct_labels_node=seg,
                                         resolution=16, python="py")
    assert scene.GetNumberOfNodes() == n_nodes  # no temporary node left
    assert cmd[:4] == ["py", "-m", "x2recon.cli", "spider"] and job.from_ct and job.name == "chest CT SPIDER"
    from x2recon.cli import build_parser

    a = build_parser().parse_args(cmd[3:])  # the CLI renders the pair from the CT into --pa / --lat
    assert a.pa == str(job.frontal) and a.lat == str(job.lateral) and a.pa_geometry == str(job.frontal.with_suffix(".json"))
    assert a.resolution == 16 and a.labels == str(job.labels) and a.progress_lines
    back = read_ct(a.from_ct)  # the node's CT, in LPS, as x2recon reads it
    assert back.same_grid(ct) and np.array_equal(back.array, ct.array)
    lab = read_labelmap(a.from_ct_labels)  # TotalSegmentator ids on the CT's grid
    assert lab.same_grid(ct) and np.array_equal(lab.array, sub.array)
    # a labelmap node is taken as TotalSegmentator ids
    cmd, _ = logic.reconstruct_command(checkpoints["spider"], tmp_path, ct_node=ct_node,
                                       ct_labels_node=labelmap_node(scene, sub))
    assert np.array_equal(read_labelmap(build_parser().parse_args(cmd[3:]).from_ct_labels).array, sub.array)
    cmd, _ = logic.reconstruct_command(checkpoints["spider"], tmp_path, ct_node=ct_node)
    assert build_parser().parse_args(cmd[3:]).from_ct_labels is None


# ----------------------------------------------------------------------------- results → nodes
def _write_result(tmp_path, ct: Volume, labels: Volume | None, names=None, members=None):
    from x2recon.spider.inference import SpiderResult, write_result

    res = SpiderResult(ct, labels, names or {}, members or {}, 0.0, "cpu")
    write_result(res, tmp_path / "ct.nii", tmp_path / "labels.nii" if labels is not None else None)
    return SpiderJob(tmp_path, tmp_path / "ct.nii", tmp_path / "labels.nii" if labels is not None else None,
                     tmp_path / "frontal.png", tmp_path / "lateral.png", "case", model="m.safetensors")


def test_results_become_a_windowed_ct_and_a_named_segmentation_in_ras(logic, scene, tmp_path):
    """A voxel at a known LPS point lands at the matching RAS point, in the CT and in the segments."""
    import vtk

    n, h = 24, 4.0
    origin = np.array([-40.0, 30.0, -100.0])  # LPS mm of voxel (0, 0, 0)
    ct = Volume(np.full((n, n, n), -1000, np.int16), (h, h, h), origin, np.eye(3))
    ct.array[10, 5, 3] = 1200  # [k, j, i]: LPS (origin + (3, 5, 10)·h)
    lab = ct.with_array(np.zeros((n, n, n), np.uint8))
    lab.array[8:12, 4:9, 2:6] = 1  # "thoracic"
    lab.array[14:18, 15:20, 16:22] = 2  # "ribs"
    job = _write_result(tmp_path, ct, lab, {1: "thoracic", 2: "ribs", 3: "sternum"},
                        {"thoracic": sorted(THORACIC), "ribs": ["rib_left_1"], "sternum": ["sternum"]})
    comp = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # a slice view's (the application makes three)
    vr_logic = slicer.vtkSlicerVolumeRenderingLogic()
    vr_logic.SetMRMLScene(scene)
    nodes = logic.load_results(job, window="bone", vr_logic=vr_logic)
    ct_node, seg = nodes["ct"], nodes["segmentation"]
    assert nodes["xrays"] == [] and ct_node.GetName() == "case CT" and seg.GetName() == "case segmentation"
    assert ct_node.GetAttribute(SEGMENTATION_ATTRIBUTE) == seg.GetID()

    # CT: geometry (IJK → RAS), values, window, slice views, volume rendering
    m = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    lps = origin + np.array([3, 5, 10]) * h
    np.testing.assert_allclose(ijk_to_ras @ [3, 5, 10, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-9)
    back = volume_node_to_volume(ct_node)
    assert back.same_grid(ct) and np.array_equal(back.array, ct.array)
    disp = ct_node.GetDisplayNode()
    assert not disp.GetAutoWindowLevel() and (disp.GetWindow(), disp.GetLevel()) == WINDOWS["bone"] == (1500, 300)
    logic.set_window(ct_node, "lung")
    assert (disp.GetWindow(), disp.GetLevel()) == (1500, -600)
    assert comp.GetBackgroundVolumeID() == ct_node.GetID()
    vr = nodes["volume_rendering"]
    assert vr is not None and vr.GetVisibility() and vr.GetVolumeNodeID() == ct_node.GetID()
    opacity = vr.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
    assert opacity.GetValue(-1000) == 0 and opacity.GetValue(40) == 0 and opacity.GetValue(1200) > 0.5

    # segmentation: one segment per label present, named, tagged and coloured by class
    segm = seg.GetSegmentation()
    sids = segment_ids(seg)
    assert [segm.GetSegment(s).GetName() for s in sids] == ["thoracic", "ribs"]
    assert [segment_class(segm.GetSegment(s)) for s in sids] == ["thoracic", "ribs"]
    from x2recon.slicer.mrml import structure_color

    np.testing.assert_allclose(segm.GetSegment(sids[0]).GetColor(), structure_color("thoracic"), atol=1e-6)
    info = json.loads(seg.GetAttribute(LABELS_ATTRIBUTE))
    assert info["labels"] == {"1": "thoracic", "2": "ribs", "3": "sternum"} and info["members"]["ribs"] == ["rib_left_1"]
    for sid, (k0, j0, i0), (k1, j1, i1) in ((sids[0], (8, 4, 2), (12, 9, 6)), (sids[1], (14, 15, 16), (18, 20, 22))):
        oriented = slicer.vtkOrientedImageData()
        assert seg.GetBinaryLabelmapRepresentation(sid, oriented)
        m = vtk.vtkMatrix4x4()
        oriented.GetImageToWorldMatrix(m)
        A = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        from vtk.util import numpy_support

        dims = oriented.GetDimensions()
        ext = oriented.GetExtent()
        arr = numpy_support.vtk_to_numpy(oriented.GetPointData().GetScalars()).reshape(dims[::-1])
        kk, jj, ii = np.nonzero(arr)  # a copy of this segment alone (0/1)
        ras = (A @ np.stack([ii + ext[0], jj + ext[2], kk + ext[4], np.ones_like(ii)]))[:3].T
        want = np.stack(np.meshgrid(np.arange(i0, i1), np.arange(j0, j1), np.arange(k0, k1), indexing="ij"), -1)
        want = lps_ras_points(origin + want.reshape(-1, 3) * h)
        assert len(ras) == len(want)
        np.testing.assert_allclose(np.sort(ras, 0), np.sort(want, 0), atol=1e-6)
        # closed surfaces for the 3D view, around the voxels (RAS)
        poly = vtk.vtkPolyData()
        assert seg.GetClosedSurfaceRepresentation(sid, poly) and poly.GetNumberOfPoints() > 0
        b = np.array(poly.GetBounds()).reshape(3, 2)
        assert np.all(b[:, 0] >= want.min(0) - h) and np.all(b[:, 1] <= want.max(0) + h)
    assert seg.GetDisplayNode() is not None
    # only the nodes the results are: no temporary labelmap or colour table left behind
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 0


def test_volume_only_results_and_a_bare_scene(logic, scene, tmp_path):
    ct = Volume(np.full((8, 8, 8), -1000, np.int16), (2, 2, 2), (0, 0, 0), np.eye(3))
    nodes = logic.load_results(_write_result(tmp_path, ct, None))  # no volume rendering module here
    assert nodes["segmentation"] is None and nodes["volume_rendering"] is None and nodes["ct"] is not None
    with pytest.raises(X2ReconInputError, match="wrote no CT"):
        logic.load_results(SpiderJob(tmp_path, tmp_path / "none.nii", None, tmp_path / "a.png", tmp_path / "b.png", "x"))


# ------------------------------------------------------------------------------------- compare
@pytest.fixture(scope="module")
def reconstruction(chest):
    """A stand-in reconstruction of chest_half on a 48³ box grid: its CT plus noise, its thoracic
    vertebrae one voxel too far left — and what x2recon computes for it directly."""
    from x2recon.dataset.spider_targets import resample_to_box
    from x2recon.structures import name_to_id

    ct, labels = chest
    n, box = 48, 384.0
    iso = ct.corners_world().mean(0)
    ct_box, lab_box = resample_to_box(ct, labels, iso, box, n)
    rng = np.random.default_rng(0)
    pred_ct = ct_box.with_array(np.clip(ct_box.array + rng.normal(0, 40, ct_box.array.shape), -1024, 3071).astype(np.int16))
    t_ids = [name_to_id()[s] for s in THORACIC]
    pred_lab = ct_box.with_array(np.roll(np.isin(lab_box.array, t_ids), 1, axis=2).astype(np.uint8))
    return pred_ct, pred_lab, ct_box, lab_box, t_ids


def test_compare_table_equals_the_volume_metrics(logic, scene, chest, reconstruction, tmp_path):
    from x2recon.metrics.volume import volume_metrics

    ct, labels = chest
    pred_ct, pred_lab, ct_box, lab_box, t_ids = reconstruction
    nodes = logic.load_results(_write_result(tmp_path, pred_ct, pred_lab, {1: "thoracic"},
                                             {"thoracic": sorted(THORACIC)}), show=False)
    # the ground truth: the CT and its vertebrae (T and L: only T counts as "thoracic") and a rib
    gt_sub = subset(labels, ["vertebrae_T6", "vertebrae_T7", "vertebrae_T8", "vertebrae_T9", "vertebrae_L1", "rib_left_5"])
    gt_ct_node = volume_to_volume_node(ct, scene, "chest CT")
    gt_seg = segmentation_node(scene, gt_sub)
    n_nodes = scene.GetNumberOfNodes()
    table = logic.compare(nodes["ct"], nodes["segmentation"], gt_ct_node, gt_seg)
    assert scene.GetNumberOfNodes() == n_nodes + 1  # the table, no temporary node
    values = logic.table_values(table)
    assert list(values) == [lab for _, lab in metric_rows(["thoracic"])]
    assert list(values) == ["PSNR (dB)", "SSIM", "thoracic Dice", "thoracic HD95 (mm)", "thoracic Chamfer (mm)",
                            "Mean Dice", "Mean HD95 (mm)", "Mean Chamfer (mm)"]
    gt_t = np.isin(lab_box.array, [i for i in t_ids if i in np.unique(gt_sub.array)]).astype(np.uint8)
    h = pred_ct.spacing[0]
    direct = volume_metrics(pred_ct.array, ct_box.array, pred_lab.array, gt_t, spacing=(h, h, h),
                            labels={"thoracic": 1})
    assert values["PSNR (dB)"] == pytest.approx(direct.psnr, rel=1e-9)
    assert values["SSIM"] == pytest.approx(direct.ssim, rel=1e-9)
    assert values["thoracic Dice"] == pytest.approx(direct.dice["thoracic"], rel=1e-9)
    assert values["thoracic HD95 (mm)"] == pytest.approx(direct.hd95["thoracic"], rel=1e-9)
    assert values["thoracic Chamfer (mm)"] == pytest.approx(direct.chamfer["thoracic"], rel=1e-9)
    assert values["Mean Dice"] == pytest.approx(direct.mean_dice, rel=1e-9)
    assert 0.2 < values["thoracic Dice"] < 0.95 and 25 < values["PSNR (dB)"] < 60
    assert table.GetAttribute("x2recon.reference") == f"{gt_ct_node.GetID()},{gt_seg.GetID()}"

    # a labelmap node (TotalSegmentator ids) gives the same; the CT alone gives PSNR and SSIM only
    same = logic.table_values(logic.compare(nodes["ct"], nodes["segmentation"], gt_ct_node, labelmap_node(scene, gt_sub)))
    assert same == pytest.approx(values, rel=1e-12)
    only_ct = logic.table_values(logic.compare(nodes["ct"], None, gt_ct_node))
    assert list(only_ct) == ["PSNR (dB)", "SSIM"] and only_ct["SSIM"] == pytest.approx(direct.ssim, rel=1e-9)
    only_seg = logic.table_values(logic.compare(nodes["ct"], nodes["segmentation"], None, gt_seg))
    assert "PSNR (dB)" not in only_seg and only_seg["thoracic Dice"] == pytest.approx(direct.dice["thoracic"], rel=1e-9)
    # a reconstruction compared with its own CT and segmentation scores perfectly
    perfect = logic.table_values(logic.compare(nodes["ct"], nodes["segmentation"], nodes["ct"], nodes["segmentation"]))
    assert perfect["thoracic Dice"] == 1.0 and perfect["thoracic HD95 (mm)"] == 0.0 and np.isinf(perfect["PSNR (dB)"])
    # a ground truth without any of the model's structures says so
    with pytest.raises(X2ReconInputError, match="ribs only: no segment is one of the model's structures"):
        logic.compare(nodes["ct"], nodes["segmentation"], None, segmentation_node(scene, subset(labels, ["rib_left_5"]),
                                                                                   "ribs only"))


# ------------------------------------------------------------------------ the background process
def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=process_environment())
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def test_background_run_from_the_xray_pair(logic, scene, case, chest, tiny_spider_model, tmp_path):
    """The panel's path, as a subprocess: the trained tiny model's CT and segmentation from the
    training case's DRR nodes, equal to x2recon's own reconstruction, scored against the CT."""
    from x2recon.nn.checkpoint import load_model
    from x2recon.spider.inference import reconstruct_ct

    ap, lat = xray_node(scene, case, "AP"), xray_node(scene, case, "LAT")
    cmd, job = logic.reconstruct_command(tiny_spider_model, tmp_path, ap, lat, resolution=32, device="cpu")
    r = _run(cmd)
    progress = [p for p in map(logic.parse_progress_line, r.stdout.splitlines()) if p]
    assert progress and progress[-1][0] == 1.0 and all(0 <= f <= 1 for f, _ in progress)
    nodes = logic.load_results(job, show=False)
    model, _ = load_model(tiny_spider_model, "cpu", network="spider")
    direct = reconstruct_ct(model, [xray_node_to_xray(ap), xray_node_to_xray(lat)], resolution=32)
    got = volume_node_to_volume(nodes["ct"])
    assert got.same_grid(direct.ct)
    assert np.abs(got.array.astype(int) - direct.ct.array).max() <= 1  # same network, same 16-bit images
    seg = nodes["segmentation"]
    assert [seg.GetSegmentation().GetSegment(s).GetName() for s in segment_ids(seg)] == ["thoracic"]
    ct, labels = chest
    values = logic.table_values(logic.compare(nodes["ct"], seg, volume_to_volume_node(ct, scene, "CT"),
                                              labelmap_node(scene, labels)))
    assert values["PSNR (dB)"] > 25 and values["thoracic Dice"] > 0.5, values


def test_background_run_from_a_ct_renders_the_pair(logic, scene, chest, tiny_spider_model, tmp_path):
    """Research path: the model's DRR pair rendered from the CT node in the background process, then
    reconstructed; the pair comes back as X-ray nodes carrying their geometry."""
    ct, labels = chest
    ct_node = volume_to_volume_node(ct, scene, "chest CT")
    lab_node = labelmap_node(scene, labels)  # the isocentre: the centre of the model's structures, as the builder's
    cmd, job = logic.reconstruct_command(tiny_spider_model, tmp_path, ct_node=ct_node, ct_labels_node=lab_node,
                                         resolution=32, device="cpu")
    r = _run(cmd)
    lines = [p for p in map(logic.parse_progress_line, r.stdout.splitlines()) if p]
    assert lines[0] == (0.0, "rendering the AP and LAT DRRs of the CT") and lines[-1][0] == 1.0
    nodes = logic.load_results(job, show=False)
    assert [n.GetName() for n in nodes["xrays"]] == ["chest CT SPIDER DRR AP", "chest CT SPIDER DRR LAT"]
    g = [ProjectionGeometry.from_json(n.GetAttribute(GEOMETRY_ATTRIBUTE)) for n in nodes["xrays"]]
    assert [x.name for x in g] == ["AP", "LAT"]
    box = volume_node_to_volume(nodes["ct"])
    np.testing.assert_allclose(box.corners_world().mean(0), g[0].isocenter, atol=1e-6)  # the box around it
    values = logic.table_values(logic.compare(nodes["ct"], nodes["segmentation"], ct_node, lab_node))
    assert values["PSNR (dB)"] > 25 and values["thoracic Dice"] > 0.5, values
    # the rendered X-ray nodes are inputs of the X-ray path, giving the same reconstruction
    cmd2, job2 = logic.reconstruct_command(tiny_spider_model, tmp_path / "again", *nodes["xrays"], resolution=32,
                                           device="cpu")
    _run(cmd2)
    again = logic.load_results(job2, show=False)
    assert np.array_equal(volume_node_to_volume(again["ct"]).array, box.array)


def test_background_failure_is_reported(logic, scene, tiny_spider_model, tmp_path):
    """A CT node that is not in HU: ``x2recon spider --from-ct`` exits 2 with the reason on stderr."""
    not_ct = volume_to_volume_node(Volume(np.full((20, 20, 20), 500, np.int16), (2, 2, 2), (0, 0, 0), np.eye(3)),
                                   scene, "flat")
    cmd, _ = logic.reconstruct_command(tiny_spider_model, tmp_path, ct_node=not_ct, resolution=8, device="cpu")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=process_environment())
    assert r.returncode == 2 and "not a CT in Hounsfield units" in r.stderr


def test_progress_lines_and_environment():
    from x2recon.slicer.process import x2recon_root

    assert SpiderCTLogic.parse_progress_line("X2RECON_PROGRESS 42 1,000 of 32,768 points") == (0.42, "1,000 of 32,768 points")
    assert SpiderCTLogic.parse_progress_line("X2RECON_PROGRESS 100") == (1.0, "")
    assert SpiderCTLogic.parse_progress_line("x2recon spider: error: …") is None
    env = process_environment({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(":")[0] == x2recon_root() and env["PYTHONPATH"].endswith("/elsewhere")
    assert env["PYTHONUNBUFFERED"] == "1"


def test_logic_imports_without_qt_and_without_heavy_packages():
    code = ("import sys\nsys.modules['qt'] = sys.modules['ctk'] = sys.modules['slicer.util'] = None\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'SpiderCT')!r})\n"
            "import SpiderCTLib.logic\n"
            "heavy = [m for m in ('torch', 'SimpleITK', 'x2recon.spider.inference', 'x2recon.metrics', 'scipy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
