"""Train one method on one fold, end to end: the training function every study calls.

``train(config)`` loads (or receives) the data, splits the fold, trains with the configured loss,
refreshes the per-image ε of the adaptive method on the schedule of Algorithm 1, validates each
epoch, and tests the selected weights at the end. ``report(metrics, checkpoint)`` is called after
every epoch so that Ray Tune (``polydice.tune``) can plug in without this module importing Ray.

Command line::

    python -m polydice.train --dataset synthetic --method adaptive --epochs 4 --e0 2 --tau 1 \\
        --image-size 64 --base-channels 8 --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .config import DATASETS, METHODS, SCALES, TrainConfig
from .data import DataError, SegmentationData, build_augmentation, load_dataset, make_folds, make_loader
from .losses import build_loss, foreground_probs
from .metrics import all_metrics, hardest_quartile_mean, segmentation_metrics
from .model import UNet, to_input
from .schedule import EpsilonController, refresh_epochs
from .uncertainty import estimate_uncertainty

ReportFn = Callable[[dict, "dict | None"], None]
CHECKPOINT_VERSION = 1
# Fields a resumed run may change: more epochs, or other hardware; none changes what is computed
# per epoch except through the device's arithmetic.
RESUMABLE_CHANGES = {"epochs", "device", "amp", "channels_last", "compile", "num_workers", "mc_memory_gb",
                     "log_maps", "log_every", "tensorboard", "data_dir"}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says at which epoch and batch."""


@dataclass
class RunResult:
    """Everything a run produces; :func:`write_outputs` turns it into files."""

    summary: dict
    history: pd.DataFrame
    epsilon: pd.DataFrame
    per_image: pd.DataFrame = field(default_factory=pd.DataFrame)


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
        out_dir: where TensorBoard events, ``summary.json``, ``epsilon.csv``, ``history.csv`` and
            ``per_image.csv`` go; nothing is written when ``None``.
        resume: a checkpoint state to continue from (epochs after its ``epoch``).
        evaluate_test: test at the end. A hyperparameter search passes ``False``: it must select
            on validation Dice, and then never touches the test part at all.
        checkpoint_every: also hand a checkpoint to ``report`` every this many epochs (0: never).
        progress: show a progress bar.

    Returns:
        :class:`RunResult`.

    Raises:
        NonFiniteLossError: when the loss turns NaN or infinite (the message names epoch and batch).
        polydice.data.DataError: for unreadable or inconsistent data.
    """
    cfg = config
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    hw = _Hardware(cfg)

    if data is None:
        data = load_data(cfg)
    elif data.images.shape[1] != cfg.image_size:
        raise ValueError(f"data holds {data.images.shape[1]}px images but the config asks for {cfg.image_size}px")
    folds = make_folds(data.groups, cfg.folds, seed=cfg.split_seed, val_fraction=cfg.val_fraction)
    train_idx, val_idx, test_idx = folds[cfg.fold]
    val_eval_idx = val_idx[: cfg.max_batches * cfg.batch_size] if cfg.max_batches else val_idx

    model = build_model(cfg).to(hw.device, memory_format=hw.memory_format)
    step_model = torch.compile(model) if cfg.compile else model
    loss_fn = build_method_loss(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    controller = (
        EpsilonController(train_idx, cfg.e0, cfg.tau, cfg.q, cfg.k, cfg.eps_min, cfg.eps_max, cfg.delta)
        if cfg.uses_controller
        else None
    )
    refreshes = set(refresh_epochs(cfg.epochs, cfg.e0, cfg.tau)) if controller else set()

    history: list[dict] = []
    eps_records: list[pd.DataFrame] = []
    best = {"val_dice": -math.inf, "epoch": 0, "model": None}
    start_epoch = 1
    if resume is not None:
        start_epoch = _restore(resume, cfg, model, optimizer, hw.scaler, controller, history, eps_records, best)

    writer = _Writer(out_path, cfg.tensorboard)
    writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in cfg.to_dict().items()), 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=start_epoch - 1, desc=f"{cfg.method} fold {cfg.fold}", unit="epoch")

    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            seed_everything(epoch_seed(cfg.seed, epoch))
            epoch_start = time.perf_counter()
            refreshed = False
            if controller is not None and epoch in refreshes:
                _refresh(epoch, cfg, model, data, train_idx, controller, hw, writer, eps_records)
                refreshed = True

            train_loss = _train_epoch(epoch, cfg, step_model, loss_fn, optimizer, data, train_idx, controller, hw, writer)
            val_dice = _validation_dice(model, data, val_eval_idx, hw, cfg.batch_size)
            if val_dice > best["val_dice"]:
                best.update(val_dice=val_dice, epoch=epoch)
                if cfg.select_best:
                    best["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

            metrics = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_dice": val_dice,
                "best_val_dice": best["val_dice"],
                "best_epoch": best["epoch"],
                "epoch_seconds": time.perf_counter() - epoch_start,
            }
            if controller is not None:
                metrics.update(
                    eps_mean=float(controller.epsilon.mean()),
                    eps_std=float(controller.epsilon.std(unbiased=False)),
                    refreshed=refreshed,
                )
            history.append(metrics)
            writer.add_scalar("loss/train", train_loss, epoch)
            writer.add_scalar("dice/val", val_dice, epoch)
            writer.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.4f}", val_dice=f"{val_dice:.4f}")
                bar.update(1)
            if report is not None:
                due = refreshed or epoch == cfg.epochs or (checkpoint_every and epoch % checkpoint_every == 0)
                state = (
                    checkpoint_state(epoch, cfg, model, optimizer, hw.scaler, controller, history, eps_records, best)
                    if due
                    else None
                )
                report(dict(metrics), state)

        if cfg.select_best and best["model"] is not None:
            model.load_state_dict(best["model"])
        summary = {
            "config": cfg.to_dict(),
            "dataset_size": len(data),
            "n_groups": int(data.n_groups),
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "n_test": len(test_idx),
            "val_dice": best["val_dice"] if cfg.select_best else history[-1]["val_dice"],
            "best_epoch": best["epoch"],
            "final_val_dice": history[-1]["val_dice"] if history else float("nan"),
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

    epsilon = pd.concat(eps_records, ignore_index=True) if eps_records else pd.DataFrame(
        columns=["epoch", "index", "difficulty", "epsilon"]
    )
    result = RunResult(summary, pd.DataFrame(history), epsilon, per_image)
    if out_path is not None:
        write_outputs(result, out_path)
    return result


def _refresh(epoch, cfg, model, data, train_idx, controller, hw, writer, eps_records) -> None:
    """Algorithm 1 lines 5–25: MC-Dropout difficulty of every training image, then new ε."""
    est = estimate_uncertainty(
        model,
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
    eps = controller.update(epoch, est.difficulty)
    eps_records.append(
        pd.DataFrame({"epoch": epoch, "index": train_idx, "difficulty": est.difficulty.numpy(), "epsilon": eps.numpy()})
    )
    writer.add_histogram("epsilon", eps, epoch)
    writer.add_histogram("difficulty", est.difficulty, epoch)
    writer.add_scalar("epsilon/mean", float(eps.mean()), epoch)
    if est.maps:
        writer.add_image("uncertainty/image_mask_prob_mi_entropy", _map_panel(est.maps), epoch, dataformats="HWC")


def _train_epoch(epoch, cfg, model, loss_fn, optimizer, data, train_idx, controller, hw, writer) -> float:
    """One pass over the training images; returns the mean loss.

    The loss stays on the device: the host synchronises only every ``log_every`` steps and at the
    end, where a non-finite loss (tracked on the device by its first batch) stops the run.
    """
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
    n_images = 0
    step = 0
    for step, (images, masks, indices) in enumerate(loader):
        x, y = hw.images(images), masks.to(hw.device, non_blocking=True)
        eps = controller.epsilon_for(indices).to(hw.device, non_blocking=True) if controller is not None else None
        with hw.autocast():
            logits = model(x)
        per_image = loss_fn(logits, y, eps)  # B; the losses compute in float32
        loss = per_image.mean()
        optimizer.zero_grad(set_to_none=True)
        hw.scaler.scale(loss).backward()
        hw.scaler.step(optimizer)
        hw.scaler.update()
        finite = torch.isfinite(loss.detach())
        first_bad = torch.where((first_bad < 0) & ~finite, torch.tensor(step, device=hw.device), first_bad)
        total += per_image.detach().sum()
        n_images += len(indices)
        if (step + 1) % cfg.log_every == 0:
            _check_finite(first_bad, epoch, loader)
        if step + 1 == cfg.max_batches:
            break
    _check_finite(first_bad, epoch, loader)
    mean = float(total) / max(n_images, 1)
    return mean


def _check_finite(first_bad: Tensor, epoch: int, loader) -> None:
    bad = int(first_bad)
    if bad >= 0:
        raise NonFiniteLossError(
            f"non-finite training loss at epoch {epoch}, batch {bad + 1} of {len(loader)}; "
            "stopping (try a lower learning rate or check the inputs of that batch)"
        )


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


def checkpoint_state(epoch, cfg, model, optimizer, scaler, controller, history, eps_records, best) -> dict:
    """Everything needed to continue a run after ``epoch``: tensors and plain Python values only,
    so that it loads with ``torch.load(..., weights_only=True)``.

    Random state needs no saving: each epoch reseeds from ``(seed, epoch)``.
    """
    eps_table = pd.concat(eps_records, ignore_index=True) if eps_records else None
    return {
        "version": CHECKPOINT_VERSION,
        "epoch": int(epoch),
        "config": cfg.to_dict(),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "controller": controller.state_dict() if controller is not None else None,
        "history": [dict(h) for h in history],
        "eps_records": None
        if eps_table is None
        else {col: torch.tensor(eps_table[col].to_numpy()) for col in eps_table.columns},
        "best": {
            "val_dice": float(best["val_dice"]),
            "epoch": int(best["epoch"]),
            "model": None if best["model"] is None else {k: v.cpu() for k, v in best["model"].items()},
        },
    }


def _restore(state, cfg, model, optimizer, scaler, controller, history, eps_records, best) -> int:
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {state.get('version')!r} is not {CHECKPOINT_VERSION}")
    diff = {
        k: (v, getattr(cfg, k))
        for k, v in state["config"].items()
        if k not in RESUMABLE_CHANGES and getattr(cfg, k, v) != v
    }
    if diff:
        raise ValueError(f"checkpoint was written with a different config (saved, now): {diff}")
    device = next(model.parameters()).device
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # moves its state to the parameters' device
    scaler.load_state_dict(state["scaler"])
    if controller is not None:
        controller.load_state_dict(state["controller"])
    history.extend(state["history"])
    if state["eps_records"] is not None:
        eps_records.append(pd.DataFrame({k: v.numpy() for k, v in state["eps_records"].items()}))
    best.update(val_dice=state["best"]["val_dice"], epoch=state["best"]["epoch"])
    if state["best"]["model"] is not None:
        best["model"] = {k: v.to(device) for k, v in state["best"]["model"].items()}
    return int(state["epoch"]) + 1


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write atomically, so that a worker killed mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def write_outputs(result: RunResult, out_dir: str | os.PathLike) -> None:
    """``summary.json``, ``history.csv``, ``epsilon.csv`` and (when tested) ``per_image.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2, default=float) + "\n")
    result.history.to_csv(out / "history.csv", index=False)
    result.epsilon.to_csv(out / "epsilon.csv", index=False, columns=["epoch", "index", "difficulty", "epsilon"])
    if len(result.per_image):
        result.per_image.to_csv(out / "per_image.csv", index=False)


# ----------------------------------------------------------------------------- command line

_CLI_FIELDS = {
    # flag: (config field, type)
    "--dataset": ("dataset", str),
    "--data-dir": ("data_dir", str),
    "--method": ("method", str),
    "--eps": ("eps", float),
    "--order": ("order", int),
    "--polydice-scale": ("polydice_scale", str),
    "--fold": ("fold", int),
    "--folds": ("folds", int),
    "--epochs": ("epochs", int),
    "--image-size": ("image_size", int),
    "--base-channels": ("base_channels", int),
    "--batch-size": ("batch_size", int),
    "--lr": ("lr", float),
    "--e0": ("e0", int),
    "--tau": ("tau", int),
    "--k": ("k", float),
    "--q": ("q", float),
    "--eps-min": ("eps_min", float),
    "--eps-max": ("eps_max", float),
    "--mc-samples": ("mc_samples", int),
    "--dropout": ("dropout", float),
    "--seed": ("seed", int),
    "--n-synthetic": ("n_synthetic", int),
    "--sequence-csv": ("sequence_csv", str),
    "--num-workers": ("num_workers", int),
    "--device": ("device", str),
    "--nsd-tolerance": ("nsd_tolerance", float),
    "--max-batches": ("max_batches", int),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m polydice.train",
        description="Train one method on one fold of a polyp segmentation dataset and test it.",
    )
    defaults = TrainConfig()
    for flag, (name, kind) in _CLI_FIELDS.items():
        extra = {}
        if name == "dataset":
            extra["choices"] = DATASETS
        if name == "method":
            extra["choices"] = METHODS
        if name == "polydice_scale":
            extra["choices"] = SCALES
        p.add_argument(flag, dest=name, type=kind, default=getattr(defaults, name), **extra,
                       help=f"(default: {getattr(defaults, name)})")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="disable flips and brightness/contrast")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", required=True, help="output folder: summary.json, epsilon.csv, per_image.csv, TensorBoard events")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {name: getattr(args, name) for name, _ in _CLI_FIELDS.values()}
    values.update(augment=args.augment, amp=args.amp, compile=args.compile)
    try:
        cfg = TrainConfig.from_dict(values)
        result = train(cfg, out_dir=args.out, progress=args.progress)
    except (DataError, ValueError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, NonFiniteLossError) else 3
    s = result.summary
    print(
        f"{cfg.method} fold {cfg.fold}: val Dice {s['val_dice']:.4f} (epoch {s['best_epoch']}), "
        f"test Dice {s['test_dice']:.4f}, IoU {s['test_iou']:.4f}, hardest-quartile Dice "
        f"{s['test_dice_hardest_quartile']:.4f}\nwrote {Path(args.out) / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
