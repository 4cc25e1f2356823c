"""Evaluation of a trained U-Net on part of a dataset: validation Dice, the validation-optimal
threshold, per-image test metrics, and MC-Dropout difficulty with a run's settings.

Every evaluation runs in full eval mode (deterministic) and streams batch by batch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .config import TrainConfig
from .data import SegmentationData
from .device import Hardware
from .losses import foreground_probs
from .metrics import all_metrics, hardest_quartile_mean, segmentation_metrics
from .uncertainty import UncertaintyResult, estimate_uncertainty

# Foreground probability thresholds searched on the validation split for model.pt: 0.05 ... 0.95.
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
# The test metrics averaged into a run's summary as test_<key>.
TEST_METRICS = ("dice", "iou", "precision", "recall", "nsd", "nll", "brier")


def per_image_metrics(model: nn.Module, data: SegmentationData, indices: np.ndarray, hw: Hardware,
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


def validation_dice(model: nn.Module, data: SegmentationData, indices: np.ndarray, hw: Hardware,
                    batch_size: int) -> float:
    """Mean Dice of the images ``indices`` at the threshold 0.5."""
    return float(per_image_metrics(model, data, indices, hw, batch_size, segmentation_metrics)["dice"].mean())


def validation_threshold(model: nn.Module, data: SegmentationData, indices: np.ndarray, hw: Hardware,
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

    mean = per_image_metrics(model, data, indices, hw, batch_size, dice_per_threshold)["dice"].mean(0).tolist()
    best = max(range(len(THRESHOLDS)), key=lambda i: (mean[i], -abs(THRESHOLDS[i] - 0.5)))
    return THRESHOLDS[best], mean[best]


def run_uncertainty(cfg: TrainConfig, model: nn.Module, data: SegmentationData, indices: np.ndarray, seed: int,
                    keep_maps: int = 0) -> UncertaintyResult:
    """:func:`~polydice.uncertainty.estimate_uncertainty` of the images ``indices`` with the run's
    MC-Dropout settings (samples, batch size, autocast, channels-last, memory budget)."""
    return estimate_uncertainty(
        model,
        data.images,
        data.masks,
        indices,
        mc_samples=cfg.mc_samples,
        batch_size=cfg.batch_size,
        seed=seed,
        amp=cfg.amp,
        channels_last=cfg.channels_last,
        memory_budget_bytes=int(cfg.mc_memory_gb * 2**30),
        keep_maps=keep_maps,
    )


def per_image_test_metrics(cfg: TrainConfig, model: nn.Module, data: SegmentationData, test_idx: np.ndarray,
                           hw: Hardware, seed: int) -> pd.DataFrame:
    """Per-image test metrics, and each test image's MC-Dropout difficulty (dropout seeded with
    ``seed``) for stratification.

    Returns:
        One row per test image: ``index, name, group``, the metrics of
        :func:`~polydice.metrics.all_metrics`, ``difficulty`` and ``lesion_fraction``.
    """
    metrics = per_image_metrics(model, data, test_idx, hw, cfg.batch_size,
                                lambda probs, masks: all_metrics(probs, masks, cfg.nsd_tolerance))
    masks = torch.from_numpy(data.masks[test_idx])
    est = run_uncertainty(cfg, model, data, test_idx, seed)
    frame = pd.DataFrame({"index": test_idx, "name": [data.names[i] for i in test_idx], "group": data.groups[test_idx]})
    for key, value in metrics.items():
        frame[key] = value.numpy()
    frame["difficulty"] = est.difficulty.numpy()
    frame["lesion_fraction"] = masks.flatten(1).float().mean(1).numpy()
    return frame


def summarise_test(per_image: pd.DataFrame) -> dict[str, float]:
    """The means of :data:`TEST_METRICS` as ``test_<key>``, and the Dice of the hardest quartile by
    MC-Dropout difficulty as ``test_dice_hardest_quartile``."""
    summary = {f"test_{key}": float(per_image[key].mean()) for key in TEST_METRICS}
    summary["test_dice_hardest_quartile"] = hardest_quartile_mean(
        per_image["dice"].to_numpy(), per_image["difficulty"].to_numpy()
    )
    return summary


__all__ = ["THRESHOLDS", "TEST_METRICS", "per_image_metrics", "validation_dice", "validation_threshold",
           "run_uncertainty", "per_image_test_metrics", "summarise_test"]
