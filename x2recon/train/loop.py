"""The one training loop: every network plugs in a ``Task`` (its step, validation and checkpoint contents).

The loop owns what the networks share: resuming (weights, optimiser, scheduler and counters from the
run folder), DDP (sampler epochs, wrapped module, barrier), AMP, the step/epoch budget, validation
cadence, ``best.safetensors`` by the task's metric, ``last.*`` every ``save_every`` steps and at an
epoch end that validated, ended the run or came ``EPOCH_SAVE_SECONDS`` after the last save (a tiny
dataset's one-step epochs would otherwise write the whole state every step), logging (TensorBoard/``log.jsonl``, progress bar), stopping on Ctrl-C/SIGTERM, and the
run's ``summary.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..io.atomic import atomic_write_text
from ..nn.checkpoint import CheckpointError, config_differences, load_weights, read_config, save_checkpoint
from .common import (Dist, Logger, StopFlag, TrainSettings, autocast, finish_run, save_state, start_run,
                     train_loader, wrap_for_training)


class Task:
    """What one network brings to the loop; subclasses set the attributes and override the methods.

    ``model`` is built but not moved; ``make_optimizer`` gets the moved model's parameters."""

    model: torch.nn.Module
    name = "model"            # progress bar: "train <name>"
    metric = "val/score"      # validation value (higher is better) that picks best.safetensors
    metric_label = "score"    # how the resume message names it
    metric_format = ".4f"
    initial_best = float("-inf")
    throughput = "items"      # summary/log name of what a step consumes: <throughput>_per_s
    has_validation = False

    def make_optimizer(self, settings: TrainSettings) -> torch.optim.Optimizer:
        raise NotImplementedError

    def make_scheduler(self, optimizer):
        """An epoch-stepped LR scheduler (saved in the training state), or None."""
        return None

    def prepare(self, device: torch.device, settings: TrainSettings) -> None:
        """After the model moved to ``device`` (e.g. channels-last)."""

    def step(self, fwd, batch, amp_ctx) -> dict:
        """The loss of one batch: ``{"loss": tensor, "items": batch size, ...}`` (more tensors for logging)."""
        raise NotImplementedError

    def postfix(self, out: dict) -> dict:
        """Progress-bar values of a step's output."""
        return {"loss": f"{out['loss'].item():.4f}"}

    def scalars(self, out: dict, optimizer) -> dict:
        """Logged values of a step's output (the loop adds the throughput)."""
        return {"train/loss": out["loss"].item()}

    def validate(self, amp_ctx, batch_size: int) -> dict:
        """Validation values, ``self.metric`` among them; runs on the main process only."""
        raise NotImplementedError

    def describe(self, val: dict) -> str:
        return f"{self.metric} {val[self.metric]:{self.metric_format}}"

    def summary(self, best: float) -> dict:
        """The task's entries of ``summary.json`` (the best metric under its name)."""
        return {}


def check_resumable(weights: Path, network: str, model_cfg: dict) -> None:
    """A run folder resumes only the network and architecture it was started with."""
    old = read_config(weights)
    diff = config_differences(old["model"], model_cfg)
    if old.get("network") != network or diff:
        raise CheckpointError(weights, "cannot resume: the run folder holds another network or architecture ("
                              + "; ".join(diff or [f"network {old.get('network')}"])
                              + "); use another --out or --resume never")


#: An epoch end writes ``last.*`` only when the last write is at least this old (or it validated / ends the run).
EPOCH_SAVE_SECONDS = 60.0


class _Run:
    """The mutable state of one run: counters, optimiser, scheduler and the checkpoint writer."""

    def __init__(self, task: Task, settings: TrainSettings, dist: Dist, config: dict, log: Callable):
        self.task, self.settings, self.dist, self.config = task, settings, dist, config
        self.out = Path(settings.out)
        state = start_run(self.out, settings.resume, dist.main)  # None: a fresh run
        if state is not None:
            check_resumable(state["weights"], config["network"], config["model"])
            load_weights(state["weights"], task.model)
        elif settings.resume not in ("auto", "never"):
            load_weights(settings.resume, task.model)  # fine-tune from a checkpoint: weights only
        task.model.to(dist.device)
        task.prepare(dist.device, settings)
        self.opt = task.make_optimizer(settings)
        self.sched = task.make_scheduler(self.opt)
        self.step, self.epoch, self.best = 0, 0, task.initial_best
        self.last_saved = time.monotonic()
        if state is not None:
            self._resume(state, log)

    def _resume(self, state: dict, log: Callable) -> None:
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and "scheduler" in state:
            self.sched.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.best = int(state["step"]), int(state["epoch"]), float(state["best"])
        if self.dist.main:
            log(f"resuming {self.out} at step {self.step}, epoch {self.epoch} "
                f"(best val {self.task.metric_label} {self.best:{self.task.metric_format}})")

    def checkpoint(self, tag: str, val: dict | None = None) -> None:
        if not self.dist.main:
            return
        meta = {**self.config, "training": {**self.config["training"], "step": self.step, "epoch": self.epoch,
                                            **(val or {})}}
        save_checkpoint(self.out / f"{tag}.safetensors", self.task.model, meta)
        if tag == "last":
            extra = {"scheduler": self.sched.state_dict()} if self.sched is not None else None
            save_state(self.out, self.opt, self.step, self.epoch, self.best, extra)
            self.last_saved = time.monotonic()

    def budget_left(self) -> bool:
        s = self.settings
        return self.epoch < s.epochs and (not s.max_steps or self.step < s.max_steps)

    def steps_done(self) -> bool:
        return bool(self.settings.max_steps and self.step >= self.settings.max_steps)


class _Throughput:
    """Items per second of this call: overall, and steady (after the warm-up steps: compilation, caches, the
    data loader's start).  The warm-up is the first ``WARMUP_STEPS`` steps, at most half of those made; the
    steady rate needs at least 2 steps after it, else the summary says why it has none."""

    WARMUP_STEPS = 10

    def __init__(self, step: int, world: int):
        self.t0, self.world = time.time(), world
        self.times: list[float] = []  # end of each step of this call
        self.items: list[int] = []  # items of each step (all processes)

    @property
    def seen(self) -> int:
        return sum(self.items)

    def add(self, step: int, items: int) -> None:
        self.items.append(items * self.world)
        self.times.append(time.time())

    def rate(self) -> float:
        return self.seen / max(time.time() - self.t0, 1e-9)

    def summary(self, name: str) -> dict:
        seconds = time.time() - self.t0
        out = {"seconds": seconds, f"{name}_per_s": self.seen / max(seconds, 1e-9)}
        n = len(self.times)
        warm = min(self.WARMUP_STEPS, n // 2)
        if n - warm >= 2:
            out[f"{name}_per_s_steady"] = sum(self.items[warm:]) / max(self.times[-1] - self.times[warm - 1], 1e-9)
            out["steady_after_steps"] = warm
        else:
            out[f"{name}_per_s_steady_note"] = (f"not measured: {n} step{'s' if n != 1 else ''} in this run; the steady "
                                                f"rate needs 2 steps after the warm-up")
        return out


def train(task: Task, train_ds, settings: TrainSettings, dist: Dist, config: dict, *, log=print) -> dict:
    """Train (or resume) ``task`` on ``train_ds`` into ``settings.out``; returns the run's summary."""
    run = _Run(task, settings, dist, config, log)
    fwd = wrap_for_training(task.model, settings, dist)
    sampler, loader = train_loader(train_ds, settings, dist)
    amp_ctx = lambda: autocast(settings, dist.device)
    if dist.main and len(train_ds) < settings.batch_size:
        log(f"note: --batch-size {settings.batch_size} is more than the {len(train_ds)} training item"
            f"{'s' if len(train_ds) != 1 else ''}: each step trains on {min(len(train_ds), loader.batch_size)} "
            f"(one batch per epoch)")
    logger = Logger(run.out, dist.main)
    if dist.main:
        atomic_write_text(run.out / "config.json", json.dumps(config, indent=1))  # a full disk names the file
    total = settings.max_steps or settings.epochs * len(loader)
    bar = None
    if dist.main and settings.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=min(run.step, total), desc=f"train {task.name}", unit="step",
                   dynamic_ncols=True)
    speed = _Throughput(run.step, dist.world)
    validates = task.has_validation and dist.main
    stopped = False
    task.model.train()
    with StopFlag() as stop:
        while run.budget_left():
            sampler.set_epoch(run.epoch)
            stopped = _epoch(run, fwd, loader, amp_ctx, stop, bar, logger, speed)
            last_round = stopped or run.epoch >= settings.epochs or run.steps_done()
            val = None
            if validates and not stopped and (run.epoch % max(1, settings.val_every) == 0 or last_round):
                val = _validate(run, amp_ctx, loader.batch_size, bar, logger)
            if val is not None or last_round or time.monotonic() - run.last_saved >= EPOCH_SAVE_SECONDS:
                run.checkpoint("last", val)
            if dist.enabled:
                torch.distributed.barrier()
            if last_round:
                break
    if bar is not None:
        bar.close()
    logger.close()
    summary = {"out": str(run.out), "steps": run.step, "epochs": run.epoch, **task.summary(run.best),
               **speed.summary(task.throughput), "stopped": stopped, "device": str(dist.device), "world": dist.world}
    return finish_run(run.out, summary, dist, best_is_last=not validates)


def _epoch(run: _Run, fwd, loader, amp_ctx, stop, bar, logger, speed: _Throughput) -> bool:
    """One pass over ``loader`` (cut short by a stop or the step budget); True when stopped."""
    task, settings = run.task, run.settings
    for batch in loader:
        out = task.step(fwd, batch, amp_ctx)
        run.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        run.opt.step()
        run.step += 1
        speed.add(run.step, out["items"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(**task.postfix(out), epoch=run.epoch)
        if run.dist.main and run.step % 10 == 0:
            logger.scalars(run.step, {**task.scalars(out, run.opt), f"train/{task.throughput}_per_s": speed.rate()})
        if settings.save_every and run.step % settings.save_every == 0:
            run.checkpoint("last")
        if stop.stop or run.steps_done():
            break
    else:
        run.epoch += 1  # the whole epoch ran
        if run.sched is not None:
            run.sched.step()
    return stop.stop


def _validate(run: _Run, amp_ctx, batch_size: int, bar, logger) -> dict:
    """Validate, log, and keep ``best.safetensors`` when the metric improved."""
    val = run.task.validate(amp_ctx, batch_size)
    logger.scalars(run.step, val)
    if bar is not None:
        bar.write(f"epoch {run.epoch} step {run.step}: {run.task.describe(val)}")
    if val[run.task.metric] > run.best:
        run.best = val[run.task.metric]
        run.checkpoint("best", val)
    return val
