"""Training X2B / X2B2 (X2BR paper §3.4): BCE on occupancy samples, Adam (lr 1e-4), a random DRR
view per sample; validation IoU on uniform box points; resumable; one GPU, many (torchrun), or CPU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..nn.checkpoint import CheckpointError, config_differences, load_weights, read_config, save_checkpoint
from .network import X2BConfig, build_model
from ..train.common import (Logger, StopFlag, TrainSettings, autocast, save_state, setup, start_run,
                     finish_run, train_loader, wrap_for_training)


def dataset_build_config(root: Path) -> dict:
    """The dataset's build settings (geometry, views, sizes) from its first case's meta.json."""
    from ..dataset.torch_data import read_split

    first = read_split(root, "all")[0]
    meta = json.loads((root / "cases" / first / "meta.json").read_text())
    return meta["config"]


def occupancy_loss(logits: torch.Tensor, occ: torch.Tensor) -> torch.Tensor:
    """Paper eq. (1): BCE summed over a sample's points, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits.float(), occ, reduction="none").sum(-1).mean()


@torch.no_grad()
def validate(model, loader, device, threshold: float, amp_ctx) -> dict:
    """Mean IoU (and BCE per point) over the validation items, occupancy = p ≥ threshold."""
    model.eval()
    ious, losses = [], []
    logit_t = math.log(threshold / (1 - threshold))
    for b in loader:
        with amp_ctx():
            logits = model(b["images"].to(device), b["grid"].to(device), b["points"].to(device)).float()
        occ = b["occupancies"].to(device)
        losses.append(F.binary_cross_entropy_with_logits(logits, occ, reduction="none").mean(-1).cpu())
        pred = logits >= logit_t
        gt = occ > 0.5
        inter = (pred & gt).sum(-1).float()
        union = (pred | gt).sum(-1).float()
        ious.append(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).cpu())
    model.train()
    return {"val/iou": float(torch.cat(ious).mean()), "val/bce": float(torch.cat(losses).mean())}


def train_x2b(data: str | Path, settings: TrainSettings, model_cfg: X2BConfig, *, n_points: int = 2048,
              pretrained: str | None = None, train_split: str = "train", val_split: str = "val",
              augment: bool = True, log=print) -> dict:
    """Train (or resume) into ``settings.out``; returns a summary (steps, best IoU, seconds)."""
    from ..dataset.torch_data import OccupancyDataset, ValidationDataset

    data, out = Path(data), Path(settings.out)
    dist = setup(settings)
    device = dist.device
    build = dataset_build_config(data)
    views = model_cfg.views
    train_ds = OccupancyDataset(data, train_split, kind=model_cfg.kind, views=views, image_size=model_cfg.image_size,
                                n_points=n_points, augment=augment, seed=settings.seed)
    val_ds = None
    if val_split and (data / "splits" / f"{val_split}.txt").is_file() and (data / "splits" / f"{val_split}.txt").read_text().strip():
        val_ds = ValidationDataset(data, val_split, kind=model_cfg.kind, views=views, image_size=model_cfg.image_size,
                                   seed=settings.seed)
    config = {
        "network": model_cfg.kind,
        "model": model_cfg.to_dict(),
        "dataset": {"root": str(data.resolve()), "train_cases": len(train_ds), "build": build},
        "training": {**settings.to_dict(), "n_points": n_points, "pretrained": pretrained, "augment": augment,
                     "world_size": dist.world},
    }

    model = build_model(model_cfg, pretrained_path=pretrained)
    state = start_run(out, settings.resume, dist.main)  # None: a fresh run
    if state is not None:
        old = read_config(state["weights"])
        diff = config_differences(old["model"], model_cfg.to_dict())
        if diff:
            raise CheckpointError(state["weights"],
                                  "cannot resume: the run folder holds another architecture (" + "; ".join(diff) +
                                  "); use another --out or --resume never")
        load_weights(state["weights"], model)
    elif settings.resume not in ("auto", "never"):
        load_weights(settings.resume, model)  # fine-tune from a checkpoint: weights only
    model.to(device)
    if settings.channels_last and device.type == "cuda":
        model.use_channels_last()
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    step, start_epoch, best = 0, 0, -1.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, start_epoch, best = int(state["step"]), int(state["epoch"]), float(state["best"])
        if dist.main:
            log(f"resuming {out} at step {step}, epoch {start_epoch} (best val IoU {best:.4f})")
    fwd = wrap_for_training(model, settings, dist)
    sampler, loader = train_loader(train_ds, settings, dist)
    val_loader = None
    if val_ds is not None and dist.main:
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=max(1, min(8, loader.batch_size)), num_workers=0)
    amp_ctx = lambda: autocast(settings, device)
    logger = Logger(out, dist.main)
    if dist.main:
        (out / "config.json").write_text(json.dumps(config, indent=1))
    steps_per_epoch = len(loader)
    total = settings.max_steps or settings.epochs * steps_per_epoch
    bar = None
    if dist.main and settings.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=min(step, total), desc=f"train {model_cfg.kind}", unit="step", dynamic_ncols=True)

    def checkpoint(tag: str, val: dict | None = None) -> None:
        if not dist.main:
            return
        meta = {**config, "training": {**config["training"], "step": step, "epoch": epoch, **(val or {})}}
        save_checkpoint(out / f"{tag}.safetensors", model, meta)
        if tag == "last":
            save_state(out, opt, step, epoch, best)

    t0, seen, stopped = time.time(), 0, False
    warm = {"step": step + 10, "t": None, "seen": 0}  # steady-state throughput excludes warm-up/compilation
    epoch = start_epoch
    model.train()
    with StopFlag() as stop:
        while epoch < settings.epochs and (not settings.max_steps or step < settings.max_steps):
            sampler.set_epoch(epoch)
            for batch in loader:
                images = batch["images"].to(device, non_blocking=True)
                grid = batch["grid"].to(device, non_blocking=True)
                pts = batch["points"].to(device, non_blocking=True)
                occ = batch["occupancies"].to(device, non_blocking=True)
                with amp_ctx():
                    logits = fwd(images, grid, pts)
                loss = occupancy_loss(logits, occ)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                seen += images.shape[0] * dist.world
                if step == warm["step"]:
                    warm["t"], warm["seen"] = time.time(), seen
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.1f}", epoch=epoch)
                if dist.main and step % 10 == 0:
                    logger.scalars(step, {"train/loss": loss.item(), "train/samples_per_s": seen / (time.time() - t0)})
                if settings.save_every and step % settings.save_every == 0:
                    checkpoint("last")
                if stop.stop or (settings.max_steps and step >= settings.max_steps):
                    break
            else:
                epoch += 1  # the whole epoch ran
            stopped = stop.stop
            val = None
            last_round = stopped or epoch >= settings.epochs or (settings.max_steps and step >= settings.max_steps)
            if val_loader is not None and not stopped and (epoch % max(1, settings.val_every) == 0 or last_round):
                val = validate(model, val_loader, device, model_cfg.threshold, amp_ctx)
                logger.scalars(step, val)
                if bar is not None:
                    bar.write(f"epoch {epoch} step {step}: val IoU {val['val/iou']:.4f}, BCE {val['val/bce']:.4f}")
                if val["val/iou"] > best:
                    best = val["val/iou"]
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
    summary = {"out": str(out), "steps": step, "epochs": epoch, "best_val_iou": best, "seconds": seconds,
               "samples_per_s": seen / max(seconds, 1e-9),
               "samples_per_s_steady": ((seen - warm["seen"]) / max(time.time() - warm["t"], 1e-9)) if warm["t"] else None,
               "stopped": stopped, "device": str(device), "world": dist.world}
    return finish_run(out, summary, dist, best_is_last=val_loader is None)
