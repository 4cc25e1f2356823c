"""Per-image evaluation metrics (thesis Eq. 15–21), boundary and calibration metrics.

- Overlap: Dice, IoU, Precision, Recall of the prediction binarised at 0.5 (thesis Eq. 15–21).
- Boundary: normalised surface Dice (NSD) at a tolerance in pixels (Nikolov et al.).
- Calibration: NLL and Brier score of the foreground probability (DSC++ paper, Sec. III-C).

Empty-set conventions (documented because they change means over datasets with empty masks):
when prediction and target are both empty every overlap metric and NSD is 1; a ratio whose
denominator is empty otherwise (precision with no predicted pixel, recall with no target pixel)
is 0, since the prediction missed or hallucinated the whole lesion.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor


def _as_masks(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.dim() == 4 and pred.shape[1] == 1:
        pred = pred[:, 0]
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both be (B, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return pred > 0.5, target > 0.5


def segmentation_metrics(pred_mask: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Dice, IoU, Precision and Recall per image (thesis Eq. 18–21).

    Args:
        pred_mask: ``(B, H, W)`` or ``(B, 1, H, W)`` mask or probabilities, binarised at > 0.5.
        target: same shape, binarised at > 0.5.

    Returns:
        ``{"dice", "iou", "precision", "recall"}``, each ``(B,)`` float64.

    Raises:
        ValueError: on mismatched shapes.
    """
    p, y = _as_masks(pred_mask, target)
    p, y = p.flatten(1).double(), y.flatten(1).double()
    tp = (p * y).sum(1)
    fp = (p * (1 - y)).sum(1)
    fn = ((1 - p) * y).sum(1)
    both_empty = (tp + fp + fn) == 0

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        value = num / den.clamp_min(1.0)
        return torch.where(both_empty, torch.ones_like(value), torch.where(den > 0, value, torch.zeros_like(value)))

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask with a 4-neighbour outside it (image border counts as outside)."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    return mask & ~eroded


def normalized_surface_dice(pred_mask: Tensor, target: Tensor, tolerance: float = 2.0) -> Tensor:
    """Normalised surface Dice per image at ``tolerance`` pixels.

    The fraction of both boundaries lying within ``tolerance`` (Euclidean, pixels) of the other:
    ``(|∂P ∩ B_τ(∂Y)| + |∂Y ∩ B_τ(∂P)|) / (|∂P| + |∂Y|)``. 1 when both masks are empty, 0 when
    exactly one is.

    Returns:
        ``(B,)`` float64.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    p, y = _as_masks(pred_mask, target)
    p, y = p.cpu().numpy(), y.cpu().numpy()
    out = np.empty(len(p))
    for i, (pi, yi) in enumerate(zip(p, y)):
        bp, by = _boundary(pi), _boundary(yi)
        n_p, n_y = bp.sum(), by.sum()
        if n_p == 0 and n_y == 0:
            out[i] = 1.0
            continue
        if n_p == 0 or n_y == 0:
            out[i] = 0.0
            continue
        # Distance of every pixel to the nearest boundary pixel of the other mask.
        dist_to_y = ndimage.distance_transform_edt(~by)
        dist_to_p = ndimage.distance_transform_edt(~bp)
        out[i] = ((dist_to_y[bp] <= tolerance).sum() + (dist_to_p[by] <= tolerance).sum()) / (n_p + n_y)
    return torch.from_numpy(out)


def nll(probs: Tensor, target: Tensor, clamp: float = 1e-7) -> Tensor:
    """Mean binary negative log-likelihood per image, in nats. Returns ``(B,)`` float64."""
    p, y = probs.double(), target.double()
    if p.dim() == 4 and p.shape[1] == 1:
        p, y = p[:, 0], (y[:, 0] if y.dim() == 4 else y)
    if p.shape != y.shape:
        raise ValueError(f"probs {tuple(p.shape)} and target {tuple(y.shape)} must have the same shape")
    p = p.clamp(clamp, 1.0 - clamp)
    return -(y * p.log() + (1 - y) * (1 - p).log()).flatten(1).mean(1)


def brier(probs: Tensor, target: Tensor) -> Tensor:
    """Brier score per image, mean ``(p − y)²`` (equal to the two-class mean of the DSC++ paper)."""
    p, y = probs.double(), target.double()
    if p.dim() == 4 and p.shape[1] == 1:
        p, y = p[:, 0], (y[:, 0] if y.dim() == 4 else y)
    if p.shape != y.shape:
        raise ValueError(f"probs {tuple(p.shape)} and target {tuple(y.shape)} must have the same shape")
    return ((p - y) ** 2).flatten(1).mean(1)


def all_metrics(probs: Tensor, target: Tensor, nsd_tolerance: float = 2.0) -> dict[str, Tensor]:
    """Every per-image metric of the test table from foreground probabilities ``(B, H, W)``."""
    out = segmentation_metrics(probs, target)
    out["nsd"] = normalized_surface_dice(probs, target, nsd_tolerance)
    out["nll"] = nll(probs, target)
    out["brier"] = brier(probs, target)
    return out


def hardest_quartile_mean(values: np.ndarray, difficulty: np.ndarray, fraction: float = 0.25) -> float:
    """Mean of ``values`` over the ``fraction`` of images with the highest difficulty (at least one)."""
    values, difficulty = np.asarray(values, dtype=float), np.asarray(difficulty, dtype=float)
    if values.shape != difficulty.shape or values.ndim != 1 or len(values) == 0:
        raise ValueError(f"need two equal non-empty 1-D arrays, got {values.shape} and {difficulty.shape}")
    n = max(1, int(round(fraction * len(values))))
    hardest = np.argsort(-difficulty, kind="stable")[:n]
    return float(values[hardest].mean())
