"""Training SPIDER (spider-paper §3.4, §4.2): L1 intensity loss + λ·Dice over points of the case's
target grid; the paper's optimiser (SGD, lr 1e-3 halved every 100 epochs, 500 epochs) or Adam;
validation PSNR / SSIM / Dice on whole grids; resumable; one GPU, many (torchrun), or CPU."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..dataset.model_fit import training_cases
from ..dataset.torch_data import dataset_build_config, has_split
from ..io.documents import recorded_path
from ..train.common import TrainSettings, session
from ..train.loop import Task, train
from .network import SpiderConfig, build_spider, spider_loss


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


class SpiderTask(Task):
    """SPIDER in the training loop: L1 + λ·Dice per step, an epoch-stepped LR schedule, validation PSNR
    picks the best checkpoint."""

    name, metric, metric_label, metric_format = "spider", "val/psnr", "PSNR", ".2f"

    def __init__(self, model_cfg: SpiderConfig, val_ds, dist, *, lam: float, optimizer: str,
                 lr_step_epochs: int, lr_gamma: float):
        self.val_ds, self.dist, self.has_validation = val_ds, dist, val_ds is not None
        self.lam, self.optimizer, self.lr_step_epochs, self.lr_gamma = lam, optimizer, lr_step_epochs, lr_gamma
        self.model = build_spider(model_cfg, device=dist.device)

    def make_optimizer(self, settings: TrainSettings):
        return make_optimizer(self.optimizer, self.model.parameters(), settings.lr, settings.weight_decay)

    def make_scheduler(self, optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, self.lr_step_epochs),
                                               gamma=self.lr_gamma if self.lr_step_epochs else 1.0)

    def step(self, fwd, batch, amp_ctx) -> dict:
        b = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
        with amp_ctx():
            pred = fwd(b["images"], b["grid"], b["points"])
        return {**spider_loss(pred, b["intensity"], b["labels"], self.lam), "items": b["images"].shape[0]}

    def postfix(self, out: dict) -> dict:
        return {"l1": f"{out['l1'].item():.4f}", "dice": f"{out['dice'].item():.3f}"}

    def scalars(self, out: dict, optimizer) -> dict:
        return {"train/loss": out["loss"].item(), "train/l1": out["l1"].item(),
                "train/dice_loss": out["dice"].item(), "train/lr": optimizer.param_groups[0]["lr"]}

    def validate(self, amp_ctx, batch_size: int) -> dict:
        return validate(self.model, self.val_ds)

    def describe(self, val: dict) -> str:
        return f"val PSNR {val['val/psnr']:.2f} dB, SSIM {val['val/ssim']:.4f}, Dice {val['val/dice']:.4f}"

    def summary(self, best: float) -> dict:
        return {"best_val_psnr": best if best > -math.inf else None,
                "hash_backend": getattr(self.model.encoding, "backend", "?")}


def train_spider(data: str | Path, settings: TrainSettings, model_cfg: SpiderConfig, *, n_points: int = 8192,
                 lam: float = 1.0, optimizer: str = "sgd", lr_step_epochs: int = 100, lr_gamma: float = 0.5,
                 foreground_fraction: float = 0.0, train_split: str = "train", val_split: str = "val",
                 augment: bool = True, preset: str = "ours", log=print) -> dict:
    """Train (or resume) into ``settings.out``; returns a summary (steps, best validation PSNR, seconds).
    ``lr_step_epochs``/``lr_gamma``: the step schedule (paper: ×0.5 every 100 epochs; 0 = constant).
    ``preset`` (``ours`` | ``paper``, the CLI's ``--preset``) is recorded in the checkpoint config."""
    from ..dataset.spider_data import SpiderDataset

    data = Path(data)
    with session(settings) as dist:
        ds_kw = dict(views=model_cfg.views, classes=model_cfg.classes, image_size=model_cfg.image_size,
                     hu_range=(model_cfg.hu_min, model_cfg.hu_max))
        train_ds = SpiderDataset(data, train_split, n_points=n_points, augment=augment,
                                 foreground_fraction=foreground_fraction, seed=settings.seed, **ds_kw)
        val_ds = SpiderDataset(data, val_split, augment=False, **ds_kw) if has_split(data, val_split) else None
        config = {
            "network": "spider",
            "model": model_cfg.to_dict(),
            "dataset": {"root": recorded_path(data), "train_cases": len(train_ds), "build": dataset_build_config(data),
                        "training_cases": training_cases(data, train_split)},
            "training": {**settings.recorded(), "n_points": n_points, "lambda": lam, "optimizer": optimizer,
                         "lr_step_epochs": lr_step_epochs, "lr_gamma": lr_gamma,
                         "foreground_fraction": foreground_fraction, "augment": augment, "preset": preset,
                         "world_size": dist.world},
        }
        task = SpiderTask(model_cfg, val_ds, dist, lam=lam, optimizer=optimizer, lr_step_epochs=lr_step_epochs,
                          lr_gamma=lr_gamma)
        return train(task, train_ds, settings, dist, config, log=log)
