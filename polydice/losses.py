"""Per-image segmentation losses: PolyDice-K, Dice (squared and linear), Focal, CE + Dice, PM Dice, DSC++.

Every loss reduces over the pixels of each image and returns one value per image, shape ``(B,)``:
the adaptive method gives every image its own PolyDice shape parameter ε, so the batch must never
be pooled the way segmentation_models_pytorch's Dice pools it (``dims=(0, 2)``).

Shapes: ``probs`` and ``target`` are ``(B, H, W)`` or ``(B, 1, H, W)``; ``probs`` is the foreground
probability (softmax channel 1 of the two-class U-Net), ``target`` a mask in {0, 1}. The losses that
need the logits for numerical stability (Focal, CE + Dice) take ``logits`` of shape ``(B, 2, H, W)``.

The ``nn.Module`` wrappers all share one signature, ``forward(logits, target, eps=None) -> (B,)``,
so that the training loop can treat every method alike; ``build_loss(name)`` picks one by name.
:class:`PolyDiceLoss` is also the library's general loss for other training loops: sigmoid or
softmax logits with any number of classes, ``include_background`` and ``reduction`` as in MONAI's
losses; the registry binds it to the training loop's per-image foreground form.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import SCALES

SMOOTH = 1e-6

# arccos(1 - x)^2 = 2x + x^2/3 + 4x^3/45 + O(x^4): used below this x, where the exact form's
# gradient (through arccos'(c) = -1/sqrt(1 - c^2)) is infinite at c = 1 or loses precision.
_SERIES_BELOW = 1e-4


def _flatten_pair(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes and flatten to ``(B, H*W)``; accepts (B, H, W) or (B, 1, H, W)."""
    if probs.dim() == 4 and probs.shape[1] == 1:
        probs = probs[:, 0]
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if probs.dim() != 3:
        raise ValueError(f"probs must be (B, H, W) or (B, 1, H, W), got shape {tuple(probs.shape)}")
    if target.shape != probs.shape:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match probs shape {tuple(probs.shape)}"
        )
    target = target.to(probs.dtype)
    return probs.reshape(probs.shape[0], -1), target.reshape(target.shape[0], -1)  # B, H*W


def _per_image_eps(eps: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """ε as a ``(B,)`` tensor on ``like``'s device and dtype."""
    if isinstance(eps, Tensor):
        if eps.dim() == 0:
            return eps.to(like).expand(batch)
        if eps.shape != (batch,):
            raise ValueError(f"eps must be a float or a ({batch},) tensor, got shape {tuple(eps.shape)}")
        return eps.to(like)
    return torch.full((batch,), float(eps), dtype=like.dtype, device=like.device)


def arccos_squared(cos: Tensor) -> Tensor:
    """θ² = arccos(cos)² with a finite gradient everywhere in [0, 1].

    θ² is smooth at cos = 1 (θ² ≈ 2(1 − cos)) although arccos is not, so near 1 its Taylor series
    is used. The double ``where`` keeps the unused branch's infinite gradient out of the graph.
    """
    cos = cos.clamp(-1.0, 1.0)
    x = 1.0 - cos
    near = x < _SERIES_BELOW
    exact = torch.arccos(torch.where(near, torch.zeros_like(cos), cos)) ** 2
    series = 2.0 * x + x * x / 3.0 + 4.0 * x**3 / 45.0
    return torch.where(near, series, exact)


def scale_and_angle(
    probs: Tensor, target: Tensor, smooth: float = SMOOTH, scale: str = "norm"
) -> tuple[Tensor, Tensor]:
    """The decomposition Dice = s·cos θ of thesis Eq. 2, per image.

    ``scale="norm"`` (default) is ``s = 2|p||y| / (|p|² + |y|²)``, the scale for which Eq. 2 holds:
    then ε = 0 is the Dice loss up to O(θ⁴) and PolyDice-K tends to the Dice loss as K grows.
    ``scale="inner"`` is the thesis's printed ``s = 2<p,y> / (|p|² + |y|²)``, which is the Dice
    coefficient itself (so Dice ≠ s·cos θ); kept only to compare the two readings.

    Args:
        probs: foreground probabilities ``(B, H, W)`` or ``(B, 1, H, W)``.
        target: ground-truth mask, same shape.
        smooth: added to numerator and denominator of s and cos θ so that empty masks stay finite:
            an empty mask with an empty prediction gives s = 1, θ = 0 (a perfect score).
        scale: ``"norm"`` or ``"inner"``.

    Returns:
        ``(s, θ²)``, each ``(B,)``.

    Raises:
        ValueError: on mismatched shapes or an unknown ``scale``.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    p, y = _flatten_pair(probs, target)
    inner = (p * y).sum(1)  # <p, y>
    pp = (p * p).sum(1)  # |p|²
    yy = (y * y).sum(1)  # |y|²
    # sqrt(|p|²|y|² + smooth²) instead of |p||y| keeps d/dp finite for an all-zero prediction.
    norms = torch.sqrt(pp * yy + smooth * smooth)  # ≈ |p||y|
    if scale == "norm":
        # Subtracting smooth makes |p||y| exactly 0 when either is empty, so s <= 1 always
        # (2|p||y| <= |p|² + |y|²) and an empty mask with an empty prediction gives s = 1.
        s = (2.0 * (norms - smooth) + smooth) / (pp + yy + smooth)
    else:
        s = (2.0 * inner + smooth) / (pp + yy + smooth)
    cos = (inner + smooth) / norms
    return s, arccos_squared(cos)


def polydice_loss(
    probs: Tensor,
    target: Tensor,
    eps: float | Tensor = 0.0,
    order: int = 1,
    smooth: float = SMOOTH,
    scale: str = "norm",
) -> Tensor:
    """PolyDice-K loss per image (thesis Eq. 5–6; Aizawa, Polynomial Dice Loss).

    ``L = (1 − s) + s · Σ_{k=1..K} α_k θ^{2k}`` with ``α_k = (−1)^{k−1} / (2k)!`` and ε added to the
    leading coefficient, ``α_1 = 1/2 + ε``. Order 1 is PolyDice-1, ``(1 − s) + s(½ + ε)θ²``.

    Args:
        probs: foreground probabilities ``(B, H, W)`` or ``(B, 1, H, W)``.
        target: mask in {0, 1}, same shape.
        eps: shape parameter, a float or a per-image ``(B,)`` tensor (the adaptive method).
        order: truncation order K ≥ 1.
        smooth: smoothing constant, see :func:`scale_and_angle`.
        scale: ``"norm"`` (default, the s of Eq. 2) or ``"inner"`` (the thesis's printed s, which
            is the Dice coefficient); see :func:`scale_and_angle`.

    Returns:
        ``(B,)`` per-image losses.

    Raises:
        ValueError: on mismatched shapes, an ε of the wrong shape, ``order < 1`` or an unknown scale.
    """
    if int(order) != order or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    s, theta2 = scale_and_angle(probs, target, smooth, scale)
    eps_t = _per_image_eps(eps, s.shape[0], s)
    poly = (0.5 + eps_t) * theta2
    for k in range(2, int(order) + 1):
        poly = poly + ((-1) ** (k - 1) / math.factorial(2 * k)) * theta2**k
    return (1.0 - s) + s * poly


def dice_loss(probs: Tensor, target: Tensor, smooth: float = SMOOTH) -> Tensor:
    """Dice loss per image with squared denominator (thesis Eq. 1; Milletari et al., V-Net).

    ``L = 1 − (2<p, y> + smooth) / (|p|² + |y|² + smooth)``.

    Args:
        probs: ``(B, H, W)`` or ``(B, 1, H, W)``.
        target: same shape.

    Returns:
        ``(B,)``.
    """
    p, y = _flatten_pair(probs, target)
    return 1.0 - (2.0 * (p * y).sum(1) + smooth) / ((p * p).sum(1) + (y * y).sum(1) + smooth)


def dice_linear_loss(probs: Tensor, target: Tensor, smooth: float = SMOOTH) -> Tensor:
    """Soft Dice loss per image with a linear denominator (the DSC++ paper's contrast, its γ = 1).

    ``L = 1 − (2Σ p·y + smooth) / (Σ p + Σ y + smooth)``: the smoothing of :func:`dice_loss`, so an
    empty mask predicted empty scores 0, an empty mask with a non-empty prediction (or an all-zero
    prediction of a non-empty mask) scores ≈ 1, and the denominator never falls below ``smooth``.
    On binary masks it differs from Eq. 1 only in the prediction's term, Σ p instead of Σ p².

    Args:
        probs: ``(B, H, W)`` or ``(B, 1, H, W)``.
        target: same shape.
        smooth: added to numerator and denominator.

    Returns:
        ``(B,)``.
    """
    p, y = _flatten_pair(probs, target)
    return 1.0 - (2.0 * (p * y).sum(1) + smooth) / (p.sum(1) + y.sum(1) + smooth)


def pm_dice_loss(
    probs: Tensor, target: Tensor, gamma: float = 1.0, smooth: float = SMOOTH, include_background: bool = True
) -> Tensor:
    """Pixel-wise modulated Dice loss per image (PM Dice paper, Eq. 5).

    Per class c: ``L_c = 1 − (2Σ m·p·y + smooth) / (Σ m·(p² + y²) + smooth)`` with
    ``m = |y − p̂|^γ`` and p̂ = p detached: the modulating term is a per-pixel weight, no gradient
    flows through it. γ = 0 is Dice. As in the paper's Eq. 5 the loss averages the background
    (1 − p, 1 − y) and foreground terms; ``include_background=False`` keeps the foreground term
    alone (comparable with the foreground Dice of Eq. 1).

    Returns:
        ``(B,)``.
    """
    p, y = _flatten_pair(probs, target)

    def term(p: Tensor, y: Tensor) -> Tensor:
        m = (y - p.detach()).abs() ** gamma
        return 1.0 - (2.0 * (m * p * y).sum(1) + smooth) / ((m * (p * p + y * y)).sum(1) + smooth)

    foreground = term(p, y)
    if not include_background:
        return foreground
    return 0.5 * (foreground + term(1.0 - p, 1.0 - y))


def dsc_pp_loss(probs: Tensor, target: Tensor, gamma: float = 2.0, smooth: float = SMOOTH) -> Tensor:
    """DSC++ loss per image (DSC++ paper, Eq. 9).

    ``L = 1 − (2TP + smooth) / (2TP + Σ(p(1 − y))^γ + Σ((1 − p)y)^γ + smooth)`` with the soft
    ``TP = Σ p·y``.

    γ = 2 is algebraically the Dice loss of Eq. 1 (:func:`dice_loss`, same smoothing) on binary
    masks: for y ∈ {0, 1}, ``2TP + Σ(p(1 − y))² + Σ((1 − p)y)² = Σ p² + Σ y²``, so it is available
    but is not a separate baseline. On soft targets the two differ. γ = 1 is the soft Dice with a
    linear denominator, ``2TP + Σ p(1 − y) + Σ (1 − p)y = Σ p + Σ y`` for any target
    (:func:`dice_linear_loss`), the DSC++ paper's contrast.

    Args:
        probs: ``(B, H, W)`` or ``(B, 1, H, W)``.
        target: same shape.
        gamma: exponent γ of the false-positive and false-negative terms.
        smooth: added to numerator and denominator.

    Returns:
        ``(B,)``.
    """
    p, y = _flatten_pair(probs, target)
    tp = (p * y).sum(1)
    fp = ((p * (1.0 - y)) ** gamma).sum(1)
    fn = (((1.0 - p) * y) ** gamma).sum(1)
    return 1.0 - (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth)


def _check_logits(logits: Tensor, target: Tensor) -> Tensor:
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ValueError(f"logits must be (B, 2, H, W), got shape {tuple(logits.shape)}")
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}"
        )
    return target.long()


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss per image (Lin et al.), mean over pixels of ``−(1 − p_t)^γ log p_t``.

    Computed from log-softmax for numerical stability; γ = 0 is the pixel-mean cross-entropy.

    Args:
        logits: ``(B, 2, H, W)``.
        target: ``(B, H, W)`` or ``(B, 1, H, W)`` mask in {0, 1}.

    Returns:
        ``(B,)``.
    """
    target = _check_logits(logits, target)
    log_pt = F.log_softmax(logits.float(), dim=1).gather(1, target.unsqueeze(1))[:, 0]  # B, H, W
    weight = (1.0 - log_pt.exp()) ** gamma
    return -(weight * log_pt).flatten(1).mean(1)


def ce_dice_loss(logits: Tensor, target: Tensor, smooth: float = SMOOTH) -> Tensor:
    """Cross-entropy (pixel mean) plus the Dice loss of Eq. 1, per image. Shapes as :func:`focal_loss`."""
    target = _check_logits(logits, target)
    ce = F.cross_entropy(logits.float(), target, reduction="none").flatten(1).mean(1)
    probs = torch.softmax(logits.float(), dim=1)[:, 1]
    return ce + dice_loss(probs, target, smooth)


class SegmentationLoss(nn.Module):
    """Common interface: ``forward(logits (B, 2, H, W), target (B, H, W), eps=None) -> (B,)``."""

    def forward(self, logits: Tensor, target: Tensor, eps: float | Tensor | None = None) -> Tensor:
        raise NotImplementedError


def foreground_probs(logits: Tensor) -> Tensor:
    """Foreground probability, softmax over the two logits, channel 1: ``(B, 2, H, W) -> (B, H, W)``.

    Computed in float32 so that the losses stay accurate under bf16/fp16 autocast.
    """
    return torch.softmax(logits.float(), dim=1)[:, 1]


REDUCTIONS = ("mean", "sum", "none")


def _float_logits(logits: Tensor) -> Tensor:
    """float32 for half-precision logits (losses stay accurate under autocast); float64 is kept."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _class_probs_and_targets(logits: Tensor, target: Tensor, include_background: bool) -> tuple[Tensor, Tensor]:
    """Per-class probabilities and binary targets ``(B, C', H, W)`` of :class:`PolyDiceLoss`.

    C ≥ 2: softmax over the channels, class-index targets compared with each class (no host
    synchronisation: an out-of-range index matches no class), channel 0 dropped unless
    ``include_background``. C = 1: sigmoid, the target taken as the (possibly soft) foreground.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    b, c, h, w = logits.shape
    if target.dim() == 3:
        target = target[:, None]
    if target.dim() != 4 or target.shape[0] != b or target.shape[2:] != logits.shape[2:] or target.shape[1] not in (1, c):
        raise ValueError(
            f"target must be (B, H, W), (B, 1, H, W) or (B, C, H, W) for logits {tuple(logits.shape)}, "
            f"got shape {tuple(target.shape)}"
        )
    logits = _float_logits(logits)
    if c == 1:
        return torch.sigmoid(logits), target.to(logits.dtype)
    probs = torch.softmax(logits, dim=1)  # B, C, H, W
    if target.shape[1] == 1:
        classes = torch.arange(c, device=target.device).view(1, c, 1, 1)
        target = target.long() == classes  # B, C, H, W one-hot
    target = target.to(probs.dtype)
    if not include_background:
        probs, target = probs[:, 1:], target[:, 1:]
    return probs, target


class PolyDiceLoss(SegmentationLoss):
    """PolyDice-K over logits, per class and per image (thesis Eq. 5–6; Aizawa, Polynomial Dice Loss).

    For every image and class c: :func:`polydice_loss` of the class probability against the
    class's binary target, ``L = (1 − s) + s · Σ_k α_k θ^{2k}`` with ``α_1 = ½ + ε``. With C ≥ 2
    channels the probabilities are the softmax over C; with one channel, the sigmoid (the channel
    is then the foreground and always counted). As in MONAI's ``DiceLoss``, ``include_background``
    decides whether channel 0 is one of the classes, and the per-class terms are averaged.

    Shape:
        - logits: ``(B, C, H, W)``.
        - target: ``(B, H, W)`` or ``(B, 1, H, W)`` class indices (a binary mask for C = 1 or 2),
          or ``(B, C, H, W)`` one-hot.
        - eps: a float or ``(B,)``, the same ε for every class of an image.
        - output: ``reduction="mean"``: a scalar, the mean over images and classes (MONAI's mean);
          ``"sum"``: a scalar, the sum over images of each image's class mean; ``"none"``:
          ``(B,)``, each image's loss averaged over its classes (the adaptive method's
          per-image loss). MONAI's ``"sum"`` also sums over classes; this one does not, so that
          every reduction reduces the same ``(B,)`` vector.

    Args:
        order: truncation order K ≥ 1; with ε = 0 the loss tends to the Dice loss as K grows.
        scale: ``"norm"`` (the s of Eq. 2, default) or ``"inner"``; see :func:`scale_and_angle`.
        include_background: count channel 0 as a class (C ≥ 2 only).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        eps: the ε used when ``forward`` gets none (default 0).
        smooth: smoothing constant, see :func:`scale_and_angle`.

    Raises:
        ValueError: for ``order < 1``, an unknown ``scale`` or ``reduction``; in ``forward``, for
            logits that are not 4-D, a target of another shape, or an ε of the wrong shape.

    The training loop's ``build_loss("polydice")`` binds ``include_background=False`` and
    ``reduction="none"``: on the U-Net's two-class logits that is the per-image foreground loss.
    """

    def __init__(
        self,
        order: int = 1,
        scale: str = "norm",
        include_background: bool = True,
        reduction: str = "mean",
        *,
        eps: float = 0.0,
        smooth: float = SMOOTH,
    ):
        super().__init__()
        if int(order) != order or order < 1:
            raise ValueError(f"order must be an integer >= 1, got {order!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.order, self.scale, self.include_background, self.reduction = int(order), scale, include_background, reduction
        self.eps, self.smooth = eps, smooth

    def forward(self, logits: Tensor, target: Tensor, eps: float | Tensor | None = None) -> Tensor:
        probs, target = _class_probs_and_targets(logits, target, self.include_background)
        b, c, h, w = probs.shape
        eps_t = _per_image_eps(self.eps if eps is None else eps, b, probs)
        per_class = polydice_loss(
            probs.reshape(b * c, h, w),
            target.reshape(b * c, h, w),
            eps_t.repeat_interleave(c),
            self.order,
            self.smooth,
            self.scale,
        ).view(b, c)
        per_image = per_class.mean(1)  # B
        if self.reduction == "none":
            return per_image
        return per_image.mean() if self.reduction == "mean" else per_image.sum()

    def extra_repr(self) -> str:
        return (f"order={self.order}, scale={self.scale!r}, include_background={self.include_background}, "
                f"reduction={self.reduction!r}, eps={self.eps}")


class DiceLoss(SegmentationLoss):
    def __init__(self, smooth: float = SMOOTH):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits, target, eps=None):
        return dice_loss(foreground_probs(logits), target, self.smooth)


class FocalLoss(SegmentationLoss):
    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits, target, eps=None):
        return focal_loss(logits, target, self.gamma)


class CEDiceLoss(SegmentationLoss):
    def __init__(self, smooth: float = SMOOTH):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits, target, eps=None):
        return ce_dice_loss(logits, target, self.smooth)


class PMDiceLoss(SegmentationLoss):
    def __init__(self, gamma: float = 1.0, smooth: float = SMOOTH, include_background: bool = True):
        super().__init__()
        self.gamma, self.smooth, self.include_background = gamma, smooth, include_background

    def forward(self, logits, target, eps=None):
        return pm_dice_loss(foreground_probs(logits), target, self.gamma, self.smooth, self.include_background)


class DiceLinearLoss(SegmentationLoss):
    """:func:`dice_linear_loss` of the softmax foreground, ``(B, 2, H, W) -> (B,)``; DSC++ with γ = 1."""

    def __init__(self, smooth: float = SMOOTH):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits, target, eps=None):
        return dice_linear_loss(foreground_probs(logits), target, self.smooth)


class DSCPlusPlusLoss(SegmentationLoss):
    """:func:`dsc_pp_loss` of the softmax foreground, ``(B, 2, H, W) -> (B,)``.

    With the default γ = 2 it is :class:`DiceLoss` on binary masks (2TP + Σ(p(1 − y))² +
    Σ((1 − p)y)² = Σ p² + Σ y² for y ∈ {0, 1}); γ = 1 is :class:`DiceLinearLoss`.
    """

    def __init__(self, gamma: float = 2.0, smooth: float = SMOOTH):
        super().__init__()
        self.gamma, self.smooth = gamma, smooth

    def forward(self, logits, target, eps=None):
        return dsc_pp_loss(foreground_probs(logits), target, self.gamma, self.smooth)


LOSSES: dict[str, Callable[..., SegmentationLoss]] = {
    # The training loop's interface: per-image foreground losses on the two-class logits.
    "polydice": functools.partial(PolyDiceLoss, include_background=False, reduction="none"),
    "dice": DiceLoss,
    "focal": FocalLoss,
    "ce_dice": CEDiceLoss,
    "pm_dice": PMDiceLoss,
    "dsc_pp": DSCPlusPlusLoss,
    "dice_linear": DiceLinearLoss,
}


def build_loss(name: str, **kwargs) -> SegmentationLoss:
    """The loss registered under ``name``, with its settings bound.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**kwargs)
