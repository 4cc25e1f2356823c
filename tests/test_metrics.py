"""Tests of polydice.metrics: overlap metrics (thesis Eq. 15–21), NSD, NLL, Brier, hardest quartile.

References: TP/FP/FN counted by hand, MONAI's compute_dice and compute_surface_dice, numpy.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_surface_dice
from scipy import ndimage

from polydice.metrics import (
    all_metrics,
    brier,
    hardest_quartile_mean,
    nll,
    normalized_surface_dice,
    segmentation_metrics,
)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

def grid(rows: list[str]) -> torch.Tensor:
    """A mask from strings of '#' (1) and '.' (0)."""
    return torch.tensor([[1.0 if c == "#" else 0.0 for c in r] for r in rows])


# (name, prediction, target, TP, FP, FN) with the counts done by hand
OVERLAP_CASES = [
    ("partial", grid(["##.", "#..", "..."]), grid(["#..", "##.", "..."]), 2, 1, 1),
    ("under", grid(["##.", "...", "..."]), grid(["##.", "##.", "#.."]), 2, 0, 3),
    ("over", grid(["###", "###", "..."]), grid(["#..", "...", "..."]), 1, 5, 0),
    ("perfect", grid([".#.", "###", ".#."]), grid([".#.", "###", ".#."]), 5, 0, 0),
    ("disjoint", grid(["#..", "...", "..."]), grid(["...", "...", "..#"]), 0, 1, 1),
    ("missed", grid(["...", "...", "..."]), grid(["...", ".#.", "..."]), 0, 0, 1),
    ("hallucinated", grid(["...", ".#.", "..."]), grid(["...", "...", "..."]), 0, 1, 0),
]


def expected_overlap(tp, fp, fn):
    """Eq. 18–21, with the documented conventions for empty denominators."""
    if tp + fp + fn == 0:
        return {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}

    def ratio(a, b):
        return a / b if b else 0.0

    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


@pytest.mark.parametrize("name,pred,target,tp,fp,fn", OVERLAP_CASES, ids=[c[0] for c in OVERLAP_CASES])
def test_overlap_hand_cases(name, pred, target, tp, fp, fn):
    # sanity of the hand counts
    assert (pred * target).sum() == tp and (pred * (1 - target)).sum() == fp and ((1 - pred) * target).sum() == fn
    got = segmentation_metrics(pred[None], target[None])
    for key, value in expected_overlap(tp, fp, fn).items():
        assert got[key].shape == (1,) and got[key].dtype == torch.float64
        np.testing.assert_allclose(got[key].numpy(), [value], rtol=1e-12, err_msg=key)


def test_overlap_hand_values_spelled_out():
    got = segmentation_metrics(OVERLAP_CASES[0][1][None], OVERLAP_CASES[0][2][None])  # TP 2, FP 1, FN 1
    np.testing.assert_allclose(
        [got["dice"].item(), got["iou"].item(), got["precision"].item(), got["recall"].item()],
        [4 / 6, 2 / 4, 2 / 3, 2 / 3],
        rtol=1e-12,
    )


@pytest.mark.parametrize("four_d", [False, True])
def test_overlap_batch_with_both_empty(four_d):
    pred = torch.stack([c[1] for c in OVERLAP_CASES] + [torch.zeros(3, 3)])
    target = torch.stack([c[2] for c in OVERLAP_CASES] + [torch.zeros(3, 3)])
    if four_d:
        pred, target = pred[:, None], target[:, None]
    got = segmentation_metrics(pred, target)
    expected = [expected_overlap(*c[3:]) for c in OVERLAP_CASES] + [expected_overlap(0, 0, 0)]
    for key in ("dice", "iou", "precision", "recall"):
        np.testing.assert_allclose(got[key].numpy(), [e[key] for e in expected], rtol=1e-12, err_msg=key)
    assert got["dice"][-1] == 1.0 and got["iou"][-1] == 1.0


def test_probabilities_binarised_at_half():
    # 0.5 itself is background; 0.5000001 is foreground.
    probs = torch.tensor([[[0.5, 0.5000001, 0.49, 0.99]]])
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    got = segmentation_metrics(probs, target)  # pred = [0, 1, 0, 1]: TP 1, FP 1, FN 1
    np.testing.assert_allclose(got["dice"].numpy(), [2 / 4])
    np.testing.assert_allclose(got["precision"].numpy(), [1 / 2])
    assert segmentation_metrics(torch.full((1, 2, 2), 0.5), torch.zeros(1, 2, 2))["dice"].item() == 1.0


def test_segmentation_metrics_shape_mismatch():
    with pytest.raises(ValueError) as info:
        segmentation_metrics(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
    assert "(2, 4, 4)" in str(info.value) and "(2, 4, 5)" in str(info.value)


def random_masks(seed: int, batch: int = 6, size: int = 20):
    g = torch.Generator().manual_seed(seed)
    pred = (torch.rand(batch, size, size, generator=g) > 0.6).float()
    target = (torch.rand(batch, size, size, generator=g) > 0.7).float()
    target[0] = 0.0  # empty target, non-empty prediction
    pred[1] = 0.0  # empty prediction, non-empty target
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_matches_monai_compute_dice(seed):
    pred, target = random_masks(seed)
    pred[2] = 0.0
    target[2] = 0.0  # both empty: MONAI with ignore_empty=False also gives 1
    monai = compute_dice(pred[:, None], target[:, None], include_background=True, ignore_empty=False)
    ours = segmentation_metrics(pred, target)["dice"]
    np.testing.assert_allclose(ours.numpy(), monai[:, 0].double().numpy(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Normalised surface Dice
# ---------------------------------------------------------------------------------------------


def square(size: int, top: int, left: int, side: int) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[top : top + side, left : left + side] = 1.0
    return m


# Y: 4×4 square at rows/cols 2..5; P: the same square 3 columns to the right (cols 5..8).
# Each boundary has 12 pixels. P's left column (col 5) lies on Y's right column: 4 pixels at
# distance 0 each way. P's top/bottom pixels at col 6 are 1 from Y's corners (2 more), at col 7
# they are 2 away (2 more), and P's right column (col 8) is 3 away. Symmetric for Y -> P.
SHIFTED_SQUARES = [(0.0, 8 / 24), (1.0, 12 / 24), (1.5, 12 / 24), (2.0, 16 / 24), (3.0, 1.0)]


@pytest.mark.parametrize("tol,expected", SHIFTED_SQUARES)
def test_nsd_hand_shifted_square(tol, expected):
    y = square(10, 2, 2, 4)
    p = square(10, 2, 5, 4)
    got = normalized_surface_dice(p[None], y[None], tolerance=tol)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), [expected], rtol=1e-12)
    monai = compute_surface_dice(_onehot(p[None]), _onehot(y[None]), class_thresholds=[tol])
    np.testing.assert_allclose(monai[:, 0].numpy(), [expected], rtol=1e-6)


def test_nsd_perfect_is_one_and_shift_beyond_tolerance_is_below_one():
    y = square(16, 4, 4, 6)
    assert normalized_surface_dice(y[None], y[None], 0.0).item() == 1.0
    assert normalized_surface_dice(y[None], y[None], 2.0).item() == 1.0
    shifted = torch.roll(y, shifts=(3, 0), dims=(0, 1))
    assert normalized_surface_dice(shifted[None], y[None], 2.0).item() < 1.0
    # a shift within the tolerance keeps every boundary pixel within reach
    assert normalized_surface_dice(torch.roll(y, 1, 0)[None], y[None], 2.0).item() == 1.0


def test_nsd_empty_conventions():
    y = square(8, 2, 2, 3)
    empty = torch.zeros(8, 8)
    got = normalized_surface_dice(torch.stack([empty, empty, y]), torch.stack([empty, y, empty]), 2.0)
    np.testing.assert_allclose(got.numpy(), [1.0, 0.0, 0.0])


def blobs(seed: int, batch: int, size: int = 24) -> torch.Tensor:
    """Smoothed-noise blobs, some touching the image border, some with holes."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(batch, size, size)), sigma=(0, 2.5, 2.5))
    thresholds = np.quantile(noise.reshape(batch, -1), rng.uniform(0.5, 0.9, size=batch), axis=1).diagonal()
    return torch.from_numpy(noise > thresholds[:, None, None]).float()


def _onehot(m: torch.Tensor) -> torch.Tensor:
    return torch.stack([1 - m, m], dim=1)  # B, 2, H, W


@pytest.mark.parametrize("tol", [0.0, 1.0, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_nsd_matches_monai_on_random_blobs(seed, tol):
    """MONAI's boundary is also seg XOR binary_erosion(seg) with scipy's default 4-connected
    structure, computed on the union bounding box padded by one zero pixel, so that pixels on the
    image border count as boundary as in polydice; distances are exact Euclidean in both. The
    definitions agree wherever a mask is non-empty, so the values must agree exactly."""
    pred, target = blobs(seed, 6), blobs(seed + 100, 6)
    pred[5] = torch.roll(target[5], shifts=(2, 1), dims=(0, 1))  # a near miss
    ours = normalized_surface_dice(pred, target, tol)
    monai = compute_surface_dice(_onehot(pred), _onehot(target), class_thresholds=[tol], include_background=False)
    np.testing.assert_allclose(ours.numpy(), monai[:, 0].double().numpy(), rtol=1e-6)


def test_nsd_monai_differs_only_in_both_empty_convention():
    """MONAI returns NaN when neither mask has a boundary; polydice documents 1 for that case.
    With exactly one mask empty both give 0."""
    y = square(10, 2, 2, 4)
    empty = torch.zeros(10, 10)
    pred, target = torch.stack([empty, y, empty]), torch.stack([empty, empty, y])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai = compute_surface_dice(_onehot(pred), _onehot(target), class_thresholds=[2.0])[:, 0]
    ours = normalized_surface_dice(pred, target, 2.0)
    assert math.isnan(monai[0].item()) and ours[0].item() == 1.0
    np.testing.assert_allclose(ours[1:].numpy(), monai[1:].double().numpy())


def test_nsd_binarises_probabilities_and_rejects_negative_tolerance():
    y = square(10, 2, 2, 4)
    probs = y * 0.8 + 0.1
    assert normalized_surface_dice(probs[None], y[None], 0.0).item() == 1.0
    with pytest.raises(ValueError):
        normalized_surface_dice(y[None], y[None], -1.0)


# ---------------------------------------------------------------------------------------------
# Calibration: NLL and Brier
# ---------------------------------------------------------------------------------------------


def _probs_and_target(seed: int):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 1, size=(3, 5, 5))
    p[0, 0, 0], p[0, 0, 1], p[1, 0, 0] = 0.0, 1.0, 1.0  # exercise the clamp
    y = (rng.uniform(size=(3, 5, 5)) > 0.5).astype(np.float64)
    y[0, 0, 0], y[0, 0, 1], y[1, 0, 0] = 1.0, 0.0, 1.0
    return p, y


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("four_d", [False, True])
def test_nll_matches_numpy(seed, four_d):
    p, y = _probs_and_target(seed)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    expected = -(y * np.log(pc) + (1 - y) * np.log(1 - pc)).reshape(3, -1).mean(1)
    pt, yt = torch.from_numpy(p).float(), torch.from_numpy(y)
    if four_d:
        pt, yt = pt[:, None], yt[:, None]
    got = nll(pt, yt)
    assert got.shape == (3,) and got.dtype == torch.float64
    # float32 input: p is rounded to float32 before the log
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_nll_hand_value():
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    np.testing.assert_allclose(nll(torch.full((1, 2, 2), 0.5), target).numpy(), [math.log(2)])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("four_d", [False, True])
def test_brier_matches_numpy(seed, four_d):
    p, y = _probs_and_target(seed)
    expected = ((p - y) ** 2).reshape(3, -1).mean(1)
    pt, yt = torch.from_numpy(p), torch.from_numpy(y)
    if four_d:
        pt, yt = pt[:, None], yt[:, None]
    np.testing.assert_allclose(brier(pt, yt).numpy(), expected, rtol=1e-12)


def test_brier_equals_two_class_mean():
    """DSC++ paper: Brier over both classes, averaged over classes, equals mean (p − y)²."""
    p, y = _probs_and_target(2)
    two_class = (((p - y) ** 2 + ((1 - p) - (1 - y)) ** 2) / 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(brier(torch.from_numpy(p), torch.from_numpy(y)).numpy(), two_class, rtol=1e-12)


@pytest.mark.parametrize("fn", [nll, brier])
def test_calibration_shape_mismatch(fn):
    with pytest.raises(ValueError):
        fn(torch.rand(2, 4, 4), torch.rand(2, 4, 5))


def test_all_metrics_keys_and_consistency():
    pred, target = random_masks(4, batch=3)
    probs = pred * 0.8 + 0.1
    got = all_metrics(probs, target)
    assert set(got) == {"dice", "iou", "precision", "recall", "nsd", "nll", "brier"}
    for v in got.values():
        assert v.shape == (3,)
    torch.testing.assert_close(got["dice"], segmentation_metrics(pred, target)["dice"])
    torch.testing.assert_close(got["nsd"], normalized_surface_dice(pred, target, 2.0))


# ---------------------------------------------------------------------------------------------
# Hardest-quartile mean
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,difficulty,fraction,expected",
    [
        # 8 images, a quarter = 2: the hardest are difficulty 8 (value 0.8) and 7 (value 0.6)
        ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], [1, 8, 3, 7, 2, 6, 4, 5], 0.25, 0.7),
        # half of 4 = 2: difficulty 0.9 (value 0.1) and 0.5 (value 0.3)
        ([0.1, 0.2, 0.3, 0.4], [0.9, 0.1, 0.5, 0.2], 0.5, 0.2),
        # fewer than 4 images: at least one
        ([0.4, 0.6], [0.2, 0.3], 0.25, 0.6),
        # all images
        ([0.4, 0.6, 0.8], [3, 2, 1], 1.0, 0.6),
    ],
)
def test_hardest_quartile_mean_hand_cases(values, difficulty, fraction, expected):
    assert hardest_quartile_mean(np.array(values), np.array(difficulty), fraction) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("values,difficulty", [([0.1, 0.2], [1.0]), ([], []), ([[0.1]], [[0.2]])])
def test_hardest_quartile_mean_invalid(values, difficulty):
    with pytest.raises(ValueError):
        hardest_quartile_mean(np.array(values), np.array(difficulty))
