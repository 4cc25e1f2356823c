"""The in-process ratios: ε refresh, data pipeline, and the training function's own overhead.

Each case builds the project's model, loss and optimizer from one :class:`TrainConfig`
(``build_model``, ``build_method_loss``) and times the project's functions against the simplest
thing that does the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch

import polydice.train
from polydice.checkpoint import RunState
from polydice.config import TrainConfig
from polydice.data import SegmentationData, build_augmentation, make_loader
from polydice.device import Hardware, epoch_seed
from polydice.model import forward_flops, refresh_flops
from polydice.schedule import EpsilonController
from polydice.synthetic import make_synthetic
from polydice.train import RunSetup, build_method_loss, build_model, train_epoch
from polydice.uncertainty import estimate_uncertainty, estimate_uncertainty_naive

from .timing import CaseResult, interleaved, median_ratio, rate_line

EPOCH = 1  # every timed epoch is "epoch 1": the same shuffle and augmentation stream each time
FEED_IMAGE_SIZE, FEED_BATCH = 224, 32  # the thesis's image size and batch: what a GPU trains on


@dataclass
class Workload:
    """What the in-process cases share: one config, the data, the images an epoch goes through."""

    cfg: TrainConfig
    data: SegmentationData
    indices: np.ndarray
    hw: Hardware
    repeats: int
    warmup: bool
    refresh_images: int

    @property
    def flops(self) -> dict[str, float]:
        return forward_flops(self.cfg.base_channels, self.cfg.image_size)


@dataclass
class _Parts:
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    controller: EpsilonController


def _parts(work: Workload) -> _Parts:
    """The model, loss, optimizer and ε table exactly as :func:`polydice.train.train` builds them."""
    cfg = work.cfg
    model = build_model(cfg).to(work.hw.device, memory_format=work.hw.memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    controller = EpsilonController(work.indices, cfg.e0, cfg.tau, cfg.q, cfg.k, cfg.eps_min, cfg.eps_max, cfg.delta)
    return _Parts(model, build_method_loss(cfg), optimizer, controller)


def _project_epoch(work: Workload, cfg: TrainConfig, parts: _Parts):
    """One call of the project's ``train_epoch`` (no validation, no ε refresh, no TensorBoard)."""
    run = RunState(parts.model, parts.optimizer, work.hw.scaler, parts.controller)
    setup = RunSetup(cfg, work.data, work.hw, parts.loss_fn, work.indices)
    return lambda: train_epoch(run, EPOCH, setup)


def refresh_vs_naive(work: Workload) -> CaseResult:
    """``estimate_uncertainty`` ÷ T full forward passes.

    The estimator runs the encoder and the decoder's skip-feature convolutions once per batch and
    the rest of the decoder T times, batched; the FLOP ratio of that split is printed as the ideal.
    """
    cfg = work.cfg
    model = build_model(cfg).to(work.hw.device, memory_format=work.hw.memory_format)
    indices = work.indices[: work.refresh_images]
    common = dict(indices=indices, mc_samples=cfg.mc_samples, batch_size=cfg.batch_size, seed=0,
                  amp=cfg.amp, channels_last=cfg.channels_last)
    budget = int(cfg.mc_memory_gb * 2**30)
    times = interleaved({
        "fast": lambda: estimate_uncertainty(model, work.data.images, work.data.masks,
                                             memory_budget_bytes=budget, **common),
        "naive": lambda: estimate_uncertainty_naive(model, work.data.images, work.data.masks, **common),
    }, work.repeats, work.hw.device, work.warmup)
    n, t, f = len(indices), cfg.mc_samples, work.flops
    fast_flops = refresh_flops(cfg.base_channels, cfg.image_size, t)
    return CaseResult("refresh_vs_naive", median_ratio(times["fast"], times["naive"]), 0.75, [
        f"refresh_vs_naive: {n} images, T={t}, batch {cfg.batch_size}; "
        f"FLOP ratio (ideal) {fast_flops / (t * f['total']):.3f}",
        rate_line("estimate_uncertainty", times["fast"], n, n * fast_flops),
        rate_line("estimate_uncertainty_naive", times["naive"], n, n * t * f["total"]),
    ])


def loader_vs_tensors(work: Workload) -> CaseResult:
    """The project's epoch fed by ``make_loader`` with augmentation ÷ fed by pre-built batches.

    Both sides run the same ``train_epoch`` on the same model; on the second side the module's
    ``make_loader`` is replaced by the list of batches it would yield without augmentation, built
    (and pinned, on CUDA) before timing. The difference is therefore exactly the per-epoch data
    pipeline: indexing, albumentations, collation and pinning.
    """
    cfg = work.cfg.replace(augment=True)
    parts = _parts(work)
    epoch = _project_epoch(work, cfg, parts)
    batches = list(make_loader(work.data, work.indices, cfg.batch_size, shuffle=True,
                               seed=epoch_seed(cfg.seed, EPOCH), pin_memory=work.hw.pin_memory))

    def epoch_on_tensors():
        with mock.patch.object(polydice.train, "make_loader", lambda *args, **kwargs: batches):
            epoch()

    times = interleaved({"loader": epoch, "tensors": epoch_on_tensors}, work.repeats, work.hw.device, work.warmup)
    n, flops = len(work.indices), 3 * len(work.indices) * work.flops["total"]
    return CaseResult("loader_vs_tensors", median_ratio(times["loader"], times["tensors"]), 1.10, [
        f"loader_vs_tensors: {n} images/epoch, batch {cfg.batch_size}, loader workers {cfg.num_workers}; "
        "training FLOPs = 3 x forward",
        rate_line("train_epoch, make_loader + augmentation", times["loader"], n, flops),
        rate_line("train_epoch, pre-built batches", times["tensors"], n, flops),
    ])


def _bare_epoch(work: Workload, parts: _Parts):
    """The same model, loss, optimizer and batch size in a plain PyTorch loop.

    The images sit on the device as one uint8 tensor; each step slices a random batch, converts
    it and steps the optimizer (no loader, no loss scaler, no non-finite checks).
    """
    device, bs = work.hw.device, work.cfg.batch_size
    images = torch.from_numpy(work.data.images[work.indices]).permute(0, 3, 1, 2).contiguous().to(device)
    masks = torch.from_numpy(work.data.masks[work.indices]).to(device)
    eps = parts.controller.epsilon_for(torch.from_numpy(work.indices)).to(device)
    generator = torch.Generator().manual_seed(0)
    amp_dtype = work.hw.amp_dtype

    def epoch():
        parts.model.train()
        order = torch.randperm(len(images), generator=generator).to(device)
        for start in range(0, len(images), bs):
            batch = order[start : start + bs]
            x = (images[batch].float() / 255).contiguous(memory_format=work.hw.memory_format)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = parts.model(x)
            loss = parts.loss_fn(logits, masks[batch], eps[batch]).mean()
            parts.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            parts.optimizer.step()

    return epoch


def epoch_vs_bare_loop(work: Workload) -> CaseResult:
    """The project's ``train_epoch`` without augmentation ÷ a bare loop over device tensors.

    Included on the project's side: ``make_loader`` (per-image indexing and collation, no
    augmentation: that cost is ``loader_vs_tensors``), host-to-device copies, the ε lookup, the
    loss scaler and the on-device non-finite tracking with its periodic synchronisation.
    """
    cfg = work.cfg.replace(augment=False)
    parts = _parts(work)
    times = interleaved({"project": _project_epoch(work, cfg, parts), "bare": _bare_epoch(work, parts)},
                        work.repeats, work.hw.device, work.warmup)
    n, flops = len(work.indices), 3 * len(work.indices) * work.flops["total"]
    return CaseResult("epoch_vs_bare_loop", median_ratio(times["project"], times["bare"]), 1.05, [
        f"epoch_vs_bare_loop: {n} images/epoch, batch {cfg.batch_size}, no augmentation on either side",
        rate_line("train_epoch", times["project"], n, flops),
        rate_line("bare PyTorch loop", times["bare"], n, flops),
    ])


def loader_feed_rate(n_images: int, repeats: int, warmup: bool = True) -> list[str]:
    """What one CPU core feeds a GPU: the images per second ``make_loader`` yields at 224², batch
    32, no loader workers, one torch and one OpenCV thread, with the thesis augmentation and
    without. Set beside a GPU's training rate (images/s at the same size), it says how many cores
    the loader needs; no ratio, no target.

    Returns:
        The lines to print; the last is ``LOADER loader_images_per_s_per_core <rate> (...)``.
    """
    import cv2

    data = make_synthetic(n=n_images, image_size=FEED_IMAGE_SIZE)
    indices = np.arange(len(data))

    def epoch(transform):
        def run():
            for _ in make_loader(data, indices, FEED_BATCH, shuffle=True, transform=transform,
                                 seed=epoch_seed(0, EPOCH)):
                pass
        return run

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        times = interleaved({"augment": epoch(build_augmentation(0)), "plain": epoch(None)}, repeats,
                            torch.device("cpu"), warmup)
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    rate = {name: n_images / float(np.median(t)) for name, t in times.items()}
    return [f"loader_images_per_s_per_core: {n_images} images at {FEED_IMAGE_SIZE} px, batch {FEED_BATCH}, no loader "
            "workers, one torch and one OpenCV thread, median of "
            f"{repeats}: {rate['augment']:.0f} images/s with the thesis augmentation, {rate['plain']:.0f} without",
            f"LOADER loader_images_per_s_per_core {rate['augment']:.0f} (augmentation on; {rate['plain']:.0f} off)"]

