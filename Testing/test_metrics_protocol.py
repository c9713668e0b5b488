"""The paper and world protocols (metrics.protocol), meshes cut to the reconstruction box
(dataset.box_coverage) and ``x2recon compare``, against closed forms and an independent computation."""

import json

import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from x2recon.cli import main
from x2recon.dataset.box_coverage import clip_solid, outside_box_fractions, outside_fraction
from x2recon.io.mesh import write_mesh
from x2recon.metrics.protocol import Solid, UnitBox, score, surface_voxels

N = 20_000
CENTRE = np.array([100.0, -50.0, 20.0])  # off the origin: the paper protocol must centre


def sphere(r, centre=CENTRE):
    m = trimesh.creation.icosphere(subdivisions=5, radius=r)
    m.apply_translation(centre)
    return m


def cube(edge, centre=CENTRE):
    m = trimesh.creation.box((edge, edge, edge))
    m.apply_translation(centre)
    return m


def test_concentric_spheres_match_the_closed_forms_in_both_protocols():
    r_pred, r_gt = 36.0, 40.0
    res = score(sphere(r_pred), sphere(r_gt), n_points=N)
    world, paper = res["world"], res["paper"]
    # every point of one sphere is r_gt − r_pred from the other surface
    assert world["chamfer_l1"] == pytest.approx(r_gt - r_pred, rel=0.02)
    diameter = 2 * r_gt
    assert paper["chamfer_l1"] == pytest.approx((r_gt - r_pred) / diameter, rel=0.02)
    assert paper["scale_mm"] == pytest.approx(diameter, rel=0.005)  # the icosphere's longest edge
    # IoU of concentric balls = (r1/r2)³ in either frame
    assert world["iou"] == pytest.approx((r_pred / r_gt) ** 3, abs=0.01)
    assert paper["iou"] == pytest.approx((r_pred / r_gt) ** 3, abs=0.01)
    # F-score: 4 mm apart is inside world's 7.68 mm threshold, 0.05 units is outside the paper's 0.02
    assert world["fscore"] == 1.0 and paper["fscore"] == 0.0
    assert world["fscore_tau"] == pytest.approx(7.68) and paper["fscore_tau"] == 0.02
    assert paper["normal_consistency"] == world["normal_consistency"] > 0.999
    # ICP cannot shrink a sphere: each sample is off by 4 mm along its normal n, and mean |n_x| = ½ on a sphere
    for k in ("maxe", "maye", "maze"):
        assert res[k] == pytest.approx((r_gt - r_pred) / 2, rel=0.02), k
    # predicted over true volume: (r_pred / r_gt)³; a blob twice the radius is 8×
    assert world["volume_ratio"] == pytest.approx((r_pred / r_gt) ** 3, abs=0.02)
    assert score(sphere(2 * r_gt), sphere(r_gt), n_points=N)["world"]["volume_ratio"] == pytest.approx(8.0, rel=0.05)


def test_a_shifted_cube_matches_the_closed_forms():
    edge, d = 40.0, 1.6  # shift along x; the shifted cube stays inside the paper's padded box
    gt, pred = cube(edge), cube(edge, CENTRE + [d, 0, 0])
    res = score(pred, gt, n_points=N)
    iou = (edge - d) / (edge + d)
    assert res["world"]["iou"] == pytest.approx(iou, abs=0.01)
    assert res["paper"]["iou"] == pytest.approx(iou, abs=0.01)
    # the two x faces are d apart; the side faces coincide, where independent samples leave their spacing
    assert res["world"]["chamfer_l1"] > d / 3 and res["paper"]["chamfer_l1"] == pytest.approx(
        res["world"]["chamfer_l1"] / edge)
    # ICP takes the rigid shift out: what is left per axis is the samples' spacing (~0.3 mm), not the 1.6 mm
    assert max(res["maxe"], res["maye"], res["maze"]) < 0.25


def test_paper_voxels_count_every_voxel_the_surface_crosses():
    # the unit cube on the padded box's 32³ grid (cells 1.1/32): its faces cross cells 1 and 30 of each axis
    box = trimesh.creation.box((1.0, 1.0, 1.0))
    shell = surface_voxels(box, [-0.55] * 3, [0.55] * 3, 32)
    assert shell.sum() == 30 ** 3 - 28 ** 3
    assert shell[1, 1, 1] and shell[30, 15, 15] and not shell[15, 15, 15] and not shell[0, 5, 5]
    # independent: the mesh subdivided until every edge is < h/8 marks the voxels holding its vertices — a
    # subset of the voxels a triangle touches that misses only those a triangle grazes (half as many at h/16)
    torus = trimesh.creation.torus(30.0, 10.0)
    torus.apply_transform(trimesh.transformations.rotation_matrix(0.4, [1, 1, 0]))  # not grid-aligned
    m = UnitBox.of(torus.bounds).apply_mesh(torus)
    lo, res = -0.55, 32
    h = 1.1 / res
    ours = surface_voxels(m, [lo] * 3, [-lo] * 3, res)
    v, _ = trimesh.remesh.subdivide_to_size(m.vertices, m.faces, max_edge=h / 8)
    theirs = np.zeros_like(ours)
    theirs[tuple(np.floor((v - lo) / h).astype(int).T)] = True
    assert not (theirs & ~ours).any()
    assert (ours & ~theirs).sum() <= 0.04 * ours.sum()


def _inside_torus(points, R, r, motion):
    """Inside the analytic torus (axis z, radii R and r) moved by the 4×4 ``motion``."""
    q = trimesh.transform_points(points, np.linalg.inv(motion))
    return (np.hypot(q[:, 0], q[:, 1]) - R) ** 2 + q[:, 2] ** 2 < r * r


def _independent_paper_protocol(pred, gt, inside_pred, inside_gt, n, seed):
    """The paper protocol written directly with trimesh and scipy, inside tests from the analytic shapes."""
    c, s = gt.bounds.mean(0), (gt.bounds[1] - gt.bounds[0]).max()
    pts = np.random.default_rng(seed).uniform(-0.55, 0.55, (n, 3))
    a, b = inside_pred(pts * s + c), inside_gt(pts * s + c)
    p, g = pred.copy(), gt.copy()
    for m in (p, g):
        m.apply_translation(-c)
        m.apply_scale(1.0 / s)
    ps, pf = trimesh.sample.sample_surface(p, n, seed=seed + 1)
    gs, gf = trimesh.sample.sample_surface(g, n, seed=seed + 2)
    d_pg, i_pg = cKDTree(gs).query(ps)
    d_gp, i_gp = cKDTree(ps).query(gs)
    prec, rec = (d_pg < 0.02).mean(), (d_gp < 0.02).mean()
    nc = 0.5 * (np.abs((p.face_normals[pf] * g.face_normals[gf][i_pg]).sum(1)).mean()
                + np.abs((g.face_normals[gf] * p.face_normals[pf][i_gp]).sum(1)).mean())
    return {"iou": (a & b).sum() / (a | b).sum(), "chamfer_l1": 0.5 * (d_pg.mean() + d_gp.mean()),
            "fscore": 2 * prec * rec / (prec + rec), "normal_consistency": nc}


def test_paper_protocol_matches_an_independent_computation():
    R, r = 30.0, 8.0
    place = trimesh.transformations.translation_matrix(CENTRE)
    move = trimesh.transformations.concatenate_matrices(
        trimesh.transformations.translation_matrix(CENTRE + [2.0, 1.0, -1.5]),
        trimesh.transformations.rotation_matrix(0.08, [1, 0, 0]))
    gt = trimesh.creation.torus(R, r, major_sections=128, minor_sections=48)
    pred = gt.copy()
    gt.apply_transform(place)
    pred.apply_transform(move)
    ours = score(pred, gt, ("paper",), n_points=N)["paper"]
    ref = _independent_paper_protocol(pred, gt, lambda q: _inside_torus(q, R, r, move),
                                      lambda q: _inside_torus(q, R, r, place), N, 7)
    assert ours["iou"] == pytest.approx(ref["iou"], abs=0.015)
    assert ours["chamfer_l1"] == pytest.approx(ref["chamfer_l1"], rel=0.03)
    assert ours["fscore"] == pytest.approx(ref["fscore"], abs=0.02)
    assert ours["normal_consistency"] == pytest.approx(ref["normal_consistency"], abs=0.01)
    assert 0.2 < ours["iou"] < 0.9 and 0.2 < ours["fscore"] < 0.95  # a case where the numbers mean something


@pytest.mark.slow
def test_half_outside_the_box_fraction_warning_and_clipped_scoring():
    gt = sphere(40.0)
    lo, hi = CENTRE - 200.0, CENTRE + [0.0, 200.0, 200.0]  # the box ends at the sphere's centre plane
    assert outside_fraction(gt, lo, hi) == pytest.approx(0.5, abs=0.002)
    h = 10.0  # a cap of height h outside: π h² (3r − h) / 3 of the ball's volume
    assert outside_fraction(gt, lo, hi + [40.0 - h, 0, 0]) == pytest.approx(
        np.pi * h * h * (120.0 - h) / 3 / gt.volume, abs=0.002)
    assert outside_fraction(gt, CENTRE - 50, CENTRE + 50) == 0.0
    # a prediction that is exactly the part inside the box scores IoU 1 against the clipped ground truth
    # and ½ against the whole mesh (a bar cut across its middle)
    bar = trimesh.creation.cylinder(radius=10.0, height=120.0, sections=64)
    bar.apply_translation(CENTRE)
    lo, hi = CENTRE - 200.0, CENTRE + [200.0, 200.0, 0.0]
    assert outside_fraction(bar, lo, hi) == pytest.approx(0.5, abs=0.002)
    pred = clip_solid(bar, lo, hi)
    clipped = score(pred, bar, ("world",), n_points=N, box=(lo, hi))
    whole = score(pred, bar, ("world",), n_points=N)
    assert clipped["gt_clipped"] and not whole["gt_clipped"]
    assert clipped["world"]["iou"] > 0.98 and whole["world"]["iou"] == pytest.approx(0.5, abs=0.02)
    assert clipped["world"]["completeness"] < 1.0 and whole["world"]["completeness"] > 10.0
    assert Solid.clipped(bar, lo, hi).surface.bounds[1][2] == pytest.approx(CENTRE[2])


def test_building_warns_for_structures_outside_the_box():
    from x2recon.geometry import ProjectionGeometry

    geom = ProjectionGeometry.from_view("AP", CENTRE + [190.0, 0, 0], box_size=384.0)  # box ends at x = 102
    meshes = {"rib_left_1": sphere(40.0), "vertebrae_T1": sphere(10.0, CENTRE + [50.0, 0, 0])}
    with pytest.warns(UserWarning, match=r"case7: .*rib_left_1 4[0-9]\.[0-9] %"):
        f = outside_box_fractions(meshes, geom, warn_case="case7")
    assert f["vertebrae_T1"] == 0.0 and 0.4 < f["rib_left_1"] < 0.5


def _compare(capsys, *args):
    code = main(["compare", *map(str, args)])
    return code, capsys.readouterr()


@pytest.mark.slow
def test_compare_cli_prints_one_json_object(tmp_path, capsys):
    write_mesh(sphere(36.0), tmp_path / "pred.stl")
    write_mesh(sphere(40.0), tmp_path / "gt.ply")
    code, out = _compare(capsys, tmp_path / "pred.stl", tmp_path / "gt.ply", "--protocol", "world", "--points", N)
    assert code == 0
    w = json.loads(out.out)
    assert w["protocol"] == "world" and w["n_points"] == N
    assert w["chamfer_l1"] == pytest.approx(4.0, rel=0.01) and w["iou"] == pytest.approx(0.729, abs=0.01)
    for k in ("fscore", "normal_consistency", "maxe", "maye", "maze"):
        assert np.isfinite(w[k]), k
    code, out = _compare(capsys, tmp_path / "pred.stl", tmp_path / "gt.ply", "--points", N, "--seed", 3)
    p = json.loads(out.out)
    assert code == 0 and p["protocol"] == "paper" and p["chamfer_l1"] == pytest.approx(4.0 / 80.0, rel=0.01)


def test_compare_cli_refuses_bad_input(tmp_path, capsys):
    write_mesh(sphere(40.0), tmp_path / "gt.ply")
    code, out = _compare(capsys, tmp_path / "missing.ply", tmp_path / "gt.ply")
    assert code == 2 and "missing.ply" in out.err and "not found" in out.err and "Traceback" not in out.err
    code, out = _compare(capsys, tmp_path / "gt.ply", tmp_path / "gt.ply", "--points", 10)
    assert code == 2 and "--points" in out.err
    flat = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])
    write_mesh(flat, tmp_path / "flat.ply")
    code, out = _compare(capsys, tmp_path / "gt.ply", tmp_path / "flat.ply")
    assert code == 2 and "flat.ply" in out.err and "no volume" in out.err


def _row(case, method, iou, clipped=False):
    from x2recon.x2b.evaluate import COLUMNS

    row = {"case": case, "view": "AP", "method": method, **{c: iou for c in COLUMNS}}
    return {**row, "world_fscore_tau": 7.68, "gt_clipped": clipped}


def test_evaluate_tables_are_titled_with_protocol_and_n():
    from x2recon.x2b.evaluate import summary_table

    rows = [_row("a", "X2B", 0.5, clipped=True), _row("b", "X2B", 0.7), _row("b", "X2BR (GBCPD)", float("nan"))]
    text = summary_table(rows)
    lines = text.splitlines()
    paper = next(i for i, l in enumerate(lines) if l.startswith("Table 1, paper protocol"))
    world = next(i for i, l in enumerate(lines) if l.startswith("Table 1, world protocol"))
    assert "n = 2 cases, GT clipped to the box (1 of 3 cut)" in lines[paper]
    assert "n = 2 cases, GT clipped to the box (1 of 3 cut)" in lines[world]
    assert "| n |" in lines[paper] and "F-score@7.68 mm" in lines[world] and "Chamfer-L1 (mm)" in lines[world]
    assert lines[paper + 1].startswith("X2B | 2 | 0.600 ± 0.141")
    assert lines[paper + 2].startswith("X2BR (GBCPD) | 0 |")  # the failed refinement is counted as absent
    assert "X2B: n = 2 reconstructions of 2 cases" in lines[0]
    assert any(l.startswith("Table 2, both protocols") for l in lines)
    assert any(l.startswith("Table 3, paper protocol") for l in lines)


def test_spider_tables_count_the_cases_that_missed_a_class():
    from x2recon.spider.evaluate import miss_penalty, spider_tables

    p = miss_penalty(384.0)
    assert p == pytest.approx(384.0 * np.sqrt(3))
    base = {"psnr": 30.0, "ssim": 0.9, "dice": 0.5, "hd95": 10.0, "chamfer": 5.0, "penalty_mm": p}
    rows = [{"case": "a", **base, "dice:ribs": 0.0, "hd95:ribs": p, "chamfer:ribs": p, "missed:ribs": 1},
            {"case": "b", **base, "dice:ribs": 0.8, "hd95:ribs": 6.0, "chamfer:ribs": 3.0, "missed:ribs": 0},
            {"case": "c", **base, "dice:ribs": float("nan"), "hd95:ribs": float("nan"),
             "chamfer:ribs": float("nan"), "missed:ribs": 0}]  # not in either labelmap: nothing to score
    text = spider_tables(rows)
    assert "n = 3 cases" in text and "665 mm" in text
    ribs = next(l for l in text.splitlines() if l.startswith("ribs |"))
    assert ribs.startswith("ribs | 1/3 | 40.00 ± 56.57 (n=2) | ") and f"{(p + 6) / 2:.2f}" in ribs
    assert "30.00 ± 0.00 (n=3)" in text
