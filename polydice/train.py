"""Train one method on one fold, end to end: the training function every study calls.

``train(config)`` loads (or receives) the data, splits the fold, trains with the configured loss,
refreshes the per-image ε of the adaptive method on the schedule of Algorithm 1, validates each
epoch, keeps the weights of the best validation epoch as ``model.pt`` and tests them at the end.
``report(metrics, checkpoint)`` is called after every epoch so that Ray Tune (``polydice.tune``)
can plug in without this module importing Ray. Everything a run carries across a checkpoint lives
in one :class:`~polydice.checkpoint.RunState`, what it holds fixed in one :class:`RunSetup`; the
evaluation is :mod:`polydice.evaluate`'s, the device choices :mod:`polydice.device`'s.

Command line (one flag per :class:`~polydice.config.TrainConfig` field, see ``--help``)::

    python -m polydice.train --dataset synthetic --method adaptive --epochs 4 --e0 2 --tau 1 \\
        --image-size 64 --base-channels 8 --out runs/demo
    python -m polydice.train --resume runs/demo --epochs 8   # continue from runs/demo/checkpoint.pt
"""


from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .checkpoint import (CHECKPOINT_FILE, EPSILON_FILE, HISTORY_FILE, MODEL_FILE, PER_IMAGE_FILE,
                         PREVIOUS_CHECKPOINT_FILE, RESUMABLE_CHANGES, SUMMARY_FILE, RunResult, RunState,
                         checkpoint_state, load_run_checkpoint, restore_checkpoint, resumed_config, save_checkpoint,
                         write_outputs)
from .config import TrainConfig
from .data import DataError, SegmentationData, build_augmentation, load_dataset, make_loader
from .device import Hardware, epoch_seed, seed_everything
from .evaluate import per_image_test_metrics, run_uncertainty, summarise_test, validation_dice, validation_threshold
from .losses import build_loss
from .model import UNet, save_model_file
from .schedule import EpsilonController, refresh_epochs

ReportFn = Callable[[dict, "dict | None"], None]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the message says at which epoch and batch, and
    which images of that batch had a non-finite loss."""


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


@dataclass
class RunSetup:
    """What a run holds fixed from its first epoch to its last: the config, the data and its split,
    the hardware, the loss, and the module that runs the training forward pass.

    Attributes:
        train_idx, val_idx, test_idx: the fold's parts, indices into ``data``.
        step_model: ``torch.compile`` of the run's model when the config asks for it; ``None``:
            the model itself.
    """

    cfg: TrainConfig
    data: SegmentationData
    hw: Hardware
    loss_fn: nn.Module
    train_idx: np.ndarray
    val_idx: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    test_idx: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    step_model: nn.Module | None = None

    @property
    def val_eval_idx(self) -> np.ndarray:
        """The validation images evaluated each epoch: all, or the first ``max_batches`` batches."""
        cfg = self.cfg
        return self.val_idx[: cfg.max_batches * cfg.batch_size] if cfg.max_batches else self.val_idx


def _start(cfg: TrainConfig, data: SegmentationData | None) -> tuple[RunSetup, RunState]:
    """The hardware, data, split, model, loss, optimizer and ε controller of a new run, seeded."""
    seed_everything(cfg.seed)
    hw = Hardware.from_config(cfg)
    if data is None:
        data = load_data(cfg)
    elif data.images.shape[1] != cfg.image_size:
        raise ValueError(f"data holds {data.images.shape[1]}px images but the config asks for {cfg.image_size}px")
    train_idx, val_idx, test_idx = data.folds(cfg.folds, cfg.split_seed, cfg.val_fraction)[cfg.fold]

    model = build_model(cfg).to(hw.device, memory_format=hw.memory_format)
    step_model = torch.compile(model) if cfg.compile else model
    setup = RunSetup(cfg, data, hw, build_method_loss(cfg), train_idx, val_idx, test_idx, step_model)
    controller = (
        EpsilonController(train_idx, cfg.e0, cfg.tau, cfg.q, cfg.k, cfg.eps_min, cfg.eps_max, cfg.delta)
        if cfg.uses_controller
        else None
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return setup, RunState(model, optimizer, hw.scaler, controller)


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
    setup, run = _start(cfg, data)
    if resume is not None:
        restore_checkpoint(resume, cfg, run)
    refreshes = set(refresh_epochs(cfg.epochs, cfg.e0, cfg.tau)) if run.controller else set()

    writer = _Writer(out_path, cfg.tensorboard)
    writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in cfg.to_dict().items()), 0)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, initial=run.epoch, desc=f"{cfg.method} fold {cfg.fold}", unit="epoch")

    try:
        for epoch in range(run.epoch + 1, cfg.epochs + 1):
            metrics = _run_epoch(run, epoch, setup, epoch in refreshes, writer)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", val_dice=f"{metrics['val_dice']:.4f}")
                bar.update(1)
            if report is not None:
                due = epoch in refreshes or epoch == cfg.epochs or (checkpoint_every and epoch % checkpoint_every == 0)
                report(dict(metrics), checkpoint_state(cfg, run) if due else None)
        summary, per_image = _finish(run, setup, sorted(refreshes), out_path, evaluate_test, writer)
    finally:
        writer.close()
        if bar is not None:
            bar.close()

    result = RunResult(summary, pd.DataFrame(run.history), run.epsilon_table(), per_image)
    if out_path is not None:
        write_outputs(result, out_path)
    return result


def _run_epoch(run: RunState, epoch: int, setup: RunSetup, refresh: bool, writer: _Writer) -> dict:
    """Epoch ``epoch`` of Algorithm 1: refresh ε when due, train, validate; returns its metrics,
    which it also appends to ``run.history``."""
    cfg = setup.cfg
    seed_everything(epoch_seed(cfg.seed, epoch))
    epoch_start = time.perf_counter()
    if refresh:
        _refresh(run, epoch, setup, writer)

    train_loss = train_epoch(run, epoch, setup)
    val_dice = validation_dice(run.model, setup.data, setup.val_eval_idx, setup.hw, cfg.batch_size)
    run.record_validation(epoch, val_dice, keep_weights=cfg.select_best)
    metrics = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_dice": val_dice,
        "best_val_dice": run.best.val_dice,
        "best_epoch": run.best.epoch,
        "epoch_seconds": time.perf_counter() - epoch_start,
    }
    if run.controller is not None:
        metrics.update(
            eps_mean=float(run.controller.epsilon.mean()),
            eps_std=float(run.controller.epsilon.std(unbiased=False)),
            refreshed=refresh,
        )
    run.history.append(metrics)
    run.epoch = epoch
    writer.add_scalar("loss/train", train_loss, epoch)
    writer.add_scalar("dice/val", val_dice, epoch)
    writer.flush()
    return metrics


def _finish(run: RunState, setup: RunSetup, refreshes: list[int], out_path: Path | None, evaluate_test: bool,
            writer: _Writer) -> tuple[dict, pd.DataFrame]:
    """After the last epoch: put the kept weights into the model, choose their threshold on the
    validation split, save them as ``model.pt`` and, when ``evaluate_test``, test them.

    Returns:
        The run's summary, and the per-image test metrics (empty when not tested).
    """
    cfg, model, data = setup.cfg, run.model, setup.data
    model_epoch, model_val_dice = run.load_selected_weights(cfg.select_best)
    threshold, threshold_dice = validation_threshold(model, data, setup.val_eval_idx, setup.hw, cfg.batch_size)
    if out_path is not None:
        save_model_file(out_path / MODEL_FILE, model.state_dict(), cfg.to_dict(), epoch=model_epoch,
                        val_dice=model_val_dice, threshold=threshold)
    summary = {
        "config": cfg.to_dict(),
        "dataset_size": len(data),
        "n_groups": int(data.n_groups),
        "n_train": len(setup.train_idx),
        "n_val": len(setup.val_idx),
        "n_test": len(setup.test_idx),
        "val_dice": model_val_dice,
        "best_epoch": run.best.epoch,
        "model_epoch": model_epoch,
        "val_threshold": threshold,
        "val_dice_at_threshold": threshold_dice,
        "final_val_dice": run.history[-1]["val_dice"] if run.history else float("nan"),
        "device": str(setup.hw.device),
        "refresh_epochs": refreshes,
    }
    per_image = pd.DataFrame()
    if evaluate_test:
        per_image = per_image_test_metrics(cfg, model, data, setup.test_idx, setup.hw,
                                           seed=epoch_seed(cfg.seed, cfg.epochs + 1))
        summary.update(summarise_test(per_image))
        for key in ("dice", "iou", "nsd"):
            writer.add_scalar(f"test/{key}", summary[f"test_{key}"], cfg.epochs)
    return summary, per_image


def _refresh(run: RunState, epoch: int, setup: RunSetup, writer: _Writer) -> None:
    """Algorithm 1 lines 5–25: MC-Dropout difficulty of every training image, then new ε."""
    cfg, data, train_idx = setup.cfg, setup.data, setup.train_idx
    est = run_uncertainty(cfg, run.model, data, train_idx, seed=epoch_seed(cfg.seed, epoch), keep_maps=cfg.log_maps)
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


def train_epoch(run: RunState, epoch: int, setup: RunSetup) -> float:
    """One pass over the training images ``setup.train_idx``; returns the mean loss.

    ``setup.step_model`` runs the forward pass (default ``run.model``). The loss stays on the
    device: the host synchronises only every ``log_every`` steps and at the end, where a
    non-finite loss (tracked on the device by its first batch) stops the run.

    Raises:
        NonFiniteLossError: naming the epoch, the batch and its images with a non-finite loss.
    """
    cfg, data, hw = setup.cfg, setup.data, setup.hw
    model = run.model if setup.step_model is None else setup.step_model
    controller = run.controller
    model.train()
    seed = epoch_seed(cfg.seed, epoch)
    loader = make_loader(
        data,
        setup.train_idx,
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
        per_image = setup.loss_fn(logits, y, eps)  # B; the losses compute in float32
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
        epilog=f"Writes to the output folder: {MODEL_FILE}, {CHECKPOINT_FILE}, {SUMMARY_FILE}, {HISTORY_FILE}, "
        f"{EPSILON_FILE}, {PER_IMAGE_FILE} and TensorBoard events.",
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
                     help=f"continue the run whose checkpoint is DIR/{CHECKPOINT_FILE} (when that one is unreadable: "
                     f"DIR/{PREVIOUS_CHECKPOINT_FILE}, the one it replaced), with its config; of the flags above only "
                     + ", ".join(flag_of(k) for k in sorted(RESUMABLE_CHANGES)) + " may change")
    run.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                     help=f"also write DIR/{CHECKPOINT_FILE} every N epochs (default: 0, i.e. at every ε refresh "
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
        f"wrote {out / MODEL_FILE}, {out / SUMMARY_FILE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
