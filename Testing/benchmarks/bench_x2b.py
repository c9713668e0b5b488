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
CPU the decoder's FLOPs against a matrix-product rate of the precision that ran (``--precision``, default auto)
measured in the same run (its bound), beside fp32, bf16 and int8 product rates and the whole decoder's time
per point in each precision with its largest logit difference from fp32.
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
from x2recon.x2b.decoder import cpu_precision, int8_available  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _amp(device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def time_steps(step, n: int, warmup: int, device, cpu: list | None = None) -> float:
    """Wall seconds per step after ``warmup`` steps; ``cpu[0]`` gets this process's CPU seconds per step."""
    for _ in range(warmup):
        step()
    _sync(device)
    t, c = time.perf_counter(), _record.cpu_seconds()
    for _ in range(n):
        step()
    _sync(device)
    if cpu is not None:
        cpu[0] = (_record.cpu_seconds() - c) / n
    return (time.perf_counter() - t) / n


def build_data(tmp: Path, image_size: int, cases: int = 4) -> Path:
    """A dataset of ``cases`` cases (the sample CT and deformed copies of it), so a step trains a full batch."""
    from conftest import shared_data_dir

    from x2recon.dataset.builder import build_dataset
    from x2recon.dataset.case import CaseInput
    from x2recon.dataset.config import BuildConfig

    d = shared_data_dir() / "chest_lidc0001_half"
    cfg = BuildConfig(views=["AP", "PA", "LAT"], drr_size=256, x2b_size=image_size, variants=max(1, cases - 1))
    build_dataset([CaseInput("chest", str(d / "ct.nii.gz"), str(d / "labels.nii.gz"))], tmp, cfg, progress=False)
    return tmp


def bench_train(a) -> None:
    from x2recon.x2b.network import X2BConfig, build_model
    from x2recon.train.common import TrainSettings
    from x2recon.x2b.train import occupancy_loss, train_x2b

    device = torch.device(a.device)
    cfg = X2BConfig(backbone=a.backbone, image_size=a.image_size, local_features=a.local_features, fourier=a.fourier,
                    hidden=a.hidden, local_stages=[int(v) for v in a.local_stages.split(",")])
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

    cpu = [0.0]
    t_enc = time_steps(enc_step, a.steps, 3, device, cpu)
    cpu_enc = cpu[0] / B  # CPU-s per image, warm-up steps left out
    t_full = time_steps(full_step, a.steps, 3, device, cpu)
    cpu_full = cpu[0] / B
    ceiling = B / t_enc
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{a.backbone}, batch {B}, {S}², {a.points} points, compile={a.compile}")
    print(f"encoder fwd+bwd (ceiling): {ceiling:8.1f} img/s")
    print(f"X2B step, random tensors:  {B / t_full:8.1f} img/s  = {B / t_full / ceiling:.0%} of the ceiling")
    cpu_note = (f"CPU-s per image: encoder fwd+bwd {cpu_enc:.3f}, X2B step {cpu_full:.3f} (the X2B step can reach at "
                f"most {cpu_enc / cpu_full:.0%} of the encoder's rate on CPU; {_record.load_note()})") if device.type == "cpu" else ""
    if cpu_note:
        print(cpu_note)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(a.data) if a.data else build_data(Path(tmp) / "data", S, cases=max(4, B))
        s = TrainSettings(out=str(Path(tmp) / "run"), epochs=10**6, max_steps=a.e2e_steps, batch_size=B, lr=1e-4,
                          workers=a.workers, device=str(device), compile=a.compile, save_every=0, progress=False,
                          val_every=10**6)
        c3 = _record.cpu_seconds(children=True)
        r = train_x2b(data, s, cfg, n_points=a.points, val_split="", train_split=a.split)
        cpu_e2e = (_record.cpu_seconds(children=True) - c3) / (r["steps"] * B)  # data-loading workers included
        e2e = r.get("samples_per_s_steady") or r["samples_per_s"]  # steady: after the warm-up steps
        print(f"x2recon train end to end:  {e2e:8.1f} img/s  = {e2e / ceiling:.0%} of the ceiling "
              f"(data loading with {a.workers} workers, {r['steps']} steps)")
    what = f"X2B training, {a.backbone} {S}², batch {B}, {'bf16' if device.type == 'cuda' else 'fp32'}"
    notes = f"X2B step on random tensors {B / t_full:.1f} img/s; compile={a.compile}"
    if device.type == "cpu":
        # a shared CPU: wall rates taken minutes apart see different loads; CPU-s per image do not
        print(f"end to end {cpu_e2e:.3f} CPU-s per image (setup, data-loading workers and the last checkpoint "
              f"included) = {cpu_enc / cpu_e2e:.0%} of the encoder's images per CPU-s")
        notes = (f"images per CPU-s (the wall rates, taken minutes apart on a shared machine: end to end {e2e:.2f}, "
                 f"encoder {ceiling:.2f}, X2B step {B / t_full:.2f} img/s); {cpu_note}; end to end "
                 f"{cpu_e2e:.3f} CPU-s per image incl. setup, data-loading workers and the last checkpoint")
        e2e, ceiling, unit = 1 / cpu_e2e, 1 / cpu_enc, "img/CPU-s"
    else:
        unit = "img/s"
    _record.write(a.json, [
        _record.figure(what + ", end to end with data loading", e2e, unit, device=device, better="higher",
                       peer="encoder alone fwd+bwd (ceiling)", peer_value=ceiling, peak_gib=_record.peak_gib(device),
                       target="≥ 80 % of the encoder ceiling (ratio ≥ 0.8)", notes=notes)])


def decoder_flops_per_point(folded) -> int:
    """Multiply-add FLOPs of one point through the folded occupancy decoder (its matrix products)."""
    mats = [folded.wp, folded.wl, folded.wo] + [w for blk in folded.blocks for w in (blk[2], blk[4])]
    return sum(2 * w.numel() for w in mats if w is not None)


def _product(rows: int, k: int, n: int, precision: str):
    """A (rows × k) @ (k × n) product as the folded decoder runs it in ``precision`` (fp32 ``mm``, bf16
    ``linear`` with fp32 in and out, int8 dynamically quantised ``Linear``)."""
    a = torch.randn(rows, k)
    if precision == "fp32":
        b, c = torch.randn(k, n), torch.empty(rows, n)
        return lambda: torch.mm(a, b, out=c)
    w = torch.randn(n, k)
    if precision == "bf16":
        w16 = w.to(torch.bfloat16)
        return lambda: torch.nn.functional.linear(a.to(torch.bfloat16), w16).float()
    import warnings

    from torch.ao.quantization import quantize_dynamic

    lin = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(torch.nn.Sequential(lin).eval(), {torch.nn.Linear}, dtype=torch.qint8)
    return lambda: q(a)


def matmul_rate(rows: int, k: int, n: int, threads: int, windows: int = 8, seconds: float = 0.1,
                precision: str = "fp32") -> float:
    """GFLOP/s (GOP/s for int8) of ``threads`` pool threads each running single-threaded (rows × k) @ (k × n)
    products in ``precision`` — the decoder's shape and threading on CPU: the ceiling its MLP can reach on
    this machine with its cores to itself.  Each thread's rate is per second of CPU time it got
    (``time.thread_time``), its best of ``windows`` short windows, so other load on a shared machine (which
    takes CPU time, not this thread's speed while it runs) does not lower it."""
    from concurrent.futures import ThreadPoolExecutor

    def work(_):
        step = _product(rows, k, n, precision)
        best = 0.0
        for _ in range(windows):
            reps, t = 0, time.thread_time()
            while time.thread_time() - t < seconds:
                for _ in range(10):
                    step()
                reps += 10
            best = max(best, 2.0 * rows * k * n * reps / (time.thread_time() - t))
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
        prob, spent, spent_cpu = rc.OccupancyField.prob, [0.0], [0.0]

        def timed_prob(self, pts):  # the time spent in network evaluations (MISE's calls), for the split
            t, c = time.perf_counter(), _record.cpu_seconds()
            try:
                return prob(self, pts)
            finally:
                spent[0] += time.perf_counter() - t
                spent_cpu[0] += _record.cpu_seconds() - c

        rc.OccupancyField.prob = timed_prob
        times, cpus, evals, evals_cpu = [], [], [], []
        for _ in range(a.repeats):
            _sync(device)
            spent[0], spent_cpu[0], c0 = 0.0, 0.0, _record.cpu_seconds()
            rec = rc.reconstruct(model, [x], resolution=a.resolution, device=device, precision=a.precision)
            _sync(device)
            times.append(rec.seconds)
            cpus.append(_record.cpu_seconds() - c0)
            evals.append(spent[0])
            evals_cpu.append(spent_cpu[0])
        rc.OccupancyField.prob = prob
        field = rc.OccupancyField(model, [x], device)
        folded = field.folded
    med = sorted(range(a.repeats), key=lambda i: times[i])[a.repeats // 2]
    flops = decoder_flops_per_point(folded) * rec.evaluations
    bound, extra = "", []
    if device.type == "cpu":
        hidden = folded.blocks[0][2].shape[0] if folded.blocks else 128
        threads = torch.get_num_threads()
        rates = {prec: matmul_rate(rc.CPU_CHUNK, hidden, hidden, threads, precision=prec)
                 for prec in ("fp32", "bf16", "int8") if prec != "int8" or int8_available()}
        peak = rates[rec.precision]
        decoder = decoder_precisions(model, field, rc.CPU_CHUNK)
        shape = f"{rc.CPU_CHUNK}×{hidden}×{hidden}, {threads} threads"
        bound = (f"; {rec.precision} decoder (auto: {cpu_precision()}; CPU flags: {flag_note()}), "
                 f"{flops / 1e12:.3f} TFLOP, network evaluations {evals[med]:.2f} s wall, {evals_cpu[med]:.2f} CPU-s = "
                 f"{flops / evals_cpu[med] / 1e9:.0f} GFLOP per CPU-s incl. local-feature sampling vs {rec.precision} "
                 f"matmul {peak:.0f} GFLOP/s ({shape}, per CPU-s of each thread) → the MLP alone needs ≥ "
                 f"{flops / peak / 1e9:.2f} s with {threads} cores to itself; matmul "
                 + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " GFLOP/s; whole decoder per point, one thread: "
                 + ", ".join(f"{k} {v[0]:.1f} µs CPU (max |Δlogit| vs fp32 {v[1]:.3f})" for k, v in decoder.items()))
        for prec in rates:
            if prec != "fp32":
                extra.append(_record.figure(
                    f"X2B decoder products in {prec} vs fp32 ({shape})", rates[prec], "GFLOP/s", device=device,
                    better="higher", peer="fp32 products, same run", peer_value=rates["fp32"],
                    notes=f"rates per CPU-s of each thread; whole folded decoder per point: {prec} "
                          f"{decoder[prec][0]:.1f} µs vs fp32 {decoder['fp32'][0]:.1f} µs CPU, max |Δlogit| "
                          f"{decoder[prec][1]:.3f}; CPU flags: {flag_note()}; "
                          f"{_record.load_note()}"))
    print(f"device {device}, model {cfg['model']['backbone']} hidden {cfg['model']['hidden']}, {a.resolution}³, "
          f"{_record.load_note()}")
    print(f"X-ray → mesh: best {min(times):.2f} s, median {times[med]:.2f} s wall ({cpus[med]:.1f} CPU-s) over "
          f"{a.repeats}; {rec.evaluations:,} evaluations vs dense {rec.dense_evaluations:,} "
          f"({rec.dense_evaluations / rec.evaluations:.1f}× fewer), {len(rec.mesh.faces):,} triangles{bound}")
    _record.write(a.json, [_record.figure(
        f"X-ray → mesh, {a.resolution}³ MISE, {cfg['model']['backbone']}, {rec.precision} decoder", times[med], "s",
        device=device, peak_gib=_record.peak_gib(device), target="≤ 0.3 s H100; ≤ 5 s on 2 CPU cores (issue 15)",
        notes=f"{cpus[med]:.1f} CPU-s, {_record.load_note()}; {rec.evaluations:,} network evaluations "
              f"(dense {rec.dense_evaluations:,}), {evals[med]:.2f} s in them{bound}")] + extra)


def flag_note() -> str:
    """The CPU's reduced-precision matrix instructions by name ("none: AVX2 only" when it has none)."""
    from x2recon.x2b.decoder import cpu_flags

    have = sorted(cpu_flags() & {"avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "avx512f"})
    return ", ".join(have) if have else "no AVX-512/VNNI/AMX (" + ("AVX2" if "avx2" in cpu_flags() else "?") + ")"


def decoder_precisions(model, field, chunk: int, seconds: float = 1.0) -> dict[str, tuple[float, float]]:
    """Per precision: (µs of CPU time per point of the whole folded decoder on one thread, max |Δlogit| vs fp32)
    on ``chunk`` points spread over the box, with this X-ray's latent and local features."""
    from x2recon.x2b.decoder import FoldedDecoder

    g = torch.Generator().manual_seed(0)
    p = torch.rand(1, chunk, 3, generator=g) - 0.5
    out = {}
    with torch.no_grad():
        local = model.sample_local(p, field.code)
        local = None if local is None else local[0]
        ref = field.folded(p[0], local)
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for prec in ("fp32", "bf16", "int8"):
                if prec == "int8" and not int8_available():
                    continue
                f = FoldedDecoder(model.decoder, field.code.latent, prec)
                d = float((f(p[0], local) - ref).abs().max())
                n, t = 0, time.thread_time()
                while time.thread_time() - t < seconds:
                    f(p[0], local)
                    n += 1
                out[prec] = ((time.thread_time() - t) / n / chunk * 1e6, d)
        finally:
            torch.set_num_threads(previous)
    return out


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
    t.add_argument("--hidden", type=int, default=256, help="decoder width (the CPU recipe: 128)")
    t.add_argument("--local-stages", default="1,2", help="encoder stages of the local features (the CPU recipe: 0,1)")
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
    lat.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"],
                     help="the decoder's products during MISE (reconstruct --precision)")
    _record.add_json_arg(lat)
    lat.set_defaults(func=bench_latency)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
