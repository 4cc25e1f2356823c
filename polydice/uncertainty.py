"""MC-Dropout uncertainty, image difficulty and the difficulty → ε mapping (thesis Sec. 3.2–3.3).

Pixel maps from T stochastic foreground probabilities ``samples (T, B, H, W)``:

- predictive entropy ``H(p̄)`` with ``p̄ = mean_t p_t`` (total uncertainty),
- expected entropy ``mean_t H(p_t)`` (aleatoric part),
- mutual information ``I = H(p̄) − mean_t H(p_t)`` (epistemic part, Eq. 8–9),
- predictive variance ``var_t p_t`` (population variance).

``H(p) = −p log p − (1 − p) log(1 − p)`` in nats with ``0 · log 0 = 0``.

The estimator :func:`estimate_uncertainty` runs the deterministic encoder, and the decoder's
convolutions of the encoder's skip features, once per batch, and only the rest of the decoder T
times, the T samples stacked along the batch dimension and chunked to a memory budget;
:func:`estimate_uncertainty_naive` is Algorithm 1 read literally (T full forward passes), kept as
the reference the fast path is tested and benchmarked against. Both draw their dropout masks from
seeded generators, one per dropout site and one mask per (sample, batch), in the same order, so
that for the same seed they give the same maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .device import Hardware
from .model import DROPOUT_SITES, UNet, eval_mode


def binary_entropy(p: Tensor) -> Tensor:
    """Eq. 9 in nats, elementwise, with ``0 · log 0 = 0``."""
    return -(torch.xlogy(p, p) + torch.xlogy(1.0 - p, 1.0 - p))


def _check_samples(samples: Tensor) -> None:
    if samples.dim() != 4:
        raise ValueError(f"samples must be (T, B, H, W), got shape {tuple(samples.shape)}")


def predictive_entropy(samples: Tensor) -> Tensor:
    """``H(mean_t p_t)``: ``(T, B, H, W) -> (B, H, W)``."""
    _check_samples(samples)
    return binary_entropy(samples.mean(0))


def expected_entropy(samples: Tensor) -> Tensor:
    """``mean_t H(p_t)``: ``(T, B, H, W) -> (B, H, W)``."""
    _check_samples(samples)
    return binary_entropy(samples).mean(0)


def mutual_information(samples: Tensor) -> Tensor:
    """Pixel-wise mutual information, thesis Eq. 8: ``(T, B, H, W) -> (B, H, W)``.

    Non-negative by Jensen's inequality; float rounding below zero is clipped to 0.

    Raises:
        ValueError: if ``samples`` is not 4-D.
    """
    _check_samples(samples)
    return (binary_entropy(samples.mean(0)) - binary_entropy(samples).mean(0)).clamp_min(0.0)


def predictive_variance(samples: Tensor) -> Tensor:
    """Population variance over the T samples: ``(T, B, H, W) -> (B, H, W)``."""
    _check_samples(samples)
    return samples.var(0, unbiased=False)


def difficulty_scores(mi: Tensor, masks: Tensor) -> Tensor:
    """Image difficulty, thesis Eq. 10–11: outlier-trimmed mean of I over the lesion.

    Over the ground-truth positives P (mask > 0.5): μ and σ (population std, ddof = 0), keep the
    pixels with ``|I − μ| ≤ 2σ``, and average those. ``D = 0`` for an image without positives.

    Args:
        mi: mutual information ``(B, H, W)``.
        masks: ground truth ``(B, H, W)`` (or ``(B, 1, H, W)``).

    Returns:
        ``(B,)`` in ``mi``'s dtype.

    Raises:
        ValueError: when the shapes differ.
    """
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if mi.dim() != 3 or masks.shape != mi.shape:
        raise ValueError(
            f"mi must be (B, H, W) and masks the same shape, got {tuple(mi.shape)} and {tuple(masks.shape)}"
        )
    x = mi.double().flatten(1)  # B, H*W; float64 so that the 2σ test is not decided by rounding
    pos = (masks.flatten(1) > 0.5).double()
    n = pos.sum(1)
    n_safe = n.clamp_min(1.0)
    mu = (x * pos).sum(1) / n_safe
    sigma = (((x - mu[:, None]) ** 2) * pos).sum(1).div(n_safe).sqrt()
    keep = pos * ((x - mu[:, None]).abs() <= 2.0 * sigma[:, None]).double()
    kept = keep.sum(1)
    # Some pixel always lies within σ of the mean, so kept > 0 whenever n > 0; guard anyway.
    d = torch.where(kept > 0, (x * keep).sum(1) / kept.clamp_min(1.0), mu)
    return torch.where(n > 0, d, torch.zeros_like(d)).to(mi.dtype)


def epsilon_from_difficulty(
    scores: Tensor,
    q: float = 25,
    k: float = 2.0,
    eps_min: float = 0.0,
    eps_max: float = 0.5,
    delta: float = 1e-8,
) -> Tensor:
    """Per-image ε from difficulty, thesis Eq. 12–13.

    ``D_norm = (D − D_q) / (σ_D + δ)`` with ``D_q`` the q-th percentile (linear interpolation, as
    numpy's default) and ``σ_D`` the population std over all scores, then
    ``ε = ε_min + (ε_max − ε_min) · sigmoid(k · D_norm)``.

    Args:
        scores: ``(N,)`` difficulty of every training image.
        q: percentile in [0, 100].
        k: slope of the sigmoid.
        eps_min, eps_max: range of ε.
        delta: keeps the division finite when all scores are equal.

    Returns:
        ``(N,)`` ε in ``[eps_min, eps_max]``, in ``scores``' float dtype.

    Raises:
        ValueError: for an empty or non-1-D ``scores``, non-finite scores, or q outside [0, 100].
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty (N,) tensor, got shape {tuple(scores.shape)}")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be a percentile in [0, 100], got {q}")
    d = scores.double()
    if not torch.isfinite(d).all():
        raise ValueError("difficulty scores contain NaN or inf")
    d_q = torch.quantile(d, q / 100.0, interpolation="linear")
    sigma = d.std(unbiased=False)
    eps = eps_min + (eps_max - eps_min) * torch.sigmoid(k * (d - d_q) / (sigma + delta))
    out_dtype = scores.dtype if scores.is_floating_point() else torch.float64
    return eps.to(out_dtype)


class DropoutSampler:
    """Seeded inverted dropout for MC estimation: ``fn(x, site)`` for :meth:`UNet.decode`.

    ``x`` holds ``n_samples`` blocks of ``batch`` rows (sample-major). One mask of the batch's
    shape is drawn per sample and site from that site's own generator, so the stream of masks is
    the same however the samples are grouped into decoder calls.
    """

    def __init__(self, p: float, seed: int, device: torch.device | str):
        self.p = p
        self.generators = {}
        for i, site in enumerate(DROPOUT_SITES):
            g = torch.Generator(device=device)
            g.manual_seed(int(seed) * len(DROPOUT_SITES) + i)
            self.generators[site] = g
        self.batch = 0

    def __call__(self, x: Tensor, site: str) -> Tensor:
        if self.p == 0.0:
            return x
        g = self.generators[site]
        # u < 1 − p is a Bernoulli(1 − p) draw; on a CPU filling uniforms is about 3x faster than
        # bernoulli_ (and than F.dropout, which uses it), a quarter of a refresh at small widths.
        scale = torch.empty(x.shape, device=x.device)
        for s in range(0, x.shape[0], self.batch):
            torch.rand((self.batch, *x.shape[1:]), generator=g, device=x.device, out=scale[s : s + self.batch])
        scale.lt_(1.0 - self.p).mul_(1.0 / (1.0 - self.p))
        return x * scale.to(x.dtype)


@dataclass
class UncertaintyResult:
    """What one ε refresh needs: per-image difficulty and a few maps to look at.

    Attributes:
        difficulty: ``(N,)`` float64, Eq. 11, in the order of the requested indices.
        mean_mi: ``(N,)`` mean mutual information over the whole image.
        maps: for the first ``keep_maps`` images: ``image (K, 3, H, W)`` uint8, ``mask``,
            ``mean_prob``, ``mutual_information``, ``predictive_entropy``, ``variance`` ``(K, H, W)``.
    """

    difficulty: Tensor
    mean_mi: Tensor
    maps: dict[str, Tensor]


# On a CPU the decoder runs fastest in chunks of about 16 MiB (as _samples_per_chunk counts them):
# bigger ones only add memory traffic. Estimate ÷ naive, batch 16, 2 cores, Kvasir-SEG:
# 64 px, c = 8 (1 MiB a row): 0.51 with 1 sample per chunk (16 MiB), 0.66 with 2, 0.74 with 10;
# 32 px, c = 8: 0.60 with 1 sample, 0.43 with 4 (16 MiB), 0.59 with 10.
# The memory budget proper is a GPU concern.
CPU_CHUNK_BYTES = 16 << 20


def _samples_per_chunk(model: UNet, height: int, width: int, budget_bytes: int, elem_bytes: int) -> int:
    """How many (sample, image) decoder rows fit the memory budget.

    Under inference mode the decoder's peak is a few full-resolution maps of 2c channels (the
    concatenation in ``up4`` and its convolutions) plus the retained skip features; 8c·H·W
    elements per row is a safe bound.
    """
    c = model.inc[0].out_channels
    per_row = 8 * c * height * width * elem_bytes
    return max(1, budget_bytes // per_row)


class _MapAccumulator:
    """Streams Σp and ΣH(p) over samples without keeping (T, B, H, W); Σp² too when the variance
    map is wanted (only the maps returned for logging have one)."""

    def __init__(self, like: Tensor, variance: bool):
        self.sum_p = torch.zeros_like(like, dtype=torch.float32)
        self.sum_h = torch.zeros_like(self.sum_p)
        self.sum_p2 = torch.zeros_like(self.sum_p) if variance else None
        self.n = 0

    def add(self, probs: Tensor) -> None:  # probs (t, B, H, W)
        probs = probs.float()
        self.sum_p += probs.sum(0)
        self.sum_h += binary_entropy(probs).sum(0)
        if self.sum_p2 is not None:
            self.sum_p2 += (probs * probs).sum(0)
        self.n += probs.shape[0]

    def maps(self) -> dict[str, Tensor]:
        mean_p = self.sum_p / self.n
        entropy = binary_entropy(mean_p)
        maps = {
            "mean_prob": mean_p,
            "predictive_entropy": entropy,
            "mutual_information": (entropy - self.sum_h / self.n).clamp_min(0.0),
        }
        if self.sum_p2 is not None:
            maps["variance"] = (self.sum_p2 / self.n - mean_p * mean_p).clamp_min(0.0)
        return maps


def _rows(array: np.ndarray | Tensor, sel: np.ndarray) -> Tensor:
    """The rows ``sel`` of a dataset array as a tensor of their own.

    Indexing the numpy array first copies just the batch: the array itself may be a read-only
    view into Ray's object store, which torch must not wrap.
    """
    if isinstance(array, Tensor):
        return array[torch.from_numpy(sel)]
    return torch.from_numpy(np.ascontiguousarray(array[sel]))


def _estimate(
    model: UNet,
    images: np.ndarray | Tensor,
    masks: np.ndarray | Tensor,
    indices: np.ndarray | None,
    mc_samples: int,
    batch_size: int,
    seed: int,
    amp: bool,
    channels_last: bool,
    memory_budget_bytes: int,
    keep_maps: int,
    encoder_once: bool,
) -> UncertaintyResult:
    if mc_samples < 2:
        raise ValueError(f"mc_samples must be >= 2 for a mutual information, got {mc_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
    hw = Hardware(next(model.parameters()).device, amp, channels_last)
    device = hw.device
    if device.type != "cuda":
        memory_budget_bytes = min(memory_budget_bytes, CPU_CHUNK_BYTES)

    sampler = DropoutSampler(model.dropout_rate, seed, device)
    difficulty, mean_mi, kept = [], [], {}
    # Batch-norm uses running statistics; dropout is applied by the sampler only.
    with eval_mode(model), torch.inference_mode(), hw.autocast():
        for start in range(0, len(idx), batch_size):
            sel = idx[start : start + batch_size]
            batch_images, batch_masks = _rows(images, sel), _rows(masks, sel)
            x = hw.images(batch_images.permute(0, 3, 1, 2))  # B, 3, H, W
            y = batch_masks.to(device, non_blocking=True)
            b, _, h, w = x.shape
            sampler.batch = b
            n_kept = len(kept.get("image", ()))
            acc = _MapAccumulator(y, variance=n_kept < keep_maps)
            if encoder_once:
                cache = model.prepare_sampling(model.encode(x))
                rows = _samples_per_chunk(model, h, w, memory_budget_bytes, hw.element_bytes)
                t_chunk = max(1, min(mc_samples, rows // b))
                for t0 in range(0, mc_samples, t_chunk):
                    t = min(t_chunk, mc_samples - t0)
                    # Rows [s*b:(s+1)*b] are sample s.
                    logits = model.decode_samples(cache, t, dropout=sampler)  # t*b, 2, H, W
                    probs = torch.softmax(logits.float(), dim=1)[:, 1]
                    acc.add(probs.view(t, b, h, w))
            else:
                for _ in range(mc_samples):
                    logits = model.decode(model.encode(x), dropout=sampler)
                    acc.add(torch.softmax(logits.float(), dim=1)[:, 1][None])
            maps = acc.maps()
            difficulty.append(difficulty_scores(maps["mutual_information"].double(), y).cpu())
            mean_mi.append(maps["mutual_information"].flatten(1).mean(1).double().cpu())
            if n_kept < keep_maps:
                take = slice(0, keep_maps - n_kept)
                new = {"image": batch_images[take].permute(0, 3, 1, 2), "mask": batch_masks[take]}
                new.update({k: v[take].cpu() for k, v in maps.items()})
                kept = {k: torch.cat([kept[k], v]) if k in kept else v for k, v in new.items()}
    return UncertaintyResult(torch.cat(difficulty), torch.cat(mean_mi), kept)


def estimate_uncertainty(
    model: UNet,
    images: np.ndarray | Tensor,
    masks: np.ndarray | Tensor,
    indices: np.ndarray | None = None,
    *,
    mc_samples: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    amp: bool = True,
    channels_last: bool = True,
    memory_budget_bytes: int = 2 << 30,
    keep_maps: int = 0,
) -> UncertaintyResult:
    """MC-Dropout over a dataset: the encoder once per batch, the decoder T times, batched.

    Of the decoder, the skip-channel half of each ``Up`` block's first convolution is also
    deterministic and runs once per batch (:meth:`~polydice.model.UNet.prepare_sampling`).

    The model's weights are fixed (inference mode, no gradients); batch-norm uses its running
    statistics and only the two dropout sites are stochastic, seeded by ``seed``. On CUDA it runs
    under bf16 (else fp16) autocast with channels-last tensors; the probabilities and all
    statistics are accumulated in float32.

    Args:
        model: a :class:`~polydice.model.UNet` (on the device the estimate should run on).
        images: ``(N, H, W, 3)`` uint8 RGB.
        masks: ``(N, H, W)`` in {0, 1}.
        indices: which images to estimate (default all), in this order.
        mc_samples: T ≥ 2.
        batch_size: images per encoder batch; the decoder sees up to T× as many rows, chunked to
            ``memory_budget_bytes``.
        seed: seeds the dropout masks.
        keep_maps: how many of the first images' maps to return for logging.

    Returns:
        :class:`UncertaintyResult`.

    Raises:
        ValueError: for ``mc_samples < 2`` or ``batch_size < 1``.
    """
    return _estimate(
        model, images, masks, indices, mc_samples, batch_size, seed, amp, channels_last,
        memory_budget_bytes, keep_maps, encoder_once=True,
    )


def estimate_uncertainty_naive(
    model: UNet,
    images: np.ndarray | Tensor,
    masks: np.ndarray | Tensor,
    indices: np.ndarray | None = None,
    *,
    mc_samples: int = 10,
    batch_size: int = 32,
    seed: int = 0,
    amp: bool = True,
    channels_last: bool = True,
    keep_maps: int = 0,
) -> UncertaintyResult:
    """Algorithm 1 lines 6–9 read literally: T full forward passes per batch.

    The reference for :func:`estimate_uncertainty`: same seeded masks, same maps, about 2.2× the
    convolution FLOPs at T = 10 (:func:`~polydice.model.refresh_flops`).
    """
    return _estimate(
        model, images, masks, indices, mc_samples, batch_size, seed, amp, channels_last,
        0, keep_maps, encoder_once=False,
    )


def mc_samples_of(model: nn.Module, x: Tensor, mc_samples: int, seed: int = 0) -> Tensor:
    """The T stochastic foreground probability maps ``(T, B, H, W)`` of a float batch ``x``.

    For inspection and tests; the training loop streams with :func:`estimate_uncertainty` instead.
    """
    device = next(model.parameters()).device
    sampler = DropoutSampler(model.dropout_rate, seed, device)
    sampler.batch = x.shape[0]
    with eval_mode(model), torch.inference_mode():
        feats = model.encode(x.to(device))
        out = [torch.softmax(model.decode(feats, dropout=sampler).float(), 1)[:, 1] for _ in range(mc_samples)]
    return torch.stack(out)


__all__ = [
    "binary_entropy",
    "mutual_information",
    "predictive_entropy",
    "expected_entropy",
    "predictive_variance",
    "difficulty_scores",
    "epsilon_from_difficulty",
    "DropoutSampler",
    "UncertaintyResult",
    "estimate_uncertainty",
    "estimate_uncertainty_naive",
    "mc_samples_of",
]
