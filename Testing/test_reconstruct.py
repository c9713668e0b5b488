"""X-ray → mesh with a trained X2B: the mesh lands on the CT's bones in world millimetres, MISE equals
dense extraction of the same network, the options (simplify, refine, network normals) do what they
say, and the CLI (reconstruct, evaluate, info, demo) works and fails clearly on bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import trimesh
from scipy.spatial import cKDTree

from x2recon.cli import main
from x2recon.dataset.torch_data import load_view
from x2recon.io.mesh import read_mesh
from x2recon.mesh.extract import flying_edges
from x2recon.metrics.mesh import iou_points, sample_surface
from x2recon.nn.checkpoint import load_model, save_checkpoint
from x2recon.x2b.network import X2BConfig, build_model
from x2recon.x2b.reconstruct import OccupancyField, reconstruct


@pytest.fixture(scope="module")
def trained(tiny_x2b_model, tiny_x2b_dataset):
    model, cfg = load_model(tiny_x2b_model)
    case = tiny_x2b_dataset / "cases" / "chest"
    return model, load_view(case, "AP", 64), read_mesh(case / "meshes" / "bones.ply")


def test_mesh_lands_on_the_ct_bones_in_world_mm(trained):
    model, xray, gt = trained
    rec = reconstruct(model, [xray], resolution=128)
    lo, hi = xray.geometry.box_bounds()
    v = np.asarray(rec.mesh.vertices)
    cell = (hi - lo) / 128  # the watertight surface closes with a cap less than half a cell outside the box
    assert (v >= lo - 0.5 * cell).all() and (v <= hi + 0.5 * cell).all()
    assert np.allclose(rec.mesh.vertices, xray.geometry.from_box(np.asarray(rec.mesh_box.vertices)))
    g, _ = sample_surface(gt, 20_000, seed=1)

    def median_distances(mesh):
        p, _ = sample_surface(mesh, 20_000)
        return np.median(cKDTree(g).query(p)[0]), np.median(cKDTree(p).query(g)[0])

    acc, comp = median_distances(rec.mesh)
    # on the vertebrae: within a pixel of the 64² input (6.7 mm at the detector, ~6 mm at the isocentre)
    assert acc < 5.0 and comp < 5.0, (acc, comp)
    shifted = trimesh.Trimesh(rec.mesh.vertices + [60.0, 0.0, 0.0], rec.mesh.faces)  # beside the spine
    assert min(median_distances(shifted)) > 5.0  # the check tells a misplaced mesh apart
    assert iou_points(rec.mesh, gt, n=50_000) > 0.5
    assert rec.evaluations < rec.dense_evaluations / 3


def test_cpu_chunks_on_the_pool_give_one_batch_values_bit_for_bit(trained):
    """OccupancyField.prob on CPU: CPU_CHUNK-point chunks on single-threaded pool threads, returned in order."""
    model, xray, _ = trained
    field = OccupancyField(model, [xray], torch.device("cpu"))
    pts = np.random.default_rng(3).uniform(-0.5, 0.5, (5000, 3)).astype(np.float32)  # three chunks
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chunked = field.prob(pts)
    finally:
        torch.set_num_threads(threads)
    field.cpu_chunk, field.batch = 0, len(pts)  # one batch in this thread
    whole = field.prob(pts)
    assert chunked.shape == (len(pts),) and np.array_equal(chunked, whole)
    assert field.evaluations == 2 * len(pts) and field.prob(pts[:0]).shape == (0,)


def test_mise_equals_dense_extraction_of_the_network(trained):
    model, xray, _ = trained
    # the raw MISE surface against the raw dense one: the watertight default adds a cap where bone leaves the
    # box (half a cell outside it) and drops specks, which no dense marching-cubes surface has
    rec = reconstruct(model, [xray], resolution=64, watertight=False)
    field = OccupancyField(model, [xray], torch.device("cpu"))
    r = 64
    ax = np.linspace(-0.5, 0.5, r + 1)
    grid = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    values = field.prob(grid.astype(np.float32)).reshape(r + 1, r + 1, r + 1)
    verts, faces = flying_edges(values.transpose(2, 1, 0), model.cfg.threshold)
    dense = trimesh.Trimesh(-0.5 + verts / r, faces)
    # MISE evaluates exactly the grid points near the surface, so its vertices are the dense
    # surface's (a few cells at the border of the refined region differ by less than one cell); it can
    # only miss bits smaller than a 32³ cell whose corners all lie on one side of τ.
    d = cKDTree(np.asarray(dense.vertices)).query(np.asarray(rec.mesh_box.vertices))[0]
    assert np.mean(d < 1e-6) > 0.98 and d.max() < 1.0 / r
    assert len(rec.mesh_box.faces) >= 0.8 * len(dense.faces)


def test_simplify_refine_and_network_normals(trained):
    model, xray, _ = trained
    base = reconstruct(model, [xray], resolution=64)
    # the raw surface: quadric collapse to a quarter pinches this tiny model's thin specks into non-manifold
    # edges that no retry keeps watertight (reconstruct then says so and names --no-watertight)
    small = reconstruct(model, [xray], resolution=64, faces=len(base.mesh.faces) // 4, watertight=False)
    assert len(small.mesh.faces) <= 0.3 * len(base.mesh.faces)
    field = OccupancyField(model, [xray], torch.device("cpu"))
    level = np.log(0.2 / 0.8)
    before = np.abs(field.logit_and_grad(np.asarray(base.mesh_box.vertices, np.float32))[0] - level).mean()
    refined = reconstruct(model, [xray], resolution=64, refine_steps=3)
    after = np.abs(field.logit_and_grad(np.asarray(refined.mesh_box.vertices, np.float32))[0] - level).mean()
    assert after < 0.5 * before
    nn = reconstruct(model, [xray], resolution=64, network_normals=True)
    n = np.asarray(nn.mesh.vertex_normals)
    assert np.allclose(np.linalg.norm(n, axis=1), 1, atol=1e-3)
    geo = trimesh.Trimesh(nn.mesh.vertices, nn.mesh.faces, process=False).vertex_normals
    # outward like the surface's own normals; a memorised field with high Fourier octaves ripples,
    # so the gradient agrees only in the large (measured: 76 % of vertices within 90°)
    assert np.mean(np.einsum("ij,ij->i", n, geo) > 0) > 0.7


def run_cli(*args) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "x2recon.cli", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def test_cli_reconstruct_evaluate_info(tiny_x2b_model, tiny_x2b_dataset, tmp_path, trained):
    case = tiny_x2b_dataset / "cases" / "chest"
    out = tmp_path / "bones.stl"
    assert main(["reconstruct", "--xray", str(case / "images" / "AP_64.png"), "--model", str(tiny_x2b_model),
                 "--out", str(out), "--resolution", "64", "--quiet", "--render", str(tmp_path / "bones.png")]) == 0
    mesh = read_mesh(out)
    _, _, gt = trained
    p, g = sample_surface(mesh, 10_000)[0], sample_surface(gt, 10_000)[0]
    assert np.median(cKDTree(g).query(p)[0]) < 4.0  # on the CT's vertebrae, in mm
    assert (tmp_path / "bones.png").stat().st_size > 1000
    csv_path = tmp_path / "test.csv"
    assert main(["evaluate", "--model", str(tiny_x2b_model), "--data", str(tiny_x2b_dataset), "--split", "test",
                 "--resolution", "64", "--points", "20000", "--out", str(csv_path), "--quiet"]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["case"], r["view"]) for r in rows] == [("chest_v02", "AP")]
    from x2recon.x2b.evaluate import COLUMNS

    assert {"paper_iou", "world_iou", "paper_chamfer_l1", "world_chamfer_l1", "maxe"} <= set(COLUMNS)
    for k in COLUMNS:  # both protocols' columns
        assert np.isfinite(float(rows[0][k])), k
    code, text = run_cli("info", tiny_x2b_model)
    assert code == 0 and json.loads(text)["network"] == "x2b"


def test_cli_bad_inputs(tiny_x2b_model, tiny_x2b_dataset, tmp_path):
    case = tiny_x2b_dataset / "cases" / "chest"
    ap, lat = case / "images" / "AP_64.png", case / "images" / "LAT_64.png"
    rgb = tmp_path / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((64, 64, 3), 90, np.uint8), isVector=True), str(rgb))
    x2b2 = tmp_path / "x2b2.safetensors"
    cfg = X2BConfig(kind="x2b2", views=["AP", "LAT"], backbone="convnext_atto", image_size=64, hidden=32, n_blocks=1,
                    attention_heads=4)
    save_checkpoint(x2b2, build_model(cfg), {"network": "x2b2", "model": cfg.to_dict()})
    out = tmp_path / "o.stl"
    checks = [
        (["--xray", rgb, "--model", tiny_x2b_model], "greyscale"),
        (["--xray", tmp_path / "none.png", "--model", tiny_x2b_model], "not found"),
        (["--xray", ap, "--model", tmp_path / "none.safetensors"], "model file not found"),
        (["--xray", ap, "--model", tiny_x2b_model, "--resolution", "48"], "resolution must be"),
        (["--xray", ap, "--lateral", lat, "--model", tiny_x2b_model], "takes one X-ray"),
        (["--xray", ap, "--model", x2b2], "needs two X-rays"),
        (["--xray", ap, "--lateral", ap, "--model", x2b2], "orthogonal"),
    ]
    for args, words in checks:
        code, text = run_cli("reconstruct", *args, "--out", out, "--quiet")
        assert code == 2 and words in text and "Traceback" not in text, (args, text)
    assert not out.exists()


def test_demo_plumbing_with_a_small_model(tiny_x2b_model, shared_data, tmp_path):
    """`x2recon demo` end to end (the README's main command) with the tiny model for speed."""
    code = main(["demo", "--model", str(tiny_x2b_model), "--data", str(shared_data), "--resolution", "64",
                 "--out", str(tmp_path / "demo")])
    assert code == 0
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert m["case"].endswith("_v90") and 0 <= m["metrics"]["iou"] <= 1
    for k in ("xray", "mesh", "rendering"):
        assert Path(m[k]).is_file(), k


def test_bundled_demo_model_loads():
    from x2recon.demo import bundled_model

    model, cfg = load_model(bundled_model())
    assert cfg["network"] == "x2b" and "build" in cfg["dataset"]
    assert bundled_model().stat().st_size < 20e6
