"""Training X2B / X2B2 (X2BR paper §3.4): BCE on occupancy samples, Adam (lr 1e-4), a random DRR
view per sample; validation IoU on uniform box points; resumable; one GPU, many (torchrun), or CPU."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..dataset.model_fit import training_cases
from ..dataset.torch_data import dataset_build_config, has_split
from ..io.documents import recorded_path
from ..train.common import TrainSettings, session
from ..train.loop import Task, train
from .network import X2BConfig, build_model


def occupancy_loss(logits: torch.Tensor, occ: torch.Tensor) -> torch.Tensor:
    """Paper eq. (1): BCE summed over a sample's points, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits.float(), occ, reduction="none").sum(-1).mean()


#: Thresholds τ the calibration tries (occupancy probability of the surface).
CALIBRATION_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))


@torch.no_grad()
def validate(model, loader, device, threshold: float, amp_ctx, calibrate: bool = False) -> dict:
    """Mean IoU (and BCE per point) over the validation items, occupancy = p ≥ threshold.

    ``calibrate``: also the τ of :data:`CALIBRATION_THRESHOLDS` with the best mean IoU (``val/threshold``), that
    IoU (``val/iou_calibrated``) and the occupied volume over the true one at it (``val/volume_ratio``) — the
    surface threshold ``reconstruct`` then uses (``nn.checkpoint.load_model``)."""
    model.eval()
    probs, gts, losses = [], [], []
    for b in loader:
        with amp_ctx():
            logits = model(b["images"].to(device), b["grid"].to(device), b["points"].to(device)).float()
        occ = b["occupancies"].to(device)
        losses.append(F.binary_cross_entropy_with_logits(logits, occ, reduction="none").mean(-1).cpu())
        probs.append(torch.sigmoid(logits).cpu())
        gts.append((occ > 0.5).cpu())
    model.train()
    p, gt = torch.cat(probs), torch.cat(gts)
    out = {"val/iou": _mean_iou(p >= threshold, gt), "val/bce": float(torch.cat(losses).mean())}
    if calibrate:
        ious = [_mean_iou(p >= t, gt) for t in CALIBRATION_THRESHOLDS]
        k = max(range(len(ious)), key=lambda i: (ious[i], -abs(CALIBRATION_THRESHOLDS[i] - threshold)))
        tau = CALIBRATION_THRESHOLDS[k]
        out.update({"val/threshold": tau, "val/iou_calibrated": ious[k],
                    "val/volume_ratio": float((p >= tau).sum()) / max(1.0, float(gt.sum()))})
    return out


def _mean_iou(pred: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean over items (rows) of |pred ∧ gt| / |pred ∨ gt| (1 where both are empty)."""
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return float(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)).mean())


def shared_patients(data: Path, train_split: str, val_split: str) -> int:
    """How many ``val_split`` cases come from a CT (patient) that ``train_split`` also holds (by CT checksum;
    a case without one counts as shared: it cannot be told apart)."""
    from ..dataset.model_fit import training_cases

    ct = lambda ident: None if ident is None else ident.split("/")[0]  # noqa: E731
    train = {ct(i) for i in training_cases(data, train_split)["cases"].values()}
    val = [ct(i) for i in training_cases(data, val_split)["cases"].values()]
    return sum(1 for c in val if c is None or c in train)


def _fused_adam_on_cpu() -> bool:
    """Whether this torch's fused Adam takes CPU tensors (torch ≥ 2.4)."""
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


class X2BTask(Task):
    """X2B / X2B2 in the training loop: occupancy BCE per step, validation IoU picks the best checkpoint
    (with ``calibrate``: the IoU at the validation-calibrated threshold, the one reconstruction will use)."""

    metric, metric_label, initial_best, throughput = "val/iou", "IoU", -1.0, "samples"

    def __init__(self, model_cfg: X2BConfig, pretrained: str | None, val_ds, dist, calibrate: bool = False):
        self.cfg, self.val_ds, self.dist, self.calibrate = model_cfg, val_ds, dist, calibrate
        if calibrate:
            self.metric = "val/iou_calibrated"
        self.name, self.has_validation = model_cfg.kind, val_ds is not None
        self.model = build_model(model_cfg, pretrained_path=pretrained)

    def prepare(self, device, settings: TrainSettings) -> None:
        if settings.channels_last and device.type == "cuda":
            self.model.use_channels_last()

    def make_optimizer(self, settings: TrainSettings):
        """Adam; on CPU its fused kernel (one pass over each parameter instead of a dozen element-wise ops:
        0.06 instead of 0.35 CPU-s per step for the CPU recipe's 4.5 M parameters), where this torch has it."""
        params = list(self.model.parameters())
        fused = all(p.device.type == "cpu" for p in params) and _fused_adam_on_cpu()
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True if fused else None)

    def step(self, fwd, batch, amp_ctx) -> dict:
        device = self.dist.device
        images = batch["images"].to(device, non_blocking=True)
        grid = batch["grid"].to(device, non_blocking=True)
        pts = batch["points"].to(device, non_blocking=True)
        occ = batch["occupancies"].to(device, non_blocking=True)
        with amp_ctx():
            logits = fwd(images, grid, pts)
        return {"loss": occupancy_loss(logits, occ), "items": images.shape[0]}

    def postfix(self, out: dict) -> dict:
        return {"loss": f"{out['loss'].item():.1f}"}

    def validate(self, amp_ctx, batch_size: int) -> dict:
        loader = torch.utils.data.DataLoader(self.val_ds, batch_size=max(1, min(8, batch_size)), num_workers=0)
        return validate(self.model, loader, self.dist.device, self.cfg.threshold, amp_ctx, self.calibrate)

    def describe(self, val: dict) -> str:
        text = f"val IoU {val['val/iou']:.4f} (τ {self.cfg.threshold:g}), BCE {val['val/bce']:.4f}"
        if "val/threshold" in val:
            text += (f"; calibrated τ {val['val/threshold']:g}: IoU {val['val/iou_calibrated']:.4f}, "
                     f"volume {val['val/volume_ratio']:.2f}× the true one")
        return text

    def summary(self, best: float) -> dict:
        return {"best_val_iou": best}


def train_x2b(data: str | Path, settings: TrainSettings, model_cfg: X2BConfig, *, n_points: int = 2048,
              pretrained: str | None = None, train_split: str = "train", val_split: str = "val",
              augment: bool = True, preset: str = "ours", calibrate_threshold: bool = False, log=print) -> dict:
    """Train (or resume) into ``settings.out``; returns a summary (steps, best IoU, seconds).  ``preset``
    (``ours`` | ``paper``, the CLI's ``--preset``) is recorded in the checkpoint config.  ``calibrate_threshold``:
    each validation also finds the surface threshold with the best IoU; the checkpoint records it and
    reconstruction uses it (the paper's fixed τ otherwise) — only where the validation cases are other patients
    than the training ones: calibrated on variants of training patients, τ came out 0.30–0.40 and held-out
    patients got 24 ± 13 mm Chamfer-L1 at 1.45× the volume (0.36× on one), against 16 ± 4 mm at τ 0.25
    (training/lopo_curves.py, four folds)."""
    from ..dataset.torch_data import OccupancyDataset, ValidationDataset

    data = Path(data)
    with session(settings) as dist:
        views = model_cfg.views
        train_ds = OccupancyDataset(data, train_split, kind=model_cfg.kind, views=views, image_size=model_cfg.image_size,
                                    n_points=n_points, augment=augment, seed=settings.seed)
        val_ds = None
        if has_split(data, val_split):
            val_ds = ValidationDataset(data, val_split, kind=model_cfg.kind, views=views, image_size=model_cfg.image_size,
                                       seed=settings.seed)
        config = {
            "network": model_cfg.kind,
            "model": model_cfg.to_dict(),
            "dataset": {"root": recorded_path(data), "train_cases": len(train_ds), "build": dataset_build_config(data),
                        "training_cases": training_cases(data, train_split)},
            "training": {**settings.recorded(), "n_points": n_points, "pretrained": recorded_path(pretrained),
                         "augment": augment, "preset": preset, "world_size": dist.world},
        }
        if calibrate_threshold and val_ds is None:
            log(f"note: {data} has no '{val_split}' split: the surface threshold stays τ = {model_cfg.threshold:g} "
                "(not calibrated)")
        shared = shared_patients(data, train_split, val_split) if calibrate_threshold and val_ds is not None else 0
        if shared:
            log(f"note: {shared} of the '{val_split}' cases are scans or variants of training patients: a threshold "
                f"calibrated on them is too high for new patients, so the surface threshold stays τ = "
                f"{model_cfg.threshold:g} (validate on other patients — build-dataset --split-by patient — to calibrate)")
            calibrate_threshold = False
        config["training"]["calibrate_threshold"] = bool(calibrate_threshold and val_ds is not None)
        task = X2BTask(model_cfg, pretrained, val_ds if dist.main else None, dist, calibrate=calibrate_threshold)
        return train(task, train_ds, settings, dist, config, log=log)
