"""The U-Net of thesis Table 1, with MC-Dropout sites after ``down4`` and after ``up4``.

Layout at 224×224 with ``base_channels = c = 64``::

    inc   DoubleConv          224×224×c        up1  Upsample + DoubleConv   28×28×4c
    down1 MaxPool+DoubleConv  112×112×2c       up2  Upsample + DoubleConv   56×56×2c
    down2 MaxPool+DoubleConv   56×56×4c        up3  Upsample + DoubleConv  112×112×c
    down3 MaxPool+DoubleConv   28×28×8c        up4  Upsample + DoubleConv  224×224×c
    down4 MaxPool+DoubleConv   14×14×8c        outc Conv2d 1×1             224×224×2

The forward pass is split into a deterministic :meth:`UNet.encode` and a stochastic
:meth:`UNet.decode`: both dropout layers sit at or after the bottleneck, so MC-Dropout can run the
encoder once and only the decoder T times (see :mod:`polydice.uncertainty`). Of the decoder, too,
a part is deterministic: the first convolution of each ``Up`` block sees ``cat([skip, x])``, and
its weights on the skip channels act on encoder features only. :meth:`UNet.prepare_sampling`
computes that term once per image and :meth:`UNet.decode_samples` adds it to every sample, which
leaves 62 % of the decoder's FLOPs to run T times.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# decode(..., dropout=fn) calls fn(x, site) at each of these dropout sites.
DROPOUT_SITES = ("bottleneck", "decoder")

Features = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


class DoubleConv(nn.Sequential):
    """(Conv 3×3 → BatchNorm → ReLU) × 2."""

    def __init__(self, in_ch: int, out_ch: int, mid_ch: int | None = None):
        mid_ch = mid_ch or out_ch
        super().__init__(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch))


class Up(nn.Module):
    """Bilinear ×2 upsampling, concatenation with the skip feature, DoubleConv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConv(in_ch, out_ch, in_ch // 2)

    def _upsample_to(self, x: Tensor, size: torch.Size) -> Tensor:
        x = self.up(x)
        # Odd input sizes leave the upsampled map a pixel short of the skip feature.
        dy, dx = size[-2] - x.shape[-2], size[-1] - x.shape[-1]
        if dy or dx:
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return x

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self._upsample_to(x, skip.shape)], dim=1))

    def skip_term(self, skip: Tensor) -> Tensor:
        """The first convolution's weights on the skip channels applied to ``skip``: ``(B, mid, H, W)``.

        Convolution is linear per input channel (zero padding included), so
        ``conv(cat([skip, x])) = conv_skip(skip) + conv_x(x)``.
        """
        conv = self.conv[0]
        return F.conv2d(skip, conv.weight[:, : skip.shape[1]], None, conv.stride, conv.padding)

    def forward_with_skip_term(self, x: Tensor, skip_term: Tensor) -> Tensor:
        """:meth:`forward` given :meth:`skip_term` of the skip feature.

        Args:
            x: ``(T·B, C, h, w)``, T blocks of B rows (sample-major).
            skip_term: ``(B, mid, H, W)``, added to each of the T blocks.
        """
        conv = self.conv[0]
        b = skip_term.shape[0]
        x = self._upsample_to(x, skip_term.shape)
        y = F.conv2d(x, conv.weight[:, conv.in_channels - x.shape[1] :], conv.bias, conv.stride, conv.padding)
        y.unflatten(0, (-1, b)).add_(skip_term)  # T, B, mid, H, W: a view of y
        for layer in list(self.conv)[1:]:
            y = layer(y)
        return y


class UNet(nn.Module):
    """Two-class U-Net (thesis Table 1) with dropout after ``down4`` and after ``up4``.

    Args:
        in_channels: input channels (3 for RGB).
        num_classes: output logits per pixel (2: background, polyp).
        base_channels: width c of the first block; 64 is the thesis, 8–16 suits CPU runs.
        dropout: dropout rate p of both dropout layers, in [0, 1).

    Raises:
        ValueError: for a non-positive width or a dropout rate outside [0, 1).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base_channels: int = 64, dropout: float = 0.5):
        super().__init__()
        if base_channels < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"channels must be positive, got in={in_channels}, classes={num_classes}, base={base_channels}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        c = base_channels
        self.dropout_rate = dropout
        self.inc = DoubleConv(in_channels, c)
        self.down1 = Down(c, 2 * c)
        self.down2 = Down(2 * c, 4 * c)
        self.down3 = Down(4 * c, 8 * c)
        self.down4 = Down(8 * c, 8 * c)  # bilinear U-Net: the bottleneck keeps 8c channels
        self.drop_bottleneck = nn.Dropout(dropout)
        self.up1 = Up(16 * c, 4 * c)
        self.up2 = Up(8 * c, 2 * c)
        self.up3 = Up(4 * c, c)
        self.up4 = Up(2 * c, c)
        self.drop_decoder = nn.Dropout(dropout)
        self.outc = nn.Conv2d(c, num_classes, 1)

    def encode(self, x: Tensor) -> Features:
        """Deterministic part: ``x (B, 3, H, W)`` → skip features and bottleneck ``(x1, …, x5)``."""
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        return x1, x2, x3, x4, x5

    def decode(self, feats: Features, dropout: Callable[[Tensor, str], Tensor] | None = None) -> Tensor:
        """Stochastic part: features → logits ``(B, num_classes, H, W)``.

        Args:
            feats: the output of :meth:`encode`; its batch may repeat each image T times.
            dropout: ``fn(x, site)`` replacing the two ``nn.Dropout`` layers (sites in
                ``DROPOUT_SITES``), so that MC estimation can draw seeded masks itself.
        """
        x1, x2, x3, x4, x5 = feats
        x5 = self.drop_bottleneck(x5) if dropout is None else dropout(x5, "bottleneck")
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        x = self.drop_decoder(x) if dropout is None else dropout(x, "decoder")
        return self.outc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def prepare_sampling(self, feats: Features) -> "SamplingCache":
        """The deterministic part of the decoder, once per image, for :meth:`decode_samples`."""
        x1, x2, x3, x4, x5 = feats
        ups = (self.up1, self.up2, self.up3, self.up4)
        return SamplingCache(x5, tuple(up.skip_term(skip) for up, skip in zip(ups, (x4, x3, x2, x1))))

    def decode_samples(
        self, cache: "SamplingCache", samples: int, dropout: Callable[[Tensor, str], Tensor] | None = None
    ) -> Tensor:
        """``samples`` decoder passes at once: logits ``(samples·B, num_classes, H, W)``, sample-major.

        Equals :meth:`decode` on the features repeated ``samples`` times (to float rounding), with
        the dropout sites called on all ``samples·B`` rows, but runs the skip half of each ``Up``
        block's first convolution once (:meth:`prepare_sampling`) instead of ``samples`` times.
        """
        x5 = cache.bottleneck
        x5 = x5.repeat(samples, *([1] * (x5.dim() - 1))) if samples > 1 else x5
        x = self.drop_bottleneck(x5) if dropout is None else dropout(x5, "bottleneck")
        for up, term in zip((self.up1, self.up2, self.up3, self.up4), cache.skip_terms):
            x = up.forward_with_skip_term(x, term)
        x = self.drop_decoder(x) if dropout is None else dropout(x, "decoder")
        return self.outc(x)

    def dropout_layers(self) -> list[nn.Dropout]:
        return [m for m in self.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


class SamplingCache(NamedTuple):
    """Per-image decoder inputs that no dropout mask changes (:meth:`UNet.prepare_sampling`).

    Attributes:
        bottleneck: ``x5 (B, 8c, H/16, W/16)``, before the bottleneck dropout.
        skip_terms: for ``up1 … up4``, :meth:`Up.skip_term` of ``x4 … x1``.
    """

    bottleneck: Tensor
    skip_terms: tuple[Tensor, Tensor, Tensor, Tensor]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module in eval mode; on exit each module gets back its own previous mode.

    ``model.train(was_training)`` would not do: it would switch on layers the caller had frozen.
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def mc_dropout_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Batch-norm (and everything else) in eval mode, only the dropout layers switched on.

    Restores every module's previous mode on exit.
    """
    with eval_mode(model):
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.train()
        yield model


def to_input(images: Tensor) -> Tensor:
    """uint8 ``(B, 3, H, W)`` → float in [0, 1].

    Batches travel host→device as uint8 (4× less traffic) and are converted on the device.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images.float().div_(255.0)


def forward_flops(base_channels: int = 64, image_size: int = 224, in_channels: int = 3) -> dict[str, float]:
    """Multiply–add FLOPs (2 per MAC) of one forward pass per image, split encoder / decoder.

    Counts convolutions only (batch-norm, ReLU, pooling and upsampling are memory-bound and small).
    At c = 64, 224×224: about 22 GFLOP encoder, 39 GFLOP decoder, of which 15 GFLOP
    (``decoder_skip``) act on the encoder's skip features (:meth:`UNet.prepare_sampling`).

    Returns:
        ``{"encoder", "decoder", "decoder_skip", "total"}`` in FLOPs; ``total`` = encoder + decoder.
    """
    c, s = base_channels, image_size

    def dconv(cin: int, cmid: int, cout: int, hw: int) -> float:
        return 2.0 * hw * 9 * (cin * cmid + cmid * cout)

    enc = dconv(in_channels, c, c, s * s)
    enc += dconv(c, 2 * c, 2 * c, (s // 2) ** 2)
    enc += dconv(2 * c, 4 * c, 4 * c, (s // 4) ** 2)
    enc += dconv(4 * c, 8 * c, 8 * c, (s // 8) ** 2)
    enc += dconv(8 * c, 8 * c, 8 * c, (s // 16) ** 2)
    dec = dconv(16 * c, 8 * c, 4 * c, (s // 8) ** 2)
    dec += dconv(8 * c, 4 * c, 2 * c, (s // 4) ** 2)
    dec += dconv(4 * c, 2 * c, c, (s // 2) ** 2)
    dec += dconv(2 * c, c, c, s * s)
    dec += 2.0 * s * s * c * 2
    # First convolution of each Up block, weights on the skip channels: skip channels = mid channels.
    skip = sum(2.0 * hw * 9 * ch * ch for ch, hw in ((8 * c, (s // 8) ** 2), (4 * c, (s // 4) ** 2),
                                                     (2 * c, (s // 2) ** 2), (c, s * s)))
    return {"encoder": enc, "decoder": dec, "decoder_skip": skip, "total": enc + dec}


def refresh_flops(base_channels: int = 64, image_size: int = 224, mc_samples: int = 10, in_channels: int = 3) -> float:
    """FLOPs per image of an ε refresh by :func:`polydice.uncertainty.estimate_uncertainty`.

    The encoder and the decoder's skip-feature term once, the rest of the decoder ``mc_samples``
    times; the naive estimator costs ``mc_samples × total``. At c = 64, 224×224, T = 10: 278 GFLOP,
    0.45 of the naive 612.
    """
    f = forward_flops(base_channels, image_size, in_channels)
    return f["encoder"] + f["decoder_skip"] + mc_samples * (f["decoder"] - f["decoder_skip"])


# ----------------------------------------------------------------------------- model files

MODEL_FILE_FORMAT = "polydice-model"
MODEL_FILE_VERSION = 1


class ModelFileError(ValueError):
    """A model file that is missing, unreadable, of another format or of another architecture."""


def save_model_file(
    path,
    model_state: dict[str, Tensor],
    config: dict,
    *,
    epoch: int,
    val_dice: float,
    threshold: float = 0.5,
) -> None:
    """Write a ``model.pt``: the selected weights and what is needed to rebuild and use them.

    Tensors and plain Python values only, so that it loads with ``torch.load(weights_only=True)``.
    Written to a temporary file first and renamed, so that a crash never leaves half a file.

    Args:
        path: the file to write.
        model_state: the U-Net's ``state_dict`` (moved to the CPU here).
        config: the run's ``TrainConfig.to_dict()`` (``base_channels``, ``dropout`` rebuild the
            model; ``image_size`` is the input size it was trained at).
        epoch: the epoch the weights come from (the best validation epoch).
        val_dice: the validation Dice of those weights.
        threshold: the probability threshold that maximised validation Dice.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": MODEL_FILE_FORMAT,
        "version": MODEL_FILE_VERSION,
        "config": dict(config),
        "model": {k: v.detach().cpu().clone() for k, v in model_state.items()},
        "epoch": int(epoch),
        "val_dice": float(val_dice),
        "threshold": float(threshold),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _one_line(exc: Exception, limit: int = 200) -> str:
    """The gist of a torch error in one line: unpickling and state-dict errors go on for paragraphs.

    ``load_state_dict`` lists one problem per line under a heading; the first is kept and the rest
    counted. A weights-only unpickling error opens with advice about ``weights_only`` that does not
    apply to a damaged file; its actual reason follows ``WeightsUnpickler error:``.
    """
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        return lines[1][:limit] + more
    return lines[0][:limit]


def load_model_file(path, map_location: str | torch.device = "cpu") -> tuple["UNet", dict]:
    """Rebuild the U-Net of a ``model.pt`` in eval mode.

    Returns:
        ``(model, info)``: ``info`` holds ``config``, ``epoch``, ``val_dice``, ``threshold``.

    Raises:
        ModelFileError: the file is missing or unreadable, is not a polydice model file, or its
            weights do not fit the architecture its config describes.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not a torch file at all
        raise ModelFileError(f"{path}: not a readable model file ({type(exc).__name__}: {_one_line(exc)})") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FILE_FORMAT:
        raise ModelFileError(f"{path}: not a polydice model file (no format {MODEL_FILE_FORMAT!r})")
    if payload.get("version") != MODEL_FILE_VERSION:
        raise ModelFileError(f"{path}: model file version {payload.get('version')!r}, expected {MODEL_FILE_VERSION}")
    config = payload.get("config") or {}
    try:
        model = UNet(3, 2, int(config["base_channels"]), float(config["dropout"]))
        model.load_state_dict(payload["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: weights do not fit the U-Net its config describes ({_one_line(exc)})") from exc
    model.eval()
    info = {key: payload[key] for key in ("config", "epoch", "val_dice", "threshold")}
    return model, info
