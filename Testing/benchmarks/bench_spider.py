"""Benchmark: SPIDER training iterations/s and full-grid inference time, same run, same network.

  * train: one optimiser step (forward, L1 + Dice loss, backward, Adam) on a batch of ``--batch`` cases
    of ``--points`` points each; autocast bf16 on CUDA; the hash encoding's Triton kernels vs its torch
    path (peer) on CUDA.
  * infer: the whole ``--resolution``³ grid (encode both views once, decode in ``--chunk`` points), in
    fp16 (the CLI's default on CUDA) and fp32; the fp16 result is compared with fp32 (max |ΔHU|,
    label agreement).  Target: ≤ 1 s for 256³ on an H100.
Inputs are random images and real chest geometries (the network's speed does not depend on the
weights); ``--model CKPT`` times a trained checkpoint instead.

Usage:
  python Testing/benchmarks/bench_spider.py                        # CUDA if available
  python Testing/benchmarks/bench_spider.py --device cpu --resolution 64 --steps 3
Not collected by pytest (file name bench_*.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _record

import _record  # noqa: E402

from x2recon.geometry import ProjectionGeometry  # noqa: E402
from x2recon.spider.network import SpiderConfig, build_spider, spider_loss  # noqa: E402
from x2recon.spider.inference import predict_grid  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def inputs(cfg, batch, dev, gen):
    S = cfg.image_size
    grids = []
    for v in cfg.views:
        g = ProjectionGeometry.from_view(v, (0, 0, 0), size=(S, S))
        grids.append(g.box_to_grid_matrix())
    grid = torch.tensor(np.stack(grids), dtype=torch.float32)[None].repeat(batch, 1, 1, 1)
    images = torch.rand(batch, 2, 1, S, S, generator=gen)
    return images.to(dev), grid.to(dev)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", help="a SPIDER checkpoint (default: the default architecture, random weights)")
    ap.add_argument("--classes", type=int, default=5, help="foreground classes of the random network")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--points", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps (median)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1 << 21)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    _record.add_json_arg(ap)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    gen = torch.Generator().manual_seed(0)
    if a.model:
        from x2recon.nn.checkpoint import load_model

        model, _ = load_model(a.model, dev, network="spider")
        cfg = model.cfg
    else:
        cfg = SpiderConfig(classes=[f"class{i}" for i in range(a.classes)], prefer_tcnn=False)
        model = build_spider(cfg, device=dev).to(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"SPIDER {cfg.image_size}² views, UNet {cfg.unet_channels}, hash {cfg.hash['n_levels']}×"
          f"{cfg.hash['n_features_per_level']} (2^{cfg.hash['log2_hashmap_size']}), MLP {cfg.layers}×{cfg.hidden}, "
          f"{cfg.n_classes} logits; {sum(p.numel() for p in model.parameters()):,} parameters; device {dev} ({name})")
    kernels = ["auto", "torch"] if dev.type == "cuda" and getattr(model.encoding, "backend", "") == "torch" else ["auto"]

    # ---- training step
    images, grid = inputs(cfg, a.batch, dev, gen)
    pts = (torch.rand(a.batch, a.points, 3, generator=gen) - 0.5).to(dev)
    inten = torch.rand(a.batch, a.points, generator=gen).to(dev)
    labels = torch.randint(0, max(1, cfg.n_classes), (a.batch, a.points), generator=gen).to(dev)
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    train_rows = []
    for k in kernels:
        if hasattr(model.encoding, "kernel"):
            model.encoding.kernel = k

        def step():
            with amp:
                out = model(images, grid, pts)
            loss = spider_loss(out, inten, labels, 1.0)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(2):
            step()
        ts = []
        for _ in range(a.steps):
            sync(dev)
            t = time.perf_counter()
            step()
            sync(dev)
            ts.append(time.perf_counter() - t)
        train_rows.append((k, statistics.median(ts)))
    print(f"\ntraining step: batch {a.batch} × {a.points} points")
    base = train_rows[0][1]
    for k, t in train_rows:
        label = "hash: Triton kernels" if (k == "auto" and dev.type == "cuda") else f"hash: {k if k != 'auto' else 'torch'} path"
        print(f"  {label:24s} {t * 1e3:8.1f} ms/step  {1 / t:7.1f} it/s  {a.batch / t:8.1f} cases/s  ×{t / base:.2f} vs first row")

    # ---- full-grid inference
    model.eval()
    n = a.resolution
    print(f"\ninference: {n}³ = {n ** 3:,} points, chunk {a.chunk:,}")
    results = {}
    for k in kernels:
        if hasattr(model.encoding, "kernel"):
            model.encoding.kernel = k
        for prec in (["fp16", "fp32"] if dev.type == "cuda" else ["fp32"]):
            out = {}

            def run():
                out["r"] = predict_grid(model, images[0], grid[0], n, chunk=a.chunk, precision=prec)

            t = timed(run, dev, a.repeats)
            results[(k, prec)] = (t, out["r"])
            label = f"{'Triton' if (k == 'auto' and dev.type == 'cuda') else 'torch'} hash, {prec}"
            print(f"  {label:24s} {t:8.3f} s   {n ** 3 / t:10.3e} points/s")
    ref = results[(kernels[0], "fp32")][1]
    for key, (t, r) in results.items():
        if key == (kernels[0], "fp32"):
            continue
        dhu = float((r[0] - ref[0]).abs().max()) * (cfg.hu_max - cfg.hu_min)
        agree = float((r[1] == ref[1]).float().mean()) if r[1] is not None else float("nan")
        print(f"  {key}: max |ΔHU| vs {kernels[0]}/fp32 {dhu:.2f}, labels agree {agree * 100:.4f} %")
    if dev.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
    prec = "fp16" if dev.type == "cuda" else "fp32"
    t_inf = results[(kernels[0], prec)][0]
    peer = results.get(("torch", prec))
    _record.write(a.json, [
        _record.figure(f"SPIDER {n}³ inference ({prec})", t_inf, "s", device=dev,
                       peer="same network, torch hash path" if peer else None, peer_value=peer[0] if peer else None,
                       target="≤ 20 ms at 256³ (issue 15, H100)", peak_gib=_record.peak_gib(dev)),
        _record.figure(f"SPIDER training step, batch {a.batch} × {a.points} points", 1 / train_rows[0][1], "it/s",
                       device=dev, better="higher",
                       peer="same network, torch hash path" if len(train_rows) > 1 else None,
                       peer_value=1 / train_rows[1][1] if len(train_rows) > 1 else None)])


if __name__ == "__main__":
    main()
