"""Benchmark: forward + backward throughput of the multiresolution hash encoding, same run, same points.

  * ours: ``x2recon.spider.hash_encoding.HashEncoding`` — on CUDA its Triton kernels
    (``hash_triton``), and its torch path (custom backward that recomputes indices, chunked) as a
    second row,
  * compiled: ``torch.compile(hash_encode_plain)``, the same formula with autograd's own backward,
  * tcnn: ``tinycudann.Encoding`` (float32 and its default precision) when it imports and the device
    is CUDA.
Each runs ``--points`` uniform points in [0, 1]³ through the encoding, sums the output against a
random cotangent and back-propagates to the parameters (and, with ``--input-grad``, to the points).
Prints median seconds per step, points/s and the ratio to ours.  Outputs are checked against ours.

Usage:
  python Testing/benchmarks/bench_hash_encoding.py                       # 2^20 points, CUDA if available
  python Testing/benchmarks/bench_hash_encoding.py --device cpu --points 65536 --threads 2
Not collected by pytest (file name bench_*.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _record

import _record  # noqa: E402

from x2recon.spider.hash_encoding import (  # noqa: E402
    HashEncoding,
    HashEncodingConfig,
    TcnnHashEncoding,
    hash_encode_plain,
    tcnn_available,
)


def timed(step, dev, repeats):
    """Median wall seconds of ``step()`` after one warm-up call."""
    step()
    ts = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=1 << 20)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--levels", type=int, default=16)
    ap.add_argument("--features", type=int, default=2)
    ap.add_argument("--log2-hashmap-size", type=int, default=19)
    ap.add_argument("--base-resolution", type=int, default=16)
    ap.add_argument("--per-level-scale", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--input-grad", action="store_true", help="also back-propagate to the points")
    ap.add_argument("--no-compile", action="store_true")
    _record.add_json_arg(ap)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    cfg = HashEncodingConfig(n_levels=a.levels, n_features_per_level=a.features,
                             log2_hashmap_size=a.log2_hashmap_size, base_resolution=a.base_resolution,
                             per_level_scale=a.per_level_scale)
    ours = HashEncoding(cfg, device=dev)
    n_hashed = sum(lv.hashed for lv in ours.levels)
    print(f"{a.points} points, {cfg.n_levels} levels ({n_hashed} hashed) × {cfg.n_features_per_level} features, "
          f"T = 2^{cfg.log2_hashmap_size}, N_min {cfg.base_resolution}, b {cfg.per_level_scale}, "
          f"{ours.n_params} params; device {dev} "
          f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}); "
          f"forward + backward to params{' and points' if a.input_grad else ''}")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(a.points, 3, generator=gen).to(dev).requires_grad_(a.input_grad)
    g = torch.randn(a.points, ours.n_output_dims, generator=gen).to(dev)
    with torch.no_grad():
        ours.params.uniform_(-1, 1)

    def make_step(fn, params):
        def step():
            y = fn(x)
            wrt = (params, x) if a.input_grad else (params,)
            torch.autograd.grad(y, wrt, g.to(y.dtype))
            return y
        return step

    rows = []
    torch_path = HashEncoding(cfg, device=dev, kernel="torch")
    with torch.no_grad():
        torch_path.params.copy_(ours.params)
    uses_triton = ours._use_triton(x.detach(), ours.params)
    t = timed(make_step(ours, ours.params), dev, a.repeats)
    rows.append((f"ours ({'Triton kernels' if uses_triton else 'torch path'})", t, None))
    with torch.no_grad():
        y_ref = ours(x)
    if uses_triton:
        t = timed(make_step(torch_path, torch_path.params), dev, a.repeats)
        with torch.no_grad():
            err = float((torch_path(x) - y_ref).abs().max())
        rows.append(("ours (torch path, custom backward)", t, err))

    if not a.no_compile:
        p = ours.params.detach().clone().requires_grad_(True)
        levels, f = ours.levels, cfg.n_features_per_level
        compiled = torch.compile(lambda xx, pp: hash_encode_plain(xx, pp, levels, f), dynamic=False)
        t0 = time.perf_counter()
        try:
            step = make_step(lambda xx: compiled(xx, p), p)
            step()
            print(f"torch.compile: first call (compilation) {time.perf_counter() - t0:.1f} s")
            t = timed(step, dev, a.repeats)
            with torch.no_grad():
                err = float((compiled(x, p) - y_ref).abs().max())
            rows.append(("torch.compile(plain formula)", t, err))
        except Exception as e:  # inductor needs a C++ compiler on CPU, Triton on CUDA
            print(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    ok, why = tcnn_available()
    if ok and dev.type == "cuda":
        for dtype in (torch.float32, None):
            tc = TcnnHashEncoding(cfg, dtype=dtype)
            with torch.no_grad():
                tc.params.copy_(ours.params.to(tc.params.dtype))
            t = timed(make_step(tc, tc.params), dev, a.repeats)
            with torch.no_grad():
                err = float((tc(x) - y_ref).abs().max())
            rows.append((f"tinycudann ({'fp32' if dtype else 'default precision'})", t, err))
    else:
        print(f"tinycudann not run: {why if not ok else 'device is not CUDA'}")

    base = rows[0][1]
    print(f"{'implementation':34s} {'s/step':>9s} {'points/s':>12s} {'× ours':>7s} {'max |Δy| vs ours':>17s}")
    for name, t, err in rows:
        e = "" if err is None else f"{err:.2e}"
        print(f"{name:34s} {t:9.4f} {a.points / t:12.3e} {base / t:7.2f} {e:>17s}")
    name = f"hash encoding {a.points} pts, {cfg.n_levels} levels, fwd+bwd"
    records = []
    for peer in ("torch.compile(plain formula)", "tinycudann (default precision)"):
        match = [r for r in rows if r[0] == peer]
        records.append(_record.figure(
            name, a.points / base, "points/s", device=dev, better="higher",
            peer=peer if match else f"{peer}: not run", peer_value=a.points / match[0][1] if match else None,
            target="≥ 1e9 points/s (issue 15, H100)", peak_gib=_record.peak_gib(dev), notes=rows[0][0]))
    _record.write(a.json, records)


if __name__ == "__main__":
    main()
