"""Training SPIDER (spider-paper §3.4, §4.2): L1 intensity loss + λ·Dice over points of the case's
target grid; the paper's optimiser (SGD, lr 1e-3 halved every 100 epochs, 500 epochs) or Adam;
validation PSNR / SSIM / Dice on whole grids; resumable; one GPU, many (torchrun), or CPU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..nn.checkpoint import CheckpointError, config_differences, load_weights, read_config, save_checkpoint
from .network import SpiderConfig, build_spider, spider_loss
from ..train.common import (Logger, StopFlag, TrainSettings, autocast, save_state, setup, start_run,
                     finish_run, train_loader, wrap_for_training)
from ..x2b.train import dataset_build_config


def make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float = 0.9):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, eps=1e-15)  # Instant-NGP's ε
    raise ValueError(f"optimizer must be sgd or adam, got {name!r}")


@torch.no_grad()
def validate(model, ds) -> dict:
    """Mean PSNR, SSIM (HU window of the model) and foreground Dice over ``ds``'s cases, each predicted on
    its whole target grid."""
    from ..metrics.volume import volume_metrics
    from .inference import predict_grid

    model.eval()
    cfg = model.cfg
    rows = []
    for i in range(len(ds)):
        images, grid = ds.pair(i)
        ct, cls = ds.targets(i)
        n = ct.shape[0]
        inten, lab = predict_grid(model, images, grid, n, precision="fp32")
        hu = cfg.unit_to_hu(inten.cpu().numpy().astype(np.float64))
        h = float(ds.cases[i].box_size) / n
        m = volume_metrics(hu, ct, lab.cpu().numpy() if lab is not None else None, cls if lab is not None else None,
                           spacing=(h, h, h),
                           labels={c: k + 1 for k, c in enumerate(cfg.classes)} if lab is not None else None,
                           hu_window=(cfg.hu_min, cfg.hu_max))
        rows.append((m.psnr, m.ssim, m.mean_dice))
    model.train()
    a = np.array(rows, float)
    return {"val/psnr": float(np.nanmean(a[:, 0])), "val/ssim": float(np.nanmean(a[:, 1])),
            "val/dice": float(np.nanmean(a[:, 2])) if np.isfinite(a[:, 2]).any() else float("nan")}


def train_spider(data: str | Path, settings: TrainSettings, model_cfg: SpiderConfig, *, n_points: int = 8192,
                 lam: float = 1.0, optimizer: str = "sgd", lr_step_epochs: int = 100, lr_gamma: float = 0.5,
                 foreground_fraction: float = 0.0, train_split: str = "train", val_split: str = "val",
                 augment: bool = True, log=print) -> dict:
    """Train (or resume) into ``settings.out``; returns a summary (steps, best validation PSNR, seconds).
    ``lr_step_epochs``/``lr_gamma``: the step schedule (paper: ×0.5 every 100 epochs; 0 = constant)."""
    from ..dataset.spider_data import SpiderDataset

    data, out = Path(data), Path(settings.out)
    dist = setup(settings)
    device = dist.device
    build = dataset_build_config(data)
    hu = (model_cfg.hu_min, model_cfg.hu_max)
    ds_kw = dict(views=model_cfg.views, classes=model_cfg.classes, image_size=model_cfg.image_size, hu_range=hu)
    train_ds = SpiderDataset(data, train_split, n_points=n_points, augment=augment,
                             foreground_fraction=foreground_fraction, seed=settings.seed, **ds_kw)
    val_ds = None
    vf = data / "splits" / f"{val_split}.txt"
    if val_split and vf.is_file() and vf.read_text().strip():
        val_ds = SpiderDataset(data, val_split, augment=False, **ds_kw)
    config = {
        "network": "spider",
        "model": model_cfg.to_dict(),
        "dataset": {"root": str(data.resolve()), "train_cases": len(train_ds), "build": build},
        "training": {**settings.to_dict(), "n_points": n_points, "lambda": lam, "optimizer": optimizer,
                     "lr_step_epochs": lr_step_epochs, "lr_gamma": lr_gamma,
                     "foreground_fraction": foreground_fraction, "augment": augment, "world_size": dist.world},
    }
    model = build_spider(model_cfg, device=device)
    state = start_run(out, settings.resume, dist.main)  # None: a fresh run
    if state is not None:
        old = read_config(state["weights"])
        diff = config_differences(old["model"], model_cfg.to_dict())
        if old.get("network") != "spider" or diff:
            raise CheckpointError(state["weights"],
                                  "cannot resume: the run folder holds another network or architecture (" +
                                  "; ".join(diff or [f"network {old.get('network')}"]) + "); use another --out or --resume never")
        load_weights(state["weights"], model)
    elif settings.resume not in ("auto", "never"):
        load_weights(settings.resume, model)  # fine-tune from a checkpoint: weights only
    model.to(device)
    opt = make_optimizer(optimizer, model.parameters(), settings.lr, settings.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, lr_step_epochs), gamma=lr_gamma if lr_step_epochs else 1.0)
    step, start_epoch, best = 0, 0, -math.inf
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            sched.load_state_dict(state["scheduler"])
        step, start_epoch, best = int(state["step"]), int(state["epoch"]), float(state["best"])
        if dist.main:
            log(f"resuming {out} at step {step}, epoch {start_epoch} (best val PSNR {best:.2f})")
    fwd = wrap_for_training(model, settings, dist)
    sampler, loader = train_loader(train_ds, settings, dist)
    amp_ctx = lambda: autocast(settings, device)
    logger = Logger(out, dist.main)
    if dist.main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    total = settings.max_steps or settings.epochs * len(loader)
    bar = None
    if dist.main and settings.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=min(step, total), desc="train spider", unit="step", dynamic_ncols=True)

    def checkpoint(tag: str, val: dict | None = None) -> None:
        if not dist.main:
            return
        meta = {**config, "training": {**config["training"], "step": step, "epoch": epoch, **(val or {})}}
        save_checkpoint(out / f"{tag}.safetensors", model, meta)
        if tag == "last":
            save_state(out, opt, step, epoch, best, {"scheduler": sched.state_dict()})

    t0, seen, stopped = time.time(), 0, False
    warm = {"step": step + 10, "t": None, "seen": 0}
    epoch = start_epoch
    model.train()
    with StopFlag() as stop:
        while epoch < settings.epochs and (not settings.max_steps or step < settings.max_steps):
            sampler.set_epoch(epoch)
            for batch in loader:
                b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with amp_ctx():
                    pred = fwd(b["images"], b["grid"], b["points"])
                losses = spider_loss(pred, b["intensity"], b["labels"], lam)
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                opt.step()
                step += 1
                seen += b["images"].shape[0] * dist.world
                if step == warm["step"]:
                    warm["t"], warm["seen"] = time.time(), seen
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(l1=f"{losses['l1'].item():.4f}", dice=f"{losses['dice'].item():.3f}", epoch=epoch)
                if dist.main and step % 10 == 0:
                    logger.scalars(step, {"train/loss": losses["loss"].item(), "train/l1": losses["l1"].item(),
                                          "train/dice_loss": losses["dice"].item(), "train/lr": opt.param_groups[0]["lr"],
                                          "train/items_per_s": seen / (time.time() - t0)})
                if settings.save_every and step % settings.save_every == 0:
                    checkpoint("last")
                if stop.stop or (settings.max_steps and step >= settings.max_steps):
                    break
            else:
                epoch += 1
                sched.step()
            stopped = stop.stop
            val = None
            last_round = stopped or epoch >= settings.epochs or (settings.max_steps and step >= settings.max_steps)
            if val_ds is not None and dist.main and not stopped and (epoch % max(1, settings.val_every) == 0 or last_round):
                val = validate(model, val_ds)
                logger.scalars(step, val)
                if bar is not None:
                    bar.write(f"epoch {epoch} step {step}: val PSNR {val['val/psnr']:.2f} dB, SSIM {val['val/ssim']:.4f}, "
                              f"Dice {val['val/dice']:.4f}")
                if val["val/psnr"] > best:
                    best = val["val/psnr"]
                    checkpoint("best", val)
            checkpoint("last", val)
            if dist.enabled:
                torch.distributed.barrier()
            if stopped or last_round:
                break
    if bar is not None:
        bar.close()
    logger.close()
    seconds = time.time() - t0
    summary = {"out": str(out), "steps": step, "epochs": epoch, "best_val_psnr": best if best > -math.inf else None,
               "seconds": seconds, "items_per_s": seen / max(seconds, 1e-9),
               "items_per_s_steady": ((seen - warm["seen"]) / max(time.time() - warm["t"], 1e-9)) if warm["t"] else None,
               "stopped": stopped, "device": str(device), "world": dist.world,
               "hash_backend": getattr(model.encoding, "backend", "?")}
    return finish_run(out, summary, dist, best_is_last=val_ds is None)
