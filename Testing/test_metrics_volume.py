"""SPIDER volume metrics against scikit-image, closed forms and brute force."""

import itertools
import warnings

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from x2recon.metrics.volume import (
    chamfer,
    dice,
    hd95,
    psnr,
    ssim,
    surface_distances,
    volume_metrics,
)

SPACING = (1.6, 0.7, 1.1)  # anisotropic, per array axis


def ct_pair(shape=(36, 44, 40), seed=0):
    """A smooth CT-like volume in HU (body, bone, air) and a noisy, slightly blurred copy."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    gt = np.full(shape, -1000.0)
    gt[(x / 0.8) ** 2 + (y / 0.6) ** 2 < 1] = 40.0
    gt[(x - 0.1) ** 2 + (y + 0.2) ** 2 < 0.05] = 900.0
    gt = ndimage.gaussian_filter(gt, 1.0) + rng.normal(0, 20, shape)
    pred = ndimage.gaussian_filter(gt, 0.8) + rng.normal(0, 60, shape) + 15
    pred[0, 0, 0] = 5000.0  # outside the default HU window
    return pred, gt


def test_psnr_equals_scikit_image():
    pred, gt = ct_pair()
    assert psnr(pred, gt, 4095.0) == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=4095.0), rel=1e-12)
    # default: the reference's dynamic range
    r = gt.max() - gt.min()
    assert psnr(pred, gt) == pytest.approx(peak_signal_noise_ratio(gt, pred, data_range=r), rel=1e-12)
    assert psnr(gt, gt, 1.0) == np.inf


@pytest.mark.parametrize("shape", [(36, 44, 40), (64, 48)])
def test_ssim_equals_scikit_image_with_wang_settings(shape):
    pred, gt = ct_pair(shape if len(shape) == 3 else (1, *shape))
    if len(shape) == 2:
        pred, gt = pred[0], gt[0]
    for r in (4095.0, 1000.0):
        ref = structural_similarity(gt, pred, data_range=r, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert ssim(pred, gt, r) == pytest.approx(ref, abs=1e-12)
    assert ssim(gt, gt, 4095.0) == pytest.approx(1.0)


def test_volume_metrics_clip_to_the_hu_window():
    pred, gt = ct_pair()
    m = volume_metrics(pred, gt, None, None, SPACING)
    pc, gc = np.clip(pred, -1024, 3071), np.clip(gt, -1024, 3071)
    assert m.data_range == 4095.0
    assert m.psnr == pytest.approx(peak_signal_noise_ratio(gc, pc, data_range=4095.0), rel=1e-12)
    assert m.ssim == pytest.approx(structural_similarity(gc, pc, data_range=4095.0, gaussian_weights=True,
                                                         sigma=1.5, use_sample_covariance=False), abs=1e-12)
    m2 = volume_metrics(pred, gt, None, None, SPACING, hu_window=None)
    assert m2.data_range == pytest.approx(gt.max() - gt.min()) and m2.psnr == pytest.approx(psnr(pred, gt))
    assert np.isnan(m.mean_dice) and m.dice == {}


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b + 1) for a, b in zip(lo, hi))] = True  # inclusive voxel ranges
    return m


def test_dice_of_offset_boxes_is_the_closed_form():
    a = box((20, 20, 20), (2, 2, 2), (11, 11, 11))  # 10³
    b = box((20, 20, 20), (5, 4, 2), (14, 13, 11))  # shifted by (3, 2, 0)
    assert dice(a, b) == pytest.approx(2 * 7 * 8 * 10 / 2000)
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0
    assert np.isnan(dice(np.zeros(5, bool), np.zeros(5, bool)))
    assert dice(a, np.zeros_like(a)) == 0.0


def nested_boxes(spacing, d=4.8, shape=(30, 40, 36)):
    """Inner box and the box grown by ``d`` mm on every side (m_i = d / s_i voxels per axis), with the
    surface distances in closed form: every inner border voxel is exactly ``d`` from the outer border;
    an outer border voxel's nearest inner border voxel is its clamp onto the inner box."""
    m = [int(round(d / s)) for s in spacing]
    assert np.allclose([mi * s for mi, s in zip(m, spacing)], d)
    lo = np.array([m[0] + 2, m[1] + 3, m[2] + 2])
    hi = lo + [6, 9, 7]
    inner, outer = box(shape, lo, hi), box(shape, lo - m, hi + m)
    n_inner_border = np.prod(hi - lo + 1) - np.prod(hi - lo - 1)
    d_in = np.full(n_inner_border, d)
    olo, ohi = lo - m, hi + m
    q = np.stack(np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(olo, ohi)], indexing="ij"), -1).reshape(-1, 3)
    q = q[np.any((q == olo) | (q == ohi), axis=1)]  # the outer box's boundary layer
    d_out = np.linalg.norm((q - np.clip(q, lo, hi)) * spacing, axis=1)
    return inner, outer, d_in, d_out


@pytest.mark.parametrize("spacing, d", [((1.6, 0.8, 1.2), 4.8), ((1.0, 1.0, 1.0), 3.0)])
def test_nested_boxes_hd95_and_chamfer_match_the_closed_form(spacing, d):
    inner, outer, d_in, d_out = nested_boxes(np.array(spacing), d)
    d1, d2 = surface_distances(inner, outer, spacing)
    np.testing.assert_allclose(np.sort(d1), d_in, atol=1e-9)
    np.testing.assert_allclose(np.sort(d2), np.sort(d_out), atol=1e-9)
    assert chamfer(inner, outer, spacing) == pytest.approx(0.5 * (d + d_out.mean()))
    assert hd95(inner, outer, spacing) == pytest.approx(np.percentile(np.r_[d_in, d_out], 95))
    assert hd95(inner, outer, spacing, mode="max") == pytest.approx(np.percentile(d_out, 95))
    assert hd95(outer, inner, spacing) == pytest.approx(hd95(inner, outer, spacing))  # symmetric


def ball(shape, spacing, centre_mm, r_mm):
    g = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((gi - c) ** 2 for gi, c in zip(g, centre_mm)) <= r_mm ** 2


def test_concentric_spheres_distances_are_the_radius_gap():
    spacing = np.array(SPACING)
    shape = tuple(int(np.ceil(64 / s)) for s in spacing)
    c = np.array(shape) * spacing / 2
    a, b = ball(shape, spacing, c, 18.0), ball(shape, spacing, c, 24.0)
    # border voxel centres lie within one voxel diagonal of their sphere
    tol = float(np.linalg.norm(spacing))
    assert abs(chamfer(a, b, spacing) - 6.0) < 0.5 * tol
    assert abs(hd95(a, b, spacing) - 6.0) < tol
    assert hd95(a, a, spacing) == 0.0 and chamfer(a, a, spacing) == 0.0


def brute_surface(mask):
    """Border voxels by explicit 6-neighbour checks (outside the array counts as background)."""
    p = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for idx in itertools.product(*[range(n) for n in mask.shape]):
        if mask[idx]:
            c = tuple(i + 1 for i in idx)
            for ax, step in itertools.product(range(mask.ndim), (-1, 1)):
                n = list(c)
                n[ax] += step
                if not p[tuple(n)]:
                    out[idx] = True
                    break
    return out


def test_surface_distances_equal_brute_force_on_random_blobs():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    shape, spacing = (14, 12, 10), np.array([2.5, 0.8, 1.3])
    for trial in range(3):
        a = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > 0.05
        b = ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > 0.1
        if trial == 2:
            b = np.zeros(shape, bool)
            b[9:13, 2:5, 6:9] = True  # a small blob, far from the array edge
        pa = np.argwhere(brute_surface(a)) * spacing
        pb = np.argwhere(brute_surface(b)) * spacing
        dist = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
        d1, d2 = surface_distances(a, b, spacing)
        np.testing.assert_allclose(np.sort(d1), np.sort(dist.min(1)), atol=1e-9)
        np.testing.assert_allclose(np.sort(d2), np.sort(dist.min(0)), atol=1e-9)
        ref_hd = np.percentile(np.r_[dist.min(1), dist.min(0)], 95)
        assert hd95(a, b, spacing) == pytest.approx(ref_hd)
        assert chamfer(a, b, spacing) == pytest.approx(0.5 * (dist.min(1).mean() + dist.min(0).mean()))


def test_volume_metrics_per_structure_groups_and_empty_labels():
    shape = (24, 26, 22)
    gt = np.zeros(shape, np.int16)
    pred = np.zeros(shape, np.int16)
    gt[2:12, 2:12, 2:12] = 1
    pred[5:15, 4:14, 2:12] = 1  # Dice 0.56
    gt[14:20, 15:22, 3:9] = 2
    pred[14:20, 15:22, 3:9] = 2  # perfect
    gt[3:8, 16:22, 14:20] = 3  # missing in pred
    pred[16:22, 3:8, 14:20] = 4  # missing in gt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty-slice or division warnings
        m = volume_metrics(None, None, pred, gt, SPACING, labels={"a": 1, "b": 2, "c": 3, "d": 4, "e": 5,
                                                                 "ab": [1, 2]})
    assert m.dice["a"] == pytest.approx(0.56) and m.dice["b"] == 1.0
    assert m.dice["c"] == 0.0 and m.dice["d"] == 0.0 and np.isnan(m.dice["e"])
    assert m.hd95["b"] == 0.0 and m.chamfer["b"] == 0.0
    assert all(np.isnan(m.hd95[k]) and np.isnan(m.chamfer[k]) for k in "cde")
    assert m.missing == {"c": "pred", "d": "gt", "e": "both"}
    assert m.dice["ab"] == pytest.approx(2 * (560 + 252) / (2000 + 504))
    assert m.hd95["a"] == pytest.approx(hd95(pred == 1, gt == 1, SPACING))
    assert m.mean_dice == pytest.approx(np.mean([0.56, 1.0, 0.0, 0.0, m.dice["ab"]]))  # NaN (e) left out
    assert m.mean_hd95 == pytest.approx(np.mean([m.hd95["a"], 0.0, m.hd95["ab"]]))
    assert np.isnan(m.psnr) and set(m.to_dict()) >= {"dice", "hd95", "chamfer", "missing"}
    # labels=None: every id present in either map, keyed by id
    assert set(volume_metrics(None, None, pred, gt, SPACING).dice) == {1, 2, 3, 4}
    # with a penalty a structure in only one map scores it (a miss stays in the mean); one in neither stays NaN
    p = volume_metrics(None, None, pred, gt, SPACING, labels={"a": 1, "b": 2, "c": 3, "d": 4, "e": 5},
                       empty_penalty=500.0)
    assert p.hd95["c"] == p.chamfer["c"] == p.hd95["d"] == p.chamfer["d"] == 500.0
    assert np.isnan(p.hd95["e"]) and p.missing == m.missing and p.hd95["a"] == m.hd95["a"]
    assert p.mean_hd95 == pytest.approx(np.mean([m.hd95["a"], 0.0, 500.0, 500.0]))


def test_volume_objects_use_their_spacing_in_array_order():
    from x2recon.io.volume import Volume

    gt = np.zeros((20, 24, 28), np.int16)
    gt[4:14, 5:15, 6:20] = 1
    pred = np.roll(gt, (2, -1, 3), axis=(0, 1, 2))
    sxyz = (0.7, 1.1, 2.5)  # Volume spacing is (x, y, z); arrays are [z, y, x]
    vol = lambda a: Volume(a, sxyz, (0, 0, 0), np.eye(3))  # noqa: E731
    m = volume_metrics(None, None, vol(pred), vol(gt), labels=[1])
    assert m.hd95[1] == pytest.approx(hd95(pred == 1, gt == 1, sxyz[::-1]))
    assert m.hd95[1] != pytest.approx(hd95(pred == 1, gt == 1, sxyz))
    with pytest.raises(ValueError, match="different grids"):
        volume_metrics(None, None, vol(pred), Volume(gt, (1, 1, 1), (0, 0, 0), np.eye(3)))
    with pytest.raises(ValueError, match="spacing"):
        volume_metrics(None, None, pred, gt)
