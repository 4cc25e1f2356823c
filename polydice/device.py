"""The device and what follows from it, decided in one place for training, MC-Dropout and prediction.

On CUDA: mixed precision under ``torch.autocast`` in bf16 where the card supports it, else fp16
(which alone needs loss scaling); channels-last tensors; pinned host memory for the loader. On a
CPU: float32, contiguous tensors, no pinning. Also the seeding of the random generators.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from .model import to_input


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` → the visible CUDA device if any (Ray sets CUDA_VISIBLE_DEVICES per trial), else CPU.

    Raises:
        ValueError: a CUDA device is named but CUDA is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """Every epoch reseeds from (seed, epoch), so a resumed run replays the same random stream."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919) % 2**31


class Hardware:
    """The device-dependent choices, all decided once from the device.

    Args:
        device: a device, or its name (``auto``: see :func:`resolve_device`).
        amp: bf16 (else fp16) autocast, on CUDA only.
        channels_last: channels-last tensors, on CUDA only.

    Attributes:
        device: the resolved device.
        amp_dtype: the autocast dtype, ``None`` for float32.
        memory_format: of the model's weights and inputs.
        pin_memory: whether loaders pin their batches (on CUDA).

    Raises:
        ValueError: see :func:`resolve_device`.
    """

    def __init__(self, device: str | torch.device = "auto", amp: bool = True, channels_last: bool = True):
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        self.amp_dtype = None
        if amp and cuda:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.memory_format = torch.channels_last if channels_last and cuda else torch.contiguous_format
        self.pin_memory = cuda

    @classmethod
    def from_config(cls, cfg) -> "Hardware":
        """The choices of a training run (a :class:`~polydice.config.TrainConfig`'s ``device``,
        ``amp`` and ``channels_last``); on CUDA also cuDNN's autotuner, as the input shape is fixed."""
        hw = cls(cfg.device, cfg.amp, cfg.channels_last)
        if hw.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        return hw

    @property
    def element_bytes(self) -> int:
        """Bytes per activation element: 2 under autocast, else 4."""
        return 4 if self.amp_dtype is None else 2

    @cached_property
    def scaler(self) -> torch.amp.GradScaler:
        """The loss scaler of a run on this hardware: fp16 needs loss scaling; bf16 has float32's
        range and does not."""
        return torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def autocast(self):
        """The autocast context of :attr:`amp_dtype` (a no-op for float32)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def images(self, images: Tensor) -> Tensor:
        """uint8 ``(B, 3, H, W)`` on the host → float input in [0, 1] on the device."""
        return to_input(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.memory_format)


__all__ = ["Hardware", "epoch_seed", "resolve_device", "seed_everything"]
