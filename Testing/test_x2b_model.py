"""X2B / X2B2 networks: encoder (offline pretrained weights), CBN decoder and its folded inference
form, pixel-aligned sampling through the geometry, checkpoints and their mismatch errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from x2recon.errors import X2ReconInputError
from x2recon.geometry import ProjectionGeometry
from x2recon.nn.checkpoint import CheckpointError, load_model, read_config, save_checkpoint
from x2recon.x2b.decoder import CBatchNorm1d, FoldedDecoder, OccupancyDecoder
from x2recon.nn.encoders import create_backbone
from x2recon.x2b.network import X2BConfig, build_model

TINY = dict(backbone="convnext_atto", image_size=64, hidden=32, n_blocks=2)


def _randomise_bn(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, torch.nn.Conv1d):
            torch.nn.init.normal_(m.weight, std=0.2)


def test_cbn_starts_as_plain_batch_norm():
    torch.manual_seed(0)
    bn = CBatchNorm1d(8, 4).train()
    x, c = torch.randn(3, 4, 50) * 5 + 2, torch.randn(3, 8)
    ref = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert torch.allclose(bn(x, c), ref, atol=1e-5)


def _conv_reference(dec, p, c, local):
    """ONet's decoder as (B, F, T) 1×1 convolutions (the modules' own Conv1d / BatchNorm1d forwards)."""
    net = dec.fc_p(dec.embed(p).transpose(1, 2))
    if dec.fc_local is not None:
        net = net + dec.fc_local(local.transpose(1, 2))
    for block in dec.blocks:
        net = block(net, c)
    return dec.fc_out(dec.act(dec.bn(net, c))).squeeze(1)


@pytest.mark.parametrize("train", [True, False])
def test_decoder_on_points_layout_equals_the_convolution_form(train):
    """``OccupancyDecoder.forward`` ((B, T, F) linear maps) computes ONet's (B, F, T) convolution form:
    the same logits, gradients of every weight and input, and batch-norm running averages after a step."""
    import copy

    torch.manual_seed(1)
    dec = OccupancyDecoder(16, 32, 3, local_dim=6, fourier=2)
    _randomise_bn(dec)
    ref_dec = copy.deepcopy(dec)
    dec.train(train), ref_dec.train(train)
    c = torch.randn(3, 16)
    p = (torch.rand(3, 200, 3) - 0.5).requires_grad_(True)
    p_ref = p.detach().clone().requires_grad_(True)
    loc = torch.randn(3, 200, 6)
    out, ref = dec(p, c, loc), _conv_reference(ref_dec, p_ref, c, loc)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    (out * torch.linspace(-1, 1, 200)).sum().backward()
    (ref * torch.linspace(-1, 1, 200)).sum().backward()
    torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4)
    for (name, a), (_, b) in zip(dec.named_parameters(), ref_dec.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, a), (_, b) in zip(dec.named_buffers(), ref_dec.named_buffers()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    if train:
        assert int(dec.blocks[0].bn0.bn.num_batches_tracked) == 1


def test_x2b_training_uses_fused_adam_on_cpu_with_the_same_steps(tmp_path):
    """On CPU the X2B task's Adam is torch's fused kernel (where this torch has it), taking the same steps as
    the per-parameter loop Adam it replaces."""
    from x2recon.train.common import Dist, TrainSettings
    from x2recon.x2b.network import X2BConfig
    from x2recon.x2b.train import X2BTask, _fused_adam_on_cpu

    torch.manual_seed(0)
    task = X2BTask(X2BConfig(backbone="convnext_atto", image_size=32, hidden=16, n_blocks=1), None, None, Dist())
    opt = task.make_optimizer(TrainSettings(out=str(tmp_path), lr=1e-2, weight_decay=1e-4))
    assert opt.defaults["fused"] is (True if _fused_adam_on_cpu() else None)
    params = list(task.model.parameters())
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    loop = torch.optim.Adam(twins, lr=1e-2, weight_decay=1e-4, foreach=False)
    for _ in range(3):
        for p, q in zip(params, twins):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        opt.step()
        loop.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)


def test_folded_decoder_equals_decoder_values_and_gradients():
    torch.manual_seed(0)
    dec = OccupancyDecoder(16, 32, 3, local_dim=6)
    _randomise_bn(dec)
    dec.eval()
    c = torch.randn(1, 16)
    p = (torch.rand(1, 500, 3) - 0.5).requires_grad_(True)
    loc = torch.randn(1, 500, 6)
    ref = dec(p, c, loc)[0]
    (g_ref,) = torch.autograd.grad(ref.sum(), p)
    f = FoldedDecoder(dec, c)
    with torch.no_grad():
        assert torch.allclose(f(p[0], loc[0]), ref, atol=1e-4, rtol=1e-5)
    (g,) = torch.autograd.grad(f(p[0], loc[0]).sum(), p)
    assert torch.allclose(g, g_ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="eval mode"):
        FoldedDecoder(dec.train(), c)


def test_unknown_backbone_and_missing_pretrained_file(tmp_path):
    with pytest.raises(ValueError, match="unknown timm backbone"):
        create_backbone("convnext_nonexistent")
    with pytest.raises(X2ReconInputError, match="not found"):
        create_backbone("convnext_atto", pretrained_path=tmp_path / "missing.safetensors")


def test_pretrained_backbone_from_a_local_file(tmp_path):
    """Weights in timm's own (3-channel, with classifier) layout load offline into the 1-channel encoder."""
    import timm

    torch.manual_seed(1)
    src = timm.create_model("convnext_atto", pretrained=False)  # RGB, 1000 classes: as published
    path = tmp_path / "convnext_atto.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    net = create_backbone("convnext_atto", pretrained_path=path)
    sd = net.state_dict()
    stem = src.state_dict()["stem.0.weight"]
    assert sd["stem.0.weight"].shape[1] == 1
    assert torch.allclose(sd["stem.0.weight"], stem.sum(1, keepdim=True), atol=1e-6)  # RGB folded to grey
    k = "stages.3.blocks.1.mlp.fc1.weight"
    assert torch.equal(sd[k], src.state_dict()[k])
    bad = tmp_path / "bad.safetensors"
    save_file({"nothing": torch.zeros(1)}, str(bad))
    with pytest.raises(X2ReconInputError, match="cannot load"):
        create_backbone("convnext_atto", pretrained_path=bad)


@pytest.mark.parametrize("kind,local", [("x2b", False), ("x2b", True), ("x2b2", False), ("x2b2", True)])
def test_forward_shapes_and_view_count(kind, local):
    views = ["AP", "LAT"] if kind == "x2b2" else ["AP"]
    cfg = X2BConfig(kind=kind, local_features=local, views=views, attention_heads=4, **TINY)
    m = build_model(cfg).eval()
    V = cfg.n_views
    out = m(torch.rand(2, V, 1, 64, 64), torch.randn(2, V, 3, 4), torch.rand(2, 100, 3) - 0.5)
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="view"):
        m(torch.rand(2, V + 1, 1, 64, 64), torch.randn(2, V + 1, 3, 4), torch.rand(2, 10, 3))


def test_pixel_aligned_sampling_reads_the_pixel_a_point_projects_to():
    """A point on the ray through a feature-map cell centre samples exactly that cell's feature."""
    cfg = X2BConfig(local_features=True, local_stages=[1], **TINY)
    m = build_model(cfg).eval()
    g = ProjectionGeometry.from_view("LAT", (5.0, -3.0, 40.0), size=(64, 64))
    fmap = torch.randn(1, 7, 8, 8)  # stride 8 on a 64² image
    from x2recon.x2b.network import Code

    code = Code(torch.zeros(1, m.c_dim), [fmap], torch.from_numpy(g.box_to_grid_matrix()).float()[None, None])
    cells = [(0, 0), (3, 5), (7, 2)]
    pts = []
    for r, c in cells:
        col, row = (c + 0.5) * 8 - 0.5, (r + 0.5) * 8 - 0.5  # cell centre in image pixels
        det = g.pixel_to_world(col, row)
        pts.append(g.to_box(g.source + 0.55 * (det - g.source)))  # somewhere on that pixel's ray
    feats = m.sample_local(torch.tensor(np.array(pts), dtype=torch.float32)[None], code)[0]
    for i, (r, c) in enumerate(cells):
        assert torch.allclose(feats[i], fmap[0, :, r, c], atol=1e-5)


@torch.no_grad()
def test_checkpoint_round_trip_and_mismatches(tmp_path):
    torch.manual_seed(0)
    cfg = X2BConfig(local_features=True, **TINY)
    m = build_model(cfg)
    _randomise_bn(m.decoder)
    m.eval()
    conf = {"network": "x2b", "model": cfg.to_dict(), "note": "test"}
    path = save_checkpoint(tmp_path / "m.safetensors", m, conf)
    x, grid, p = torch.rand(1, 1, 1, 64, 64), torch.randn(1, 1, 3, 4), torch.rand(1, 50, 3) - 0.5
    m2, c2 = load_model(path)
    assert c2["note"] == "test" and c2["versions"]["torch"] == torch.__version__
    assert torch.equal(m(x, grid, p), m2(x, grid, p))
    half = save_checkpoint(tmp_path / "h.safetensors", m, conf, half=True)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    m3, _ = load_model(half)
    assert torch.allclose(m(x, grid, p), m3(x, grid, p), atol=0.05 * float(m(x, grid, p).abs().max()) + 1e-3)

    # a config that does not fit the weights
    bigger = {**conf, "model": {**cfg.to_dict(), "hidden": 48}}
    save_file(load_file(str(path)), str(tmp_path / "edited.safetensors"),
              metadata={"x2recon": json.dumps({**read_config(path), "model": bigger["model"]})})
    with pytest.raises(CheckpointError, match="shapes differ"):
        load_model(tmp_path / "edited.safetensors")
    with pytest.raises(CheckpointError, match="hidden: 32 vs 48"):
        load_model(path, expect=bigger["model"])
    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_model(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not an x2recon model"):
        load_model(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    unknown = {**read_config(path), "model": {**cfg.to_dict(), "wings": 2}}
    save_file(load_file(str(path)), str(tmp_path / "future.safetensors"), metadata={"x2recon": json.dumps(unknown)})
    with pytest.raises(CheckpointError, match="wings"):
        load_model(tmp_path / "future.safetensors")
