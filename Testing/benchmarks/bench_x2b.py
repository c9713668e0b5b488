"""X2B speed: training throughput against the bare encoder's ceiling, and X-ray → mesh latency.

  python Testing/benchmarks/bench_x2b.py train   [--device cuda] [--backbone convnext_base] [--batch 64] [--compile]
  python Testing/benchmarks/bench_x2b.py latency [--device cpu] [--model CKPT] [--resolution 256]

``train`` measures, in one run on one device, (1) the encoder alone, forward + backward on random
images (the ceiling: X2B cannot train faster than its encoder), (2) the whole X2B step on random
tensors, (3) ``x2recon train`` end to end with data loading from a dataset (``--data``, else one
built from the sample chest CT into a temporary folder), and prints (2)/(1) and (3)/(1).
Targets (issue 3): (3) ≥ 80 % of (1) on a GPU.
``latency`` times ``reconstruct`` (encode + MISE + marching cubes) from a stored DRR (default model: the
default bundled bone model, `skeleton`; `--model demo` for the older one), and reports MISE's evaluations against a dense grid, wall and CPU seconds, and on
CPU the decoder's FLOPs against a matrix-product rate measured in the same run (its bound).
Targets (issue 15): ≤ 0.3 s on an H100, ≤ 5 s on 2 CPU cores at 256³.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # conftest.shared_data_dir
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _record
import _record  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _amp(device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def time_steps(step, n: int, warmup: int, device) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - t) / n


def build_data(tmp: Path, image_size: int) -> Path:
    from conftest import shared_data_dir

    from x2recon.dataset.builder import build_dataset
    from x2recon.dataset.case import CaseInput
    from x2recon.dataset.config import BuildConfig

    d = shared_data_dir() / "chest_lidc0001_half"
    cfg = BuildConfig(views=["AP", "PA", "LAT"], drr_size=256, x2b_size=image_size, variants=3)
    build_dataset([CaseInput("chest", str(d / "ct.nii.gz"), str(d / "labels.nii.gz"))], tmp, cfg, progress=False)
    return tmp


def bench_train(a) -> None:
    from x2recon.x2b.network import X2BConfig, build_model
    from x2recon.train.common import TrainSettings
    from x2recon.x2b.train import occupancy_loss, train_x2b

    device = torch.device(a.device)
    cfg = X2BConfig(backbone=a.backbone, image_size=a.image_size, local_features=a.local_features, fourier=a.fourier)
    model = build_model(cfg).to(device)
    if device.type == "cuda":
        model.use_channels_last()
    B, S = a.batch, a.image_size
    x = torch.rand(B, 1, 1, S, S, device=device)
    grid = torch.randn(B, 1, 3, 4, device=device) * 0.1
    pts = torch.rand(B, a.points, 3, device=device) - 0.5
    occ = (torch.rand(B, a.points, device=device) < 0.2).float()
    enc = model.encoder
    enc_fwd = torch.compile(enc) if a.compile else enc
    full = torch.compile(model) if a.compile else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    xin = x[:, 0].contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x[:, 0]

    def enc_step():
        with _amp(device):
            g, maps, last = enc_fwd(model.normalise(xin))
            loss = g.float().mean() + sum(m.float().mean() for m in maps)
        loss.backward()

    def full_step():
        with _amp(device):
            logits = full(x, grid, pts)
        loss = occupancy_loss(logits, occ)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_enc = time_steps(enc_step, a.steps, 3, device)
    t_full = time_steps(full_step, a.steps, 3, device)
    ceiling = B / t_enc
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{a.backbone}, batch {B}, {S}², {a.points} points, compile={a.compile}")
    print(f"encoder fwd+bwd (ceiling): {ceiling:8.1f} img/s")
    print(f"X2B step, random tensors:  {B / t_full:8.1f} img/s  = {B / t_full / ceiling:.0%} of the ceiling")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(a.data) if a.data else build_data(Path(tmp) / "data", S)
        s = TrainSettings(out=str(Path(tmp) / "run"), epochs=10**6, max_steps=a.e2e_steps, batch_size=B, lr=1e-4,
                          workers=a.workers, device=str(device), compile=a.compile, save_every=0, progress=False,
                          val_every=10**6)
        r = train_x2b(data, s, cfg, n_points=a.points, val_split="", train_split=a.split)
        e2e = r.get("samples_per_s_steady") or r["samples_per_s"]  # steady: after the warm-up steps
        print(f"x2recon train end to end:  {e2e:8.1f} img/s  = {e2e / ceiling:.0%} of the ceiling "
              f"(data loading with {a.workers} workers, {r['steps']} steps)")
    what = f"X2B training, {a.backbone} {S}², batch {B}, {'bf16' if device.type == 'cuda' else 'fp32'}"
    _record.write(a.json, [
        _record.figure(what + ", end to end with data loading", e2e, "img/s", device=device, better="higher",
                       peer="encoder alone fwd+bwd (ceiling)", peer_value=ceiling, peak_gib=_record.peak_gib(device),
                       target="≥ 80 % of the encoder ceiling (ratio ≥ 0.8)",
                       notes=f"X2B step on random tensors {B / t_full:.1f} img/s; compile={a.compile}")])


def decoder_flops_per_point(folded) -> int:
    """Multiply-add FLOPs of one point through the folded occupancy decoder (its matrix products)."""
    mats = [folded.wp, folded.wl, folded.wo] + [w for blk in folded.blocks for w in (blk[2], blk[4])]
    return sum(2 * w.numel() for w in mats if w is not None)


def matmul_rate(rows: int, k: int, n: int, threads: int, windows: int = 8, seconds: float = 0.25) -> float:
    """GFLOP/s of ``threads`` pool threads each running single-threaded (rows × k) @ (k × n) products —
    the decoder's shape and threading on CPU: the ceiling its MLP can reach on this machine.  Each
    thread keeps its best of ``windows`` short windows, so a moment of other load does not lower it."""
    from concurrent.futures import ThreadPoolExecutor

    def work(_):
        a, b = torch.randn(rows, k), torch.randn(k, n)
        c = torch.empty(rows, n)
        best = 0.0
        for _ in range(windows):
            reps, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds:
                for _ in range(10):
                    torch.mm(a, b, out=c)
                reps += 10
            best = max(best, 2.0 * rows * k * n * reps / (time.perf_counter() - t))
        return best

    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return sum(pool.map(work, range(threads))) / 1e9


def bench_latency(a) -> None:
    from x2recon.dataset.torch_data import load_view
    from x2recon.demo import bundled_model
    from x2recon.nn.checkpoint import load_model
    from x2recon.x2b import reconstruct as rc

    device = torch.device(a.device)
    model, cfg = load_model(a.model or bundled_model(), device)
    with tempfile.TemporaryDirectory() as tmp:
        if a.data:
            case = next(p for p in sorted((Path(a.data) / "cases").iterdir()) if (p / "meta.json").is_file())
        else:
            from x2recon.dataset.case import CaseInput, build_case
            from x2recon.dataset.config import BuildConfig
            from conftest import shared_data_dir

            build = dict(cfg["dataset"]["build"], views=["AP"], angles=[], variants=0)
            d = shared_data_dir() / "chest_lidc0001_half"
            r = build_case(CaseInput("bench_v90", str(d / "ct.nii.gz"), str(d / "labels.nii.gz"), None, 90),
                           Path(tmp), config=BuildConfig.from_dict(build))
            case = r.case_dir
        x = load_view(case, "AP", model.cfg.image_size)
        rc.reconstruct(model, [x], resolution=64, device=device)  # warm-up (allocations, kernels)
        prob, spent = rc.OccupancyField.prob, [0.0]

        def timed_prob(self, pts):  # the time spent in network evaluations (MISE's calls), for the split
            t = time.perf_counter()
            try:
                return prob(self, pts)
            finally:
                spent[0] += time.perf_counter() - t

        rc.OccupancyField.prob = timed_prob
        times, cpus, evals = [], [], []
        for _ in range(a.repeats):
            _sync(device)
            spent[0], c0 = 0.0, _record.cpu_seconds()
            rec = rc.reconstruct(model, [x], resolution=a.resolution, device=device)
            _sync(device)
            times.append(rec.seconds)
            cpus.append(_record.cpu_seconds() - c0)
            evals.append(spent[0])
        rc.OccupancyField.prob = prob
        folded = rc.OccupancyField(model, [x], device).folded
    med = sorted(range(a.repeats), key=lambda i: times[i])[a.repeats // 2]
    flops = decoder_flops_per_point(folded) * rec.evaluations
    bound = ""
    if device.type == "cpu":
        hidden = folded.blocks[0][2].shape[0] if folded.blocks else 128
        peak = matmul_rate(rc.CPU_CHUNK, hidden, hidden, torch.get_num_threads())
        bound = (f"; decoder {flops / 1e12:.3f} TFLOP, network evaluations {evals[med]:.2f} s = "
                 f"{flops / evals[med] / 1e9:.0f} GFLOP/s incl. local-feature sampling vs matmul {peak:.0f} GFLOP/s "
                 f"({rc.CPU_CHUNK}×{hidden}×{hidden}, {torch.get_num_threads()} threads) → the MLP alone needs ≥ "
                 f"{flops / peak / 1e9:.2f} s here")
    print(f"device {device}, model {cfg['model']['backbone']} hidden {cfg['model']['hidden']}, {a.resolution}³, "
          f"{_record.load_note()}")
    print(f"X-ray → mesh: best {min(times):.2f} s, median {times[med]:.2f} s wall ({cpus[med]:.1f} CPU-s) over "
          f"{a.repeats}; {rec.evaluations:,} evaluations vs dense {rec.dense_evaluations:,} "
          f"({rec.dense_evaluations / rec.evaluations:.1f}× fewer), {len(rec.mesh.faces):,} triangles{bound}")
    _record.write(a.json, [_record.figure(
        f"X-ray → mesh, {a.resolution}³ MISE, {cfg['model']['backbone']}", times[med], "s",
        device=device, peak_gib=_record.peak_gib(device), target="≤ 0.3 s H100; ≤ 5 s on 2 CPU cores (issue 15)",
        notes=f"{cpus[med]:.1f} CPU-s, {_record.load_note()}; {rec.evaluations:,} network evaluations "
              f"(dense {rec.dense_evaluations:,}), {evals[med]:.2f} s in them{bound}")])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--backbone", default="convnext_base")
    t.add_argument("--image-size", type=int, default=224)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--points", type=int, default=2048)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--e2e-steps", type=int, default=60)
    t.add_argument("--workers", type=int, default=8)
    t.add_argument("--local-features", action="store_true")
    t.add_argument("--fourier", type=int, default=0)
    t.add_argument("--compile", action="store_true")
    t.add_argument("--data", help="dataset folder (default: built from the sample CT)")
    t.add_argument("--split", default="all")
    _record.add_json_arg(t)
    t.set_defaults(func=bench_train)
    lat = sub.add_parser("latency")
    lat.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    lat.add_argument("--model", help="checkpoint (default: the default bundled bone model, skeleton)")
    lat.add_argument("--data", help="dataset folder to take the X-ray from (default: a demo-like case)")
    lat.add_argument("--resolution", type=int, default=256)
    lat.add_argument("--repeats", type=int, default=3)
    _record.add_json_arg(lat)
    lat.set_defaults(func=bench_latency)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
