"""SPIDER: projection-guided sampling, losses, training on one case, chunked inference, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from x2recon.geometry import ProjectionGeometry
from x2recon.nn.sampling import project_to_grid, sample_maps
from x2recon.spider.network import DECODERS, SpiderConfig, build_spider, dice_loss, spider_loss

SMALL = dict(views=["AP", "LAT"], image_size=32, unet_channels=[8, 16], feature_channels=8, hidden=16, layers=1,
             classes=["thoracic", "ribs"],
             hash=dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=4,
                       per_level_scale=None, finest_resolution=32))


# ------------------------------------------------------------------------ projection sampling
@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("view", ["PA", "LAT", "30"])
def test_point_projects_onto_the_pixel_its_ray_passes_through(kind, view):
    """A point on the DRR ray of pixel (c, r) samples that pixel's value, whatever its depth."""
    g = ProjectionGeometry.from_view(view, (10.0, -20.0, 30.0), size=(40, 32), detector_mm=300, kind=kind,
                                     box_size=300.0)
    origins, dirs, lengths = g.rays()
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 32, 50), rng.integers(0, 40, 50)
    # depth along the ray: inside the box, around the isocentre
    t_iso = ((g.isocenter - origins[rows, cols]) * dirs[rows, cols]).sum(-1)
    t = t_iso + rng.uniform(-100, 100, 50)
    pts = origins[rows, cols] + t[:, None] * dirs[rows, cols]
    box = torch.tensor(g.to_box(pts), dtype=torch.float64)[None]
    grid = torch.tensor(g.box_to_grid_matrix())[None, None]
    uv = project_to_grid(box, grid)[0, 0].numpy()
    W, H = g.size
    pix = np.stack([((uv[:, 0] + 1) * W - 1) / 2, ((uv[:, 1] + 1) * H - 1) / 2], 1)
    np.testing.assert_allclose(pix, np.stack([cols, rows], 1), atol=1e-6)
    # and bilinear sampling of an image holding each pixel's index returns that index exactly
    index_map = torch.arange(W * H, dtype=torch.float64).reshape(1, 1, H, W)
    got = sample_maps([index_map], torch.tensor(uv)[None, None])[0, :, 0].numpy()
    np.testing.assert_allclose(got, rows * W + cols, atol=1e-5)


def test_each_view_samples_its_own_map():
    g0 = ProjectionGeometry.from_view("AP", (0, 0, 0), size=(16, 16), detector_mm=300, box_size=300.0)
    g1 = ProjectionGeometry.from_view("LAT", (0, 0, 0), size=(16, 16), detector_mm=300, box_size=300.0)
    grid = torch.tensor(np.stack([g0.box_to_grid_matrix(), g1.box_to_grid_matrix()]))[None]
    pts = torch.zeros(1, 1, 3, dtype=torch.float64)  # the isocentre: centre of both images
    maps = [torch.full((1, 1, 16, 16), 3.0, dtype=torch.float64), torch.full((1, 1, 16, 16), 7.0, dtype=torch.float64)]
    np.testing.assert_allclose(sample_maps(maps, project_to_grid(pts, grid))[0, 0].numpy(), [3.0, 7.0])


# --------------------------------------------------------------------------------- losses
def test_dice_loss_on_known_overlaps():
    target = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0]])
    big = 50.0
    perfect = torch.stack([big * (target == 0), big * (target == 1)], -1).float()
    assert dice_loss(perfect, target, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    wrong = torch.stack([big * (target == 1), big * (target == 0)], -1).float()
    assert dice_loss(wrong, target, eps=0.0).item() == pytest.approx(1.0, abs=1e-6)
    # prediction: class 1 on points 3..6 → fg overlap 3 of 4/4: dice 6/8; bg: pred {0,1,2,7}, gt {0,1,6,7}: 6/8
    pred = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0]])
    half = torch.stack([big * (pred == 0), big * (pred == 1)], -1).float()
    assert dice_loss(half, target, eps=0.0).item() == pytest.approx(1 - 0.75, abs=1e-6)


def test_dice_loss_ignores_classes_absent_from_the_target():
    target = torch.tensor([[0, 0, 1, 1]])
    logits = torch.zeros(1, 4, 3)  # uniform over 3 classes; class 2 absent
    p = 1 / 3
    expect = 1 - np.mean([(2 * 2 * p) / (4 * p + 2)] * 2)
    assert dice_loss(logits, target, eps=0.0).item() == pytest.approx(expect, abs=1e-6)


def test_spider_loss_is_l1_plus_lambda_dice():
    out = torch.randn(2, 10, 3)
    inten = torch.rand(2, 10)
    lab = torch.randint(0, 2, (2, 10))
    d = spider_loss(out, inten, lab, lam=0.3)
    l1 = (out[..., 0] - inten).abs().mean()
    assert d["loss"].item() == pytest.approx((l1 + 0.3 * dice_loss(out[..., 1:], lab)).item(), rel=1e-6)
    assert spider_loss(out[..., :1], inten, None, 1.0)["loss"].item() == pytest.approx(l1.item(), rel=1e-6)


# ------------------------------------------------------------------------------ the network
@pytest.mark.parametrize("decoder", DECODERS)
def test_every_ablation_decoder_trains(decoder):
    torch.manual_seed(0)
    cfg = SpiderConfig(**{**SMALL, "decoder": decoder, "classes": [] if decoder == "volume-only" else SMALL["classes"]},
                       prefer_tcnn=False)
    m = build_spider(cfg)
    imgs, grid = torch.rand(2, 2, 1, 32, 32), torch.randn(2, 2, 3, 4)
    pts, inten = torch.rand(2, 256, 3) - 0.5, torch.rand(2, 256)
    lab = torch.randint(0, 3, (2, 256))
    out = m(imgs, grid, pts)
    assert out.shape == (2, 256, 1 + cfg.n_classes)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    first = None
    for _ in range(30):
        loss = spider_loss(m(imgs, grid, pts), inten, lab if cfg.n_classes else None, 1.0)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    if decoder == "two-stage":  # the logits are a function of the predicted intensity alone
        with torch.no_grad():
            o = m(imgs, grid, pts)
            torch.testing.assert_close(o[..., 1:], m.seg_decoder(o[..., :1]))


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="two views"):
        SpiderConfig(**{**SMALL, "views": ["AP"]})
    with pytest.raises(ValueError, match="decoder"):
        SpiderConfig(**{**SMALL, "decoder": "three-way"})
    with pytest.raises(ValueError, match="divisible"):
        SpiderConfig(**{**SMALL, "image_size": 33})
    with pytest.raises(ValueError, match="class"):
        SpiderConfig(**{**SMALL, "classes": []})
    with pytest.raises(ValueError, match="unknown SPIDER settings"):
        SpiderConfig.from_dict({**SMALL, "colour": 1})


def test_class_mapping_joins_structures_by_name():
    from x2recon.dataset.spider_data import class_lut, class_members, default_classes

    classes = default_classes(["rib_left_1", "vertebrae_T7", "vertebrae_L1", "rib_right_2", "sternum"])
    assert classes == ["ribs", "thoracic", "lumbar", "sternum"]
    members = class_members(classes)
    lut = class_lut({3: "vertebrae_T7", 9: "rib_right_2", 5: "vertebrae_C3", 7: "sternum"}, classes, members)
    assert lut[3] == 2 and lut[9] == 1 and lut[5] == 0 and lut[7] == 4 and lut[0] == 0
    with pytest.raises(ValueError, match="two classes"):
        class_members(["vertebrae", "thoracic"])


# ---------------------------------------------------------- training one case and inference
def _case_eval(model_path, dataset, case="chest"):
    from x2recon.dataset.spider_data import SpiderDataset
    from x2recon.metrics.volume import volume_metrics
    from x2recon.nn.checkpoint import load_model
    from x2recon.spider.inference import predict_grid

    model, _ = load_model(model_path, "cpu", network="spider")
    mc = model.cfg
    ds = SpiderDataset(dataset, "all", views=mc.views, classes=mc.classes, image_size=mc.image_size, augment=False)
    i = [c.case_id for c in ds.cases].index(case)
    images, grid = ds.pair(i)
    ct, cls = ds.targets(i)
    inten, lab = predict_grid(model, images, grid, ct.shape[0])
    hu = mc.unit_to_hu(inten.numpy().astype(np.float64))
    h = ds.cases[i].box_size / ct.shape[0]
    return model, ds, i, volume_metrics(hu, ct, lab.numpy(), cls, spacing=(h, h, h), labels={"thoracic": 1}), ct


def test_overfitting_one_case_reaches_stated_psnr_and_dice(tiny_spider_model, tiny_x2b_dataset):
    """250 Adam steps on the training case (CPU): PSNR ≥ 30 dB over [−1024, 3071] HU — a constant
    prediction of the case's mean scores 19 dB — and Dice of the thoracic vertebrae ≥ 0.8."""
    from x2recon.metrics.volume import psnr

    _, _, _, m, ct = _case_eval(tiny_spider_model, tiny_x2b_dataset)
    g = np.clip(ct.astype(float), -1024, 3071)
    baseline = psnr(np.full_like(g, g.mean()), g, 4095)
    assert baseline < 20
    assert m.psnr >= 30.0, m
    assert m.dice["thoracic"] >= 0.8, m
    assert m.hd95["thoracic"] < 10.0  # mm, on a 3 mm grid


def test_chunked_equals_one_shot(tiny_spider_model, tiny_x2b_dataset):
    from x2recon.spider.inference import predict_grid

    from x2recon.dataset.spider_data import SpiderDataset
    from x2recon.nn.checkpoint import load_model

    model, _ = load_model(tiny_spider_model, "cpu", network="spider")
    mc = model.cfg
    ds = SpiderDataset(tiny_x2b_dataset, "all", views=mc.views, classes=mc.classes, image_size=mc.image_size, augment=False)
    images, grid = ds.pair(0)
    a_i, a_l = predict_grid(model, images, grid, 32, chunk=32 ** 3)
    b_i, b_l = predict_grid(model, images, grid, 32, chunk=777)
    torch.testing.assert_close(a_i, b_i, rtol=0, atol=1e-6)
    assert torch.equal(a_l, b_l)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(tiny_spider_model, tiny_x2b_dataset):
    from x2recon.dataset.spider_data import SpiderDataset
    from x2recon.nn.checkpoint import load_model
    from x2recon.spider.inference import predict_grid

    cpu, _ = load_model(tiny_spider_model, "cpu", network="spider")
    gpu, _ = load_model(tiny_spider_model, "cuda", network="spider")
    mc = cpu.cfg
    ds = SpiderDataset(tiny_x2b_dataset, "all", views=mc.views, classes=mc.classes, image_size=mc.image_size, augment=False)
    images, grid = ds.pair(0)
    a_i, a_l = predict_grid(cpu, images, grid, 32)
    b_i, b_l = predict_grid(gpu, images, grid, 32, precision="fp32")
    torch.testing.assert_close(a_i, b_i.cpu(), rtol=0, atol=2e-4)
    assert (a_l == b_l.cpu()).float().mean() > 0.999


def test_resume_continues_where_it_stopped(tiny_x2b_dataset, tmp_path):
    from x2recon.train.common import TrainSettings
    from x2recon.spider.train import train_spider

    cfg = SpiderConfig(**{**SMALL, "image_size": 64, "classes": ["thoracic"]}, prefer_tcnn=False)
    kw = dict(n_points=512, optimizer="sgd", val_split="", augment=True)
    s = TrainSettings(out=str(tmp_path), epochs=10**6, max_steps=2, batch_size=1, workers=0, save_every=0, progress=False)
    assert train_spider(tiny_x2b_dataset, s, cfg, **kw)["steps"] == 2
    s.max_steps = 4
    logs = []
    assert train_spider(tiny_x2b_dataset, s, cfg, log=logs.append, **kw)["steps"] == 4
    assert any("resuming" in m and "step 2" in m for m in logs)
    other = SpiderConfig(**{**SMALL, "image_size": 64, "classes": ["thoracic"], "hidden": 8}, prefer_tcnn=False)
    from x2recon.nn.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="hidden"):
        train_spider(tiny_x2b_dataset, s, other, **kw)


# --------------------------------------------------------------------------------- the CLI
def _drr(dataset, case, view):
    return dataset / "cases" / case / "images" / f"{view}_64.png"


def test_cli_writes_ct_and_labels_in_lps_on_the_box(tiny_spider_model, tiny_x2b_dataset, tmp_path, capsys):
    import SimpleITK as sitk

    from x2recon.cli import main
    from x2recon.spider.inference import read_label_members, read_label_names

    ct, seg = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    rc = main(["spider", "--pa", str(_drr(tiny_x2b_dataset, "chest", "AP")), "--lat",
               str(_drr(tiny_x2b_dataset, "chest", "LAT")), "--model", str(tiny_spider_model), "--out", str(ct),
               "--labels", str(seg), "--resolution", "32", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    img = sitk.ReadImage(str(ct))
    meta = json.loads((tiny_x2b_dataset / "cases" / "chest" / "meta.json").read_text())
    box, iso = meta["box_size"], np.array(meta["isocenter"])
    h = box / 32
    np.testing.assert_allclose(img.GetSpacing(), [h] * 3, rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), iso - box / 2 + h / 2, atol=1e-3)
    a = sitk.GetArrayFromImage(img)
    assert a.dtype == np.int16 and a.min() >= -1100 and a.max() > 300  # air and bone
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))
    assert set(np.unique(lab)) <= {0, 1} and (lab == 1).sum() > 20
    assert read_label_names(seg) == {1: "thoracic"}
    assert "vertebrae_T7" in read_label_members(seg)["thoracic"]


def test_cli_bad_inputs_give_clear_errors(tiny_spider_model, tiny_x2b_model, tiny_x2b_dataset, tmp_path, capsys):
    from x2recon.cli import main

    ap, lat = str(_drr(tiny_x2b_dataset, "chest", "AP")), str(_drr(tiny_x2b_dataset, "chest", "LAT"))
    base = ["spider", "--model", str(tiny_spider_model), "--out", str(tmp_path / "ct.nii.gz"), "--resolution", "8", "--quiet"]

    def err(args):
        assert main(args) == 2
        return capsys.readouterr().err

    e = err(base + ["--pa", str(tmp_path / "missing.png"), "--lat", lat])
    assert "missing.png" in e and "not found" in e
    assert "frontal and a lateral" in err(base + ["--pa", ap, "--lat", ap])  # the same view twice
    # a geometry for another image size
    geo = json.loads((tiny_x2b_dataset / "cases" / "chest" / "images" / "AP.json").read_text())
    (tmp_path / "g.json").write_text(json.dumps(geo))
    assert "geometry is for 128×128" in err(base + ["--pa", ap, "--lat", lat, "--pa-geometry", str(tmp_path / "g.json")])
    # another case's lateral: its box is elsewhere
    other = str(_drr(tiny_x2b_dataset, "chest_v01", "LAT"))
    meta0 = json.loads((tiny_x2b_dataset / "cases" / "chest" / "meta.json").read_text())
    meta1 = json.loads((tiny_x2b_dataset / "cases" / "chest_v01" / "meta.json").read_text())
    if not np.allclose(meta0["isocenter"], meta1["isocenter"], atol=1e-3):
        assert "share one reconstruction box" in err(base + ["--pa", ap, "--lat", other])
    # a non-square X-ray without geometry: the training detector is square
    from x2recon.io.image import write_png16

    write_png16((np.random.default_rng(0).random((64, 48)) * 65535).astype(np.uint16), tmp_path / "rect.png")
    assert "square" in err(base + ["--pa", str(tmp_path / "rect.png"), "--lat", lat])
    # an X2B checkpoint is not a SPIDER
    assert "X2B model" in err(["spider", "--model", str(tiny_x2b_model), "--out", str(tmp_path / "c.nii.gz"),
                               "--pa", ap, "--lat", lat, "--quiet"])


def test_evaluate_prints_the_papers_tables(tiny_spider_model, tiny_x2b_dataset, tmp_path, capsys):
    from x2recon.cli import main

    out = tmp_path / "eval.csv"
    assert main(["evaluate", "--model", str(tiny_spider_model), "--data", str(tiny_x2b_dataset), "--split", "train",
                 "--out", str(out), "--meshes", str(tmp_path / "vols"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "PSNR (dB)" in text and "HD95 (mm)" in text and "thoracic" in text and "Avg" in text
    rows = out.read_text().splitlines()
    assert rows[0].startswith("case,psnr,ssim,dice,hd95,chamfer") and len(rows) == 2
    psnr = float(rows[1].split(",")[1])
    assert psnr > 30
    assert (tmp_path / "vols" / "chest_ct.nii.gz").is_file() and (tmp_path / "vols" / "chest_labels.nii.gz").is_file()


def test_compare_matches_the_metrics_computed_directly(tiny_spider_model, tiny_x2b_dataset, chest_half):
    """compare() resamples the ground truth onto the reconstruction's grid and maps names to classes."""
    from x2recon.dataset.spider_targets import resample_to_box
    from x2recon.dataset.torch_data import load_view
    from x2recon.io.volume import read_ct, read_labelmap
    from x2recon.metrics.volume import volume_metrics
    from x2recon.nn.checkpoint import load_model
    from x2recon.spider.inference import compare, reconstruct_ct
    from x2recon.structures import totalseg_v2

    model, cfg = load_model(tiny_spider_model, "cpu", network="spider")
    folder = tiny_x2b_dataset / "cases" / "chest"
    xr = [load_view(folder, v, 64) for v in ("AP", "LAT")]
    res = reconstruct_ct(model, xr, resolution=32)
    gt_ct, gt_lab = read_ct(chest_half[0]), read_labelmap(chest_half[1])
    names = totalseg_v2()
    got = compare(res.ct, res.labels, res.names, gt_ct, gt_lab, names, res.members)
    g = res.ct
    iso = np.asarray(g.origin) + 16 * g.spacing[0] - g.spacing[0] / 2
    ct_box, lab_box = resample_to_box(gt_ct, gt_lab, iso, 32 * g.spacing[0], 32)
    ids = [i for i, n in names.items() if n.startswith("vertebrae_T")]
    direct = volume_metrics(res.ct.array, ct_box.array, res.labels.array, np.isin(lab_box.array, ids).astype(np.uint8),
                            spacing=(g.spacing[0],) * 3, labels={"thoracic": 1})
    assert got["psnr"] == pytest.approx(direct.psnr, rel=1e-9)
    assert got["ssim"] == pytest.approx(direct.ssim, rel=1e-9)
    assert got["structures"]["thoracic"]["dice"] == pytest.approx(direct.dice["thoracic"], rel=1e-9)
    assert got["structures"]["thoracic"]["dice"] > 0.5


def test_render_pair_from_ct_matches_the_dataset_drrs(tiny_spider_model, tiny_x2b_dataset, chest_half):
    from x2recon.dataset.torch_data import load_view
    from x2recon.io.volume import read_ct, read_labelmap
    from x2recon.nn.checkpoint import read_config
    from x2recon.spider.inference import render_pair_from_ct

    cfg = read_config(tiny_spider_model)
    pair = render_pair_from_ct(read_ct(chest_half[0]), cfg, read_labelmap(chest_half[1]), device="cpu")
    folder = tiny_x2b_dataset / "cases" / "chest"
    for x, v in zip(pair, ("AP", "LAT")):
        ref = load_view(folder, v, 128)
        assert x.geometry.name == v
        np.testing.assert_allclose(x.geometry.matrix(), ref.geometry.matrix(), atol=1e-6)
        assert np.abs(x.image - ref.image).mean() < 0.01


def test_fit_to_ct_freezes_the_decoder_and_fits_the_intensities(tiny_spider_model, tiny_x2b_dataset):
    """§6.1: only the encoder and hash encoding change, and the fitted copy's intensities move towards
    the given CT (here a variant's CT seen through the training case's X-rays)."""
    from x2recon.dataset.torch_data import load_view
    from x2recon.io.volume import read_ct
    from x2recon.metrics.volume import psnr
    from x2recon.nn.checkpoint import load_model
    from x2recon.spider.inference import fit_to_ct, reconstruct_ct

    model, _ = load_model(tiny_spider_model, "cpu", network="spider")
    folder = tiny_x2b_dataset / "cases" / "chest_v01"
    xr = [load_view(folder, v, 64) for v in ("AP", "LAT")]
    ct = read_ct(folder / "spider" / "ct.nii.gz")
    before = reconstruct_ct(model, xr, resolution=32)
    fitted = fit_to_ct(model, xr, ct, steps=40, lr=3e-3, n_points=4096)
    after = reconstruct_ct(fitted, xr, resolution=32)
    for (k, a), b in zip(model.decoder.state_dict().items(), fitted.decoder.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(model.encoding.params, fitted.encoding.params)
    gt = np.clip(ct.array[1::4, 1::4, 1::4].astype(float), -1024, 3071)  # 128-grid voxels half a voxel from the 32³ centres
    p0 = psnr(np.clip(before.ct.array, -1024, 3071), gt, 4095)
    p1 = psnr(np.clip(after.ct.array, -1024, 3071), gt, 4095)
    assert p1 > p0 + 0.5, (p0, p1)
    assert after.labels.array.any()
