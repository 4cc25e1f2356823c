"""Train one method on one fold, end to end: the training function every study calls.

``train(config)`` loads (or receives) the data, splits the fold, trains with the configured loss,
refreshes the per-image ε of the adaptive method on the schedule of Algorithm 1, validates each
epoch, keeps the weights of the best validation epoch as ``model.pt`` and tests them at the end.
``report(metrics, checkpoint)`` is called after every epoch so that Ray Tune (``polydice.tune``)
can plug in without this module importing Ray. Everything a run carries across a checkpoint lives
in one :class:`RunState`.

Command line (one flag per :class:`~polydice.config.TrainConfig` field, see ``--help``)::

    python -m polydice.train --dataset synthetic --method adaptive --epochs 4 --e0 2 --tau 1 \\
        --image-size 64 --base-channels 8 --out runs/demo
    python -m polydice.train --resume runs/demo --epochs 8   # continue from runs/demo/checkpoint.pt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .config import TrainConfig
from .data import DataError, SegmentationData, build_augmentation, load_dataset, make_loader
from .losses import build_loss, foreground_probs
from .metrics import all_metrics, hardest_quartile_mean, segmentation_metrics
from .model import UNet, save_model_file, to_input
from .schedule import EpsilonController, refresh_epochs
from .uncertainty import estimate_uncertainty

ReportFn = Callable[[dict, "dict | None"], None]
CHECKPOINT_VERSION = 2
CHECKPOINT_FILE = "checkpoint.pt"
# The command line keeps the checkpoint that the last one replaced, for when the last one is unreadable.
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
# What a version-2 checkpoint holds: {"version", "config", "run"}, "run" being RunState.state_dict().
RUN_STATE_KEYS = ("epoch", "model", "optimizer", "scaler", "controller", "history", "eps_records", "best")
MODEL_FILE = "model.pt"
EPSILON_COLUMNS = ["epoch", "index", "difficulty", "epsilon"]
# Foreground probability thresholds searched on the validation split for model.pt: 0.05 ... 0.95.
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
# Fields a resumed run may change: more epochs, or other hardware; none changes what is computed
# per epoch except through the device's arithmetic.
RESUMABLE_CHANGES = {"epochs", "device", "amp", "channels_last", "compile", "num_workers", "mc_memory_gb",
                     "log_maps", "log_every", "tensorboard", "data_dir"}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says at which epoch and batch, and
    which images of that batch had a non-finite loss."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, of another format version, or not a
    polydice checkpoint at all. The message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, read-only storage); the message names the
    file. Nothing half-written is left under the checkpoint's name."""


@dataclass
class RunResult:
    """Everything a run produces; :func:`write_outputs` turns it into files."""

    summary: dict
    history: pd.DataFrame
    epsilon: pd.DataFrame
    per_image: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass
class BestEpoch:
    """The epoch with the highest validation Dice so far and, when kept, its weights."""

    val_dice: float = -math.inf
    epoch: int = 0
    state: dict[str, Tensor] | None = None


@dataclass
class RunState:
    """Everything a run carries from one epoch to the next and across a checkpoint.

    The training loop takes this one object. :meth:`state_dict` holds tensors and plain Python
    values only, so that a checkpoint loads with ``torch.load(..., weights_only=True)``. Random
    state needs no saving: each epoch reseeds from ``(seed, epoch)``.

    Attributes:
        model, optimizer, scaler: the U-Net, its Adam optimizer and the AMP loss scaler.
        controller: the per-image ε table of the adaptive method; ``None`` for the others.
        epoch: the last finished epoch (0 before the first).
        history: one metrics dict per finished epoch.
        eps_records: one ``epoch,index,difficulty,epsilon`` frame per ε refresh.
        best: the best validation epoch so far, with its weights when the run selects them.
    """

    model: UNet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    controller: EpsilonController | None = None
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    eps_records: list[pd.DataFrame] = field(default_factory=list)
    best: BestEpoch = field(default_factory=BestEpoch)

    def record_validation(self, epoch: int, val_dice: float, keep_weights: bool) -> None:
        """Make ``epoch`` the best one if its validation Dice beats every earlier epoch's."""
        if val_dice > self.best.val_dice:
            weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if keep_weights else None
            self.best = BestEpoch(float(val_dice), int(epoch), weights)

    def load_selected_weights(self, select_best: bool) -> tuple[int, float]:
        """Put the weights the run keeps into the model: the best validation epoch's when
        ``select_best`` (else, or when no epoch was validated, the last epoch's).

        Returns:
            ``(epoch, val_dice)`` of those weights.
        """
        if select_best and self.best.state is not None:
            self.model.load_state_dict(self.best.state)
            return self.best.epoch, self.best.val_dice
        return self.epoch, self.history[-1]["val_dice"] if self.history else float("nan")

    def epsilon_table(self) -> pd.DataFrame:
        """Every refresh's ε, ``epoch,index,difficulty,epsilon``, in refresh order."""
        if not self.eps_records:
            return pd.DataFrame(columns=EPSILON_COLUMNS)
        return pd.concat(self.eps_records, ignore_index=True)

    def state_dict(self) -> dict:
        eps = pd.concat(self.eps_records, ignore_index=True) if self.eps_records else None
        eps_columns = None if eps is None else {col: torch.tensor(eps[col].to_numpy()) for col in EPSILON_COLUMNS}
        return {
            "epoch": int(self.epoch),
            "model": _cpu_copy(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "history": [dict(h) for h in self.history],
            "eps_records": eps_columns,
            "best": {
                "val_dice": float(self.best.val_dice),
                "epoch": int(self.best.epoch),
                "state": None if self.best.state is None else _cpu_copy(self.best.state),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; tensors move to the model's device.

        Raises:
            ValueError: when the state has an ε table and this run has no controller, or the
                reverse (another method), or its ε table belongs to other training images.
        """
        if (state["controller"] is None) != (self.controller is None):
            raise ValueError("the saved run and this one differ in whether they have an ε controller")
        device = next(self.model.parameters()).device
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves its state to the parameters' device
        self.scaler.load_state_dict(state["scaler"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self.epoch = int(state["epoch"])
        self.history = [dict(h) for h in state["history"]]
        records = state["eps_records"]
        self.eps_records = [] if records is None else [pd.DataFrame({k: v.numpy() for k, v in records.items()})]
        best = state["best"]
        weights = None if best["state"] is None else {k: v.to(device) for k, v in best["state"].items()}
        self.best = BestEpoch(float(best["val_dice"]), int(best["epoch"]), weights)


def _cpu_copy(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the visible CUDA device if any (Ray sets CUDA_VISIBLE_DEVICES per trial), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch reseeds from (seed, epoch), so a resumed run replays the same random stream."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919) % 2**31


def load_data(cfg: TrainConfig) -> SegmentationData:
    """The dataset named by the config, decoded and resized once."""
    return load_dataset(
        cfg.dataset,
        cfg.data_dir,
        cfg.image_size,
        n_synthetic=cfg.n_synthetic,
        seed=cfg.split_seed,
        sequence_csv=cfg.sequence_csv,
        num_workers=max(1, min(8, os.cpu_count() or 1)),
    )


def build_model(cfg: TrainConfig) -> UNet:
    return UNet(3, 2, cfg.base_channels, cfg.dropout)


def build_method_loss(cfg: TrainConfig) -> nn.Module:
    if cfg.method in ("adaptive", "polydice"):
        return build_loss("polydice", eps=cfg.eps if cfg.method == "polydice" else 0.0, order=cfg.order,
                          scale=cfg.polydice_scale)
    kwargs = {"focal": {"gamma": cfg.focal_gamma}, "dsc_pp": {"gamma": cfg.dscpp_gamma},
              "pm_dice": {"gamma": cfg.pm_gamma, "include_background": cfg.pm_include_background}}
    return build_loss(cfg.method, **kwargs.get(cfg.method, {}))


class _Hardware:
    """Device-dependent choices, all decided once from the device: AMP, channels-last, pinning."""

    def __init__(self, cfg: TrainConfig):
        self.device = resolve_device(cfg.device)
        cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if cfg.amp and cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.memory_format = torch.channels_last if cfg.channels_last and cuda else torch.contiguous_format
        self.pin_memory = cuda
        # fp16 needs loss scaling; bf16 has float32's range and does not.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if cuda:
            torch.backends.cudnn.benchmark = True

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def images(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) on the host → float input on the device."""
        return to_input(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)


def _per_image_metrics(model: nn.Module, data: SegmentationData, indices: np.ndarray, hw: _Hardware,
                       batch_size: int, metrics: Callable[[Tensor, Tensor], dict[str, Tensor]]) -> dict[str, Tensor]:
    """``metrics(probs (B, H, W), masks (B, H, W))`` batch by batch in full eval mode, each key's
    ``(B,)`` values concatenated in ``indices`` order.

    Streaming keeps the memory of one batch: all probabilities of a large validation set at
    full resolution would not fit beside concurrent trials.
    """
    model.eval()
    if len(indices) == 0:
        empty = torch.empty(0, *data.masks.shape[1:])
        return metrics(empty, empty.to(torch.uint8))
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(indices), batch_size):
        sel = indices[start : start + batch_size]
        with torch.inference_mode(), hw.autocast():
            x = hw.images(torch.from_numpy(data.images[sel]).permute(0, 3, 1, 2))
            probs = foreground_probs(model(x)).float().cpu()
        for key, value in metrics(probs, torch.from_numpy(data.masks[sel])).items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def _validation_dice(model, data, indices, hw, batch_size) -> float:
    return float(_per_image_metrics(model, data, indices, hw, batch_size, segmentation_metrics)["dice"].mean())


def _map_panel(maps: dict[str, Tensor]) -> np.ndarray:
    """One HWC float image: a row per image of [RGB, mask, mean prob, MI, entropy] for TensorBoard."""
    rows = []
    for i in range(len(maps["image"])):
        image = maps["image"][i].permute(1, 2, 0).float().numpy() / 255.0
        cells = [image]
        for key in ("mask", "mean_prob", "mutual_information", "predictive_entropy"):
            m = maps[key][i].float().numpy()
            m = m / m.max() if key in ("mutual_information", "predictive_entropy") and m.max() > 0 else m
            cells.append(np.repeat(m[..., None], 3, axis=2))
        rows.append(np.concatenate(cells, axis=1))
    return np.concatenate(rows, axis=0).clip(0, 1)


class _Writer:
    """TensorBoard writer that is a no-op when disabled or without an output folder."""

    def __init__(self, out_dir: Path | None, enabled: bool):
        self.tb = None
        if out_dir is not None and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir))

    def __getattr__(self, name):
        if self.tb is None:
            return lambda *a, **k: None
        return getattr(self.tb, name)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def train(
    config: TrainConfig,
    report: ReportFn | None = None,
    *,
    data: SegmentationData | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: dict | None = None,
    evaluate_test: bool = True,
    checkpoint_every: int = 0,
    progress: bool = False,
) -> RunResult:
    """Run one method on one fold: train, refresh ε on schedule, validate each epoch, test.

    Args:
        config: every hyperparameter of the run.
        report: called after each epoch as ``report(metrics, checkpoint)``; ``checkpoint`` is the
            state to save (see :func:`checkpoint_state`) at each ε refresh, every
            ``checkpoint_every`` epochs and at the last epoch, else ``None``.
        data: the dataset, if already loaded (a study loads it once and shares it); else it is
            loaded from ``config``.
        out_dir: where TensorBoard events, ``model.pt``, ``summary.json``, ``epsilon.csv``,
            ``history.csv`` and ``per_image.csv`` go; nothing is written when ``None``.
        resume: a checkpoint to continue from (the epochs after its ``epoch``).
        evaluate_test: test at the end. A hyperparameter search passes ``False``: it must select
            on validation Dice, and then never touches the test part at all.
        checkpoint_every: also hand a checkpoint to ``report`` every this many epochs (0: never).
        progress: show a progress bar.

    Returns:
        :class:`RunResult`.

    Raises:
        NonFiniteLossError: when the loss turns NaN or infinite (the message names the epoch, the
            batch and its images with a non-finite loss) or an image's difficulty does at a refresh.
        polydice.data.DataError: for unreadable or inconsistent data.
        ValueError: for a checkpoint of another config or version, or a negative ``checkpoint_every``.
    """
    cfg = config
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0: only at refreshes and the end), got {checkpoint_every}")
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    hw = _Hardware(cfg)

    if data is None:
        data = load_data(cfg)
    elif data.images.shape[1] != cfg.image_size:
        raise ValueError(f"data holds {data.images.shape[1]}px images but the config asks for {cfg.image_size}px")
    train_idx, val_idx, test_idx = data.folds(cfg.folds, cfg.split_seed, cfg.val_fraction)[cfg.fold]
    val_eval_idx = val_idx[: cfg.max_batches * cfg.batch_size] if cfg.max_batches else val_idx

    model = build_model(cfg).to(hw.device, memory_format=hw.memory_format)
    step_model = torch.compile(model) if cfg.compile else model
    loss_fn = build_method_loss(cfg)
    controller = (
        EpsilonController(train_idx, cfg.e0, cfg.tau, cfg.q, cfg.k, cfg.eps_min, cfg.eps_max, cfg.delta)
        if cfg.uses_controller
        else None
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = RunState(model, optimizer, hw.scaler, controller)
    if resume is not None:
        restore_checkpoint(resume, cfg, run)
    refreshes = set(refresh_epochs(cfg.epochs, cfg.e0, cfg.tau)) if controller else set()

    writer = _Writer(out_path, cfg.tensorboard)
    writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in cfg.to_dict().items()), 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=run.epoch, desc=f"{cfg.method} fold {cfg.fold}", unit="epoch")

    try:
        for epoch in range(run.epoch + 1, cfg.epochs + 1):
            seed_everything(epoch_seed(cfg.seed, epoch))
            epoch_start = time.perf_counter()
            refreshed = controller is not None and epoch in refreshes
            if refreshed:
                _refresh(run, epoch, cfg, data, train_idx, hw, writer)

            train_loss = _train_epoch(run, epoch, cfg, loss_fn, data, train_idx, hw, step_model)
            val_dice = _validation_dice(model, data, val_eval_idx, hw, cfg.batch_size)
            run.record_validation(epoch, val_dice, keep_weights=cfg.select_best)
            metrics = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_dice": val_dice,
                "best_val_dice": run.best.val_dice,
                "best_epoch": run.best.epoch,
                "epoch_seconds": time.perf_counter() - epoch_start,
            }
            if controller is not None:
                metrics.update(
                    eps_mean=float(controller.epsilon.mean()),
                    eps_std=float(controller.epsilon.std(unbiased=False)),
                    refreshed=refreshed,
                )
            run.history.append(metrics)
            run.epoch = epoch
            writer.add_scalar("loss/train", train_loss, epoch)
            writer.add_scalar("dice/val", val_dice, epoch)
            writer.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.4f}", val_dice=f"{val_dice:.4f}")
                bar.update(1)
            if report is not None:
                due = refreshed or epoch == cfg.epochs or (checkpoint_every and epoch % checkpoint_every == 0)
                report(dict(metrics), checkpoint_state(cfg, run) if due else None)

        model_epoch, model_val_dice = run.load_selected_weights(cfg.select_best)
        threshold, threshold_dice = _validation_threshold(model, data, val_eval_idx, hw, cfg.batch_size)
        if out_path is not None:
            save_model_file(out_path / MODEL_FILE, model.state_dict(), cfg.to_dict(), epoch=model_epoch,
                            val_dice=model_val_dice, threshold=threshold)
        summary = {
            "config": cfg.to_dict(),
            "dataset_size": len(data),
            "n_groups": int(data.n_groups),
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "n_test": len(test_idx),
            "val_dice": model_val_dice,
            "best_epoch": run.best.epoch,
            "model_epoch": model_epoch,
            "val_threshold": threshold,
            "val_dice_at_threshold": threshold_dice,
            "final_val_dice": run.history[-1]["val_dice"] if run.history else float("nan"),
            "device": str(hw.device),
            "refresh_epochs": sorted(refreshes),
        }
        per_image = pd.DataFrame()
        if evaluate_test:
            per_image = _test(cfg, model, data, test_idx, hw)
            for key in ("dice", "iou", "precision", "recall", "nsd", "nll", "brier"):
                summary[f"test_{key}"] = float(per_image[key].mean())
            summary["test_dice_hardest_quartile"] = hardest_quartile_mean(
                per_image["dice"].to_numpy(), per_image["difficulty"].to_numpy()
            )
            for key in ("dice", "iou", "nsd"):
                writer.add_scalar(f"test/{key}", summary[f"test_{key}"], cfg.epochs)
    finally:
        writer.close()
        if bar is not None:
            bar.close()

    result = RunResult(summary, pd.DataFrame(run.history), run.epsilon_table(), per_image)
    if out_path is not None:
        write_outputs(result, out_path)
    return result


def _refresh(run: RunState, epoch: int, cfg: TrainConfig, data: SegmentationData, train_idx: np.ndarray,
             hw: _Hardware, writer: _Writer) -> None:
    """Algorithm 1 lines 5–25: MC-Dropout difficulty of every training image, then new ε."""
    est = estimate_uncertainty(
        run.model,
        data.images,
        data.masks,
        train_idx,
        mc_samples=cfg.mc_samples,
        batch_size=cfg.batch_size,
        seed=epoch_seed(cfg.seed, epoch),
        amp=cfg.amp,
        channels_last=cfg.channels_last,
        memory_budget_bytes=int(cfg.mc_memory_gb * 2**30),
        keep_maps=cfg.log_maps,
    )
    bad = torch.nonzero(~torch.isfinite(est.difficulty)).flatten().tolist()
    if bad:
        raise NonFiniteLossError(
            f"non-finite MC-Dropout difficulty at the ε refresh of epoch {epoch} for images "
            f"{_some_names([data.names[train_idx[i]] for i in bad])}; stopping (the weights diverged, or check "
            "those images)"
        )
    eps = run.controller.update(epoch, est.difficulty)
    run.eps_records.append(
        pd.DataFrame({"epoch": epoch, "index": train_idx, "difficulty": est.difficulty.numpy(), "epsilon": eps.numpy()})
    )
    writer.add_histogram("epsilon", eps, epoch)
    writer.add_histogram("difficulty", est.difficulty, epoch)
    writer.add_scalar("epsilon/mean", float(eps.mean()), epoch)
    if est.maps:
        writer.add_image("uncertainty/image_mask_prob_mi_entropy", _map_panel(est.maps), epoch, dataformats="HWC")


def _train_epoch(run: RunState, epoch: int, cfg: TrainConfig, loss_fn: nn.Module, data: SegmentationData,
                 train_idx: np.ndarray, hw: _Hardware, step_model: nn.Module | None = None) -> float:
    """One pass over the training images; returns the mean loss.

    ``step_model`` runs the forward pass (``torch.compile`` of ``run.model``; default ``run.model``).
    The loss stays on the device: the host synchronises only every ``log_every`` steps and at the
    end, where a non-finite loss (tracked on the device by its first batch) stops the run.
    """
    model = run.model if step_model is None else step_model
    controller = run.controller
    model.train()
    seed = epoch_seed(cfg.seed, epoch)
    loader = make_loader(
        data,
        train_idx,
        cfg.batch_size,
        shuffle=True,
        transform=build_augmentation(seed) if cfg.augment else None,
        seed=seed,
        num_workers=cfg.num_workers,
        pin_memory=hw.pin_memory,
    )
    total = torch.zeros((), device=hw.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=hw.device)
    # The dataset indices of the first non-finite batch whose own loss is non-finite, kept on the
    # device so that the check costs no host synchronisation per step.
    bad_images = torch.zeros(len(data), dtype=torch.bool, device=hw.device)
    n_images = 0
    step = 0
    for step, (images, masks, indices) in enumerate(loader):
        x, y = hw.images(images), masks.to(hw.device, non_blocking=True)
        eps = controller.epsilon_for(indices).to(hw.device, non_blocking=True) if controller is not None else None
        with hw.autocast():
            logits = model(x)
        per_image = loss_fn(logits, y, eps)  # B; the losses compute in float32
        loss = per_image.mean()
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        finite = torch.isfinite(per_image.detach())  # B
        first_bad = torch.where((first_bad < 0) & ~finite.all(), torch.tensor(step, device=hw.device), first_bad)
        bad_images[indices.to(hw.device, non_blocking=True)] |= ~finite & (first_bad == step)
        total += per_image.detach().sum()
        n_images += len(indices)
        if (step + 1) % cfg.log_every == 0:
            _check_finite(first_bad, bad_images, epoch, loader, data)
        if step + 1 == cfg.max_batches:
            break
    _check_finite(first_bad, bad_images, epoch, loader, data)
    mean = float(total) / max(n_images, 1)
    return mean


def _check_finite(first_bad: Tensor, bad_images: Tensor, epoch: int, loader, data: SegmentationData) -> None:
    bad = int(first_bad)
    if bad >= 0:
        names = [data.names[i] for i in torch.nonzero(bad_images).flatten().tolist()]
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {epoch}, batch {bad + 1} of {len(loader)} (images with a "
            f"non-finite loss: {_some_names(names)}); stopping (when every image of the batch is named, the "
            "weights diverged: try a lower learning rate; else check those images)"
        )


def _some_names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _validation_threshold(model: nn.Module, data: SegmentationData, indices: np.ndarray, hw: _Hardware,
                          batch_size: int) -> tuple[float, float]:
    """The foreground threshold of :data:`THRESHOLDS` with the highest mean validation Dice, and
    that Dice. A pixel is foreground where its probability exceeds the threshold (at 0.5 this is
    the validation Dice itself). Ties go to the threshold nearest 0.5; no validation image: 0.5.
    """
    if len(indices) == 0:
        return 0.5, float("nan")

    def dice_per_threshold(probs: Tensor, masks: Tensor) -> dict[str, Tensor]:
        # B, len(THRESHOLDS)
        return {"dice": torch.stack([segmentation_metrics((probs > t).float(), masks)["dice"] for t in THRESHOLDS], 1)}

    mean = _per_image_metrics(model, data, indices, hw, batch_size, dice_per_threshold)["dice"].mean(0).tolist()
    best = max(range(len(THRESHOLDS)), key=lambda i: (mean[i], -abs(THRESHOLDS[i] - 0.5)))
    return THRESHOLDS[best], mean[best]


def _test(cfg: TrainConfig, model: UNet, data: SegmentationData, test_idx: np.ndarray, hw: _Hardware) -> pd.DataFrame:
    """Per-image test metrics, and each test image's MC-Dropout difficulty for stratification."""
    metrics = _per_image_metrics(model, data, test_idx, hw, cfg.batch_size,
                                 lambda probs, masks: all_metrics(probs, masks, cfg.nsd_tolerance))
    masks = torch.from_numpy(data.masks[test_idx])
    est = estimate_uncertainty(
        model,
        data.images,
        data.masks,
        test_idx,
        mc_samples=cfg.mc_samples,
        batch_size=cfg.batch_size,
        seed=epoch_seed(cfg.seed, cfg.epochs + 1),
        amp=cfg.amp,
        channels_last=cfg.channels_last,
        memory_budget_bytes=int(cfg.mc_memory_gb * 2**30),
    )
    frame = pd.DataFrame({"index": test_idx, "name": [data.names[i] for i in test_idx], "group": data.groups[test_idx]})
    for key, value in metrics.items():
        frame[key] = value.numpy()
    frame["difficulty"] = est.difficulty.numpy()
    frame["lesion_fraction"] = masks.flatten(1).float().mean(1).numpy()
    return frame


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_state(cfg: TrainConfig, run: RunState) -> dict:
    """A checkpoint after ``run.epoch``: the config it belongs to and the run's state."""
    return {"version": CHECKPOINT_VERSION, "config": cfg.to_dict(), "run": run.state_dict()}


def _check_version(checkpoint: dict) -> None:
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint format version {checkpoint.get('version')!r}; this polydice reads "
                              f"version {CHECKPOINT_VERSION}")


def restore_checkpoint(checkpoint: dict, cfg: TrainConfig, run: RunState) -> None:
    """Continue ``run`` from ``checkpoint``.

    Raises:
        ValueError: for another checkpoint version (:class:`CheckpointError`), a config that differs
            in a field outside :data:`RESUMABLE_CHANGES`, or fewer ``epochs`` than the checkpoint
            has finished.
    """
    _check_version(checkpoint)
    diff = {
        k: (v, getattr(cfg, k))
        for k, v in checkpoint["config"].items()
        if k not in RESUMABLE_CHANGES and getattr(cfg, k, v) != v
    }
    if diff:
        raise ValueError(f"checkpoint was written with a different config (saved, now): {diff}")
    if checkpoint["run"]["epoch"] > cfg.epochs:
        raise ValueError(f"checkpoint has finished epoch {checkpoint['run']['epoch']}, past epochs={cfg.epochs}")
    run.load_state_dict(checkpoint["run"])


def resumed_config(checkpoint: dict, overrides: dict) -> TrainConfig:
    """The config of a checkpointed run with ``overrides`` applied.

    Raises:
        ValueError: naming every override outside :data:`RESUMABLE_CHANGES` that differs from the
            checkpoint's value, or for another checkpoint version (:class:`CheckpointError`).
    """
    _check_version(checkpoint)
    saved = TrainConfig.from_dict(checkpoint["config"])
    fixed = [
        f"--{k.replace('_', '-')} {v} (the run has {getattr(saved, k)})"
        for k, v in overrides.items()
        if k not in RESUMABLE_CHANGES and v != getattr(saved, k)
    ]
    if fixed:
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUMABLE_CHANGES))
        raise ValueError(f"a resumed run cannot change {'; '.join(fixed)}; it may change only {allowed}")
    return saved.replace(**overrides)


def save_checkpoint(state: dict, path: str | os.PathLike, *, keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically: a process killed mid-write, a full disk or read-only
    storage leaves the previous checkpoint intact and no partial file behind.

    The bytes go to ``<path>.tmp``, are flushed to the disk (``fsync``), and only then replace
    ``path``; a failed write removes the temporary file.

    Args:
        state: :func:`checkpoint_state`.
        path: the checkpoint file.
        keep_previous: keep the checkpoint this one replaces as :data:`PREVIOUS_CHECKPOINT_FILE`
            beside it, for :func:`load_run_checkpoint` to fall back on.

    Raises:
        CheckpointWriteError: the file could not be written; the message names it.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as a RuntimeError
        with suppress(OSError):  # read-only storage refuses even this
            tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    try:
        if keep_previous and path.exists():
            os.replace(path, path.with_name(PREVIOUS_CHECKPOINT_FILE))
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot replace checkpoint {path}: {exc}") from exc


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint with ``weights_only=True`` and check that it is one this code can continue.

    Raises:
        CheckpointError (a ``ValueError``): naming the file, when it is missing, unreadable or
            truncated, not a polydice checkpoint (a ``model.pt``, say), of another format version
            (naming both versions), or lacks part of the run's state.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not a torch file at all
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a polydice checkpoint (it holds a {type(state).__name__})")
    if "format" in state:  # model.pt and other files that name their format
        raise CheckpointError(f"{path}: a {state['format']!r} file, not a training checkpoint ({CHECKPOINT_FILE})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state.get('version')!r}, but this polydice reads version "
            f"{CHECKPOINT_VERSION}; it was written by another version of polydice"
        )
    run = state.get("run")
    missing = [k for k in ("config", "run") if not isinstance(state.get(k), dict)]
    missing += [f"run.{k}" for k in RUN_STATE_KEYS if isinstance(run, dict) and k not in run]
    if missing:
        raise CheckpointError(f"{path}: checkpoint version {CHECKPOINT_VERSION} without {', '.join(missing)}")
    return state


def load_run_checkpoint(folder: str | os.PathLike) -> tuple[dict, list[str]]:
    """The newest usable checkpoint of a run folder: ``checkpoint.pt``, else the one it replaced
    (:data:`PREVIOUS_CHECKPOINT_FILE`, kept by the command line).

    Returns:
        The checkpoint, and why each newer file was passed over (empty when ``checkpoint.pt`` is used).

    Raises:
        CheckpointError: naming each file tried, when none is usable.
    """
    problems = []
    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
        path = Path(folder) / name
        if name == PREVIOUS_CHECKPOINT_FILE and not path.exists():
            break
        try:
            return load_checkpoint(path), problems
        except CheckpointError as exc:
            problems.append(str(exc))
    raise CheckpointError("; ".join(problems))


def write_outputs(result: RunResult, out_dir: str | os.PathLike) -> None:
    """``summary.json``, ``history.csv``, ``epsilon.csv`` and (when tested) ``per_image.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2, default=float) + "\n")
    result.history.to_csv(out / "history.csv", index=False)
    result.epsilon.to_csv(out / "epsilon.csv", index=False, columns=EPSILON_COLUMNS)
    if len(result.per_image):
        result.per_image.to_csv(out / "per_image.csv", index=False)


# ----------------------------------------------------------------------------- command line

# The annotations are strings (``from __future__ import annotations``).
_FLAG_TYPES = {"str": str, "str | None": str, "int": int, "float": float, "bool": bool}


def flag_of(name: str) -> str:
    """The command-line flag of a config field: ``eps_min`` → ``--eps-min``."""
    return "--" + name.replace("_", "-")


def _shown(default) -> str:
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else repr(default) if default == "" else str(default)


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`~polydice.config.TrainConfig` field, with the field's help text and
    default; booleans as ``--flag/--no-flag``. Config flags left out of the command line are
    absent from the parsed namespace, so that ``--resume`` knows which ones were given."""
    p = argparse.ArgumentParser(
        prog="python -m polydice.train",
        description="Train one method on one fold of a polyp segmentation dataset, keep the weights of the "
        "best validation epoch (model.pt) and test them.",
        epilog="Writes to the output folder: model.pt, checkpoint.pt, summary.json, history.csv, epsilon.csv, "
        "per_image.csv and TensorBoard events.",
    )
    config = p.add_argument_group("run settings (TrainConfig)")
    for f in fields(TrainConfig):
        kind = _FLAG_TYPES[f.type]
        help_text = f"{f.metadata['help']} (default: {_shown(f.default)})".replace("%", "%%")
        kwargs = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = f.metadata.get("choices")
            metavar = None if choices else {int: "N", float: "X"}.get(kind, f.name.rsplit("_", 1)[-1].upper())
            kwargs.update(type=kind, choices=choices, metavar=metavar)
        config.add_argument(flag_of(f.name), **kwargs)
    run = p.add_argument_group("output and resume")
    run.add_argument("--out", metavar="DIR", help="output folder (default: the --resume folder)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the run whose checkpoint is DIR/checkpoint.pt (when that one is unreadable: "
                     "DIR/checkpoint.prev.pt, the one it replaced), with its config; of the flags above only "
                     + ", ".join(flag_of(k) for k in sorted(RESUMABLE_CHANGES)) + " may change")
    run.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                     help="also write DIR/checkpoint.pt every N epochs (default: 0, i.e. at every ε refresh "
                     "and at the end only)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and args.resume is None:
        parser.error("--out DIR is required (or --resume DIR)")
    if args.checkpoint_every < 0:
        parser.error(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    given = {name: value for name, value in vars(args).items() if name in TrainConfig.field_names()}
    out = Path(args.out if args.out is not None else args.resume)

    def save(metrics: dict, state: dict | None) -> None:
        if state is not None:
            save_checkpoint(state, out / CHECKPOINT_FILE, keep_previous=True)

    try:
        resume = None
        if args.resume is not None:
            resume, passed_over = load_run_checkpoint(args.resume)
            for problem in passed_over:
                print(f"warning: {problem}; continuing from the previous checkpoint "
                      f"{Path(args.resume) / PREVIOUS_CHECKPOINT_FILE} (epoch {resume['run']['epoch']})",
                      file=sys.stderr)
            cfg = resumed_config(resume, given)
        else:
            cfg = TrainConfig.from_dict(given)
        result = train(cfg, save, out_dir=out, resume=resume, checkpoint_every=args.checkpoint_every,
                       progress=args.progress)
    except (DataError, ValueError, NonFiniteLossError, OSError) as exc:  # OSError: a full disk, say
        print(f"error: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, NonFiniteLossError) else 3
    s = result.summary
    print(
        f"{cfg.method} fold {cfg.fold}: val Dice {s['val_dice']:.4f} (epoch {s['model_epoch']}, threshold "
        f"{s['val_threshold']:.2f}: {s['val_dice_at_threshold']:.4f}), test Dice {s['test_dice']:.4f}, "
        f"IoU {s['test_iou']:.4f}, hardest-quartile Dice {s['test_dice_hardest_quartile']:.4f}\n"
        f"wrote {out / MODEL_FILE}, {out / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
