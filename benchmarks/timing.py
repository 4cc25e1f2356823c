"""Interleaved, repeated timing, and the lines the benchmark prints."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from polydice.device import Hardware


@dataclass
class CaseResult:
    """One ratio, its target and the lines that let a reader check it."""

    name: str
    ratio: float
    target: float
    details: list[str] = field(default_factory=list)

    def ratio_line(self) -> str:
        return f"RATIO {self.name} {self.ratio:.3f} target <= {self.target:.3f}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(sides: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                warmup: bool = True) -> dict[str, list[float]]:
    """Wall seconds of each side, ``repeats`` times, the order alternating (A B, B A, A B, ...).

    Alternating pairs put slow drifts of a shared machine (another job, thermal state) on both
    sides alike, so the per-repeat ratio is steadier than either timing. An untimed warm-up call
    of each side first pays the one-time costs (allocator growth, cuDNN autotuning, lazy imports).
    """
    names = list(sides)
    if warmup:
        for name in names:
            sides[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            sides[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of the per-repeat ratios (each pair was measured back to back)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def rate_line(label: str, seconds: list[float], images: float, flops: float) -> str:
    """Median time of one side, and the images/s and GFLOP/s that it implies."""
    t = statistics.median(seconds)
    return (f"  {label}: median {t:.3f} s of {len(seconds)} (range {min(seconds):.3f}-{max(seconds):.3f} s), "
            f"{images / t:.1f} img/s, {flops / t / 1e9:.2f} GFLOP/s")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(hw: Hardware, threads: int) -> list[str]:
    device = str(hw.device)
    if hw.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(hw.device)})"
    return [
        f"machine: {_cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"torch threads {threads}, python {platform.python_version()}",
        f"device: {device}, AMP {hw.amp_dtype}, memory format {hw.memory_format}",
    ]
