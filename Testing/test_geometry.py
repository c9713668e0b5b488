"""ProjectionGeometry: projection vs rays, named views, box mapping, JSON round trip."""

import json

import numpy as np
import pytest

from x2recon.errors import X2ReconInputError
from x2recon.geometry import ProjectionGeometry
from x2recon.io.xray import write_geometry

ISO = np.array([12.0, -30.0, 450.0])


@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("view", ["AP", "PA", "LAT", 37.5, "-20"])
def test_points_on_a_ray_project_to_its_pixel(kind, view):
    g = ProjectionGeometry.from_view(view, ISO, size=(64, 48), detector_mm=300, kind=kind)
    origins, dirs, lengths = g.rays()
    rng = np.random.default_rng(0)
    for r, c in rng.integers(0, [48, 64], size=(25, 2)):
        for t in (0.3, 0.55, 0.9):
            p = origins[r, c] + t * lengths[r, c] * dirs[r, c]
            np.testing.assert_allclose(g.project(p), [c, r], atol=1e-6)
        # the ray ends on its detector pixel
        np.testing.assert_allclose(origins[r, c] + lengths[r, c] * dirs[r, c], g.pixel_to_world(c, r), atol=1e-6)


def test_cone_projection_matches_independent_ray_plane_intersection():
    g = ProjectionGeometry.from_view(23.0, ISO)
    rng = np.random.default_rng(1)
    pts = ISO + rng.uniform(-150, 150, size=(200, 3))
    # independent: intersect source→point with the detector plane, express in (u, v) pixels
    n = np.cross(g.u, g.v)
    t = ((g.detector_center - g.source) @ n) / ((pts - g.source) @ n)
    hit = g.source + t[:, None] * (pts - g.source)
    col = (hit - g.detector_center) @ g.u / g.spacing[0] + (g.size[0] - 1) / 2
    row = (hit - g.detector_center) @ g.v / g.spacing[1] + (g.size[1] - 1) / 2
    np.testing.assert_allclose(g.project(pts), np.stack([col, row], 1), atol=1e-8)


def test_named_views_follow_radiographic_conventions():
    ap, pa, lat = (ProjectionGeometry.from_view(v, ISO) for v in ("AP", "PA", "LAT"))
    assert ap.source[1] < ISO[1] < ap.detector_center[1]  # source anterior (−y in LPS)
    assert pa.source[1] > ISO[1] > pa.detector_center[1]  # source posterior
    assert lat.source[0] < ISO[0] < lat.detector_center[0]  # source on the patient's right (−x)
    left, head = ISO + [100, 0, 0], ISO + [0, 0, 100]
    for g in (ap, pa):  # patient's right on the image's left, head at the top
        assert g.project(left)[0] > g.project(ISO)[0]
        assert g.project(head)[1] < g.project(ISO)[1]
    # isocentre at the principal point, magnification sdd/sod
    np.testing.assert_allclose(ap.project(ISO), ap.principal_point, atol=1e-9)
    mag = (ap.project(left)[0] - ap.project(ISO)[0]) * ap.spacing[0] / 100
    assert mag == pytest.approx(1800 / 1600, rel=1e-9)


def test_matrix_is_the_projection_and_torch_agrees():
    torch = pytest.importorskip("torch")
    g = ProjectionGeometry.from_view("LAT", ISO)
    pts = ISO + np.random.default_rng(2).normal(0, 80, size=(50, 3))
    P = g.matrix()
    h = np.c_[pts, np.ones(len(pts))] @ P.T
    np.testing.assert_allclose(h[:, :2] / h[:, 2:], g.project(pts))
    out = g.project(torch.tensor(pts, dtype=torch.float64))
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), g.project(pts), atol=1e-9)


def test_resized_keeps_the_detector_extent():
    g = ProjectionGeometry.from_view("AP", ISO, size=(512, 512))
    s = g.resized(224)
    p = ISO + np.array([40.0, 10.0, -70.0])
    c512, c224 = g.project(p), s.project(p)
    np.testing.assert_allclose((c512 + 0.5) * 224 / 512 - 0.5, c224, atol=1e-9)


def test_box_mapping_round_trip_and_bounds():
    g = ProjectionGeometry.from_view("AP", ISO, box_size=384)
    lo, hi = g.box_bounds()
    np.testing.assert_allclose(g.to_box(lo), [-0.5] * 3)
    np.testing.assert_allclose(g.to_box(hi), [0.5] * 3)
    p = np.random.default_rng(3).uniform(-0.5, 0.5, (10, 3))
    np.testing.assert_allclose(g.to_box(g.from_box(p)), p)


def test_json_round_trip(tmp_path):
    g = ProjectionGeometry.from_view(-15, ISO, size=(300, 200), kind="parallel", box_size=256)
    f = tmp_path / "g.json"
    write_geometry(g, f)
    h = ProjectionGeometry.from_json(f)
    assert h == g and h.kind == "parallel" and h.size == (300, 200) and h.name == "-15"
    pts = ISO + np.random.default_rng(4).normal(0, 50, (20, 3))
    np.testing.assert_allclose(h.project(pts), g.project(pts))


def test_bad_geometry_inputs_give_clear_errors(tmp_path):
    with pytest.raises(X2ReconInputError, match="not found"):
        ProjectionGeometry.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(X2ReconInputError, match="bad.json.*not an X2Recon geometry"):
        ProjectionGeometry.from_json(bad)
    with pytest.raises(ValueError, match="unknown view"):
        ProjectionGeometry.from_view("oblique")
    with pytest.raises(ValueError, match="sod < sdd"):
        ProjectionGeometry.from_view("AP", sdd=1000, sod=1200)
