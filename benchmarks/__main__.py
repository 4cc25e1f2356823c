"""``python -m benchmarks [--quick]``: six ratios, each measured side by side in one run.

Prints the machine, the data used, per-side timings with images/s and GFLOP/s, and one line per
ratio, ``RATIO <name> <median> target <= <x>``, the median over repeats of the per-repeat ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from polydice.config import TrainConfig
from polydice.data import SegmentationData, load_dataset
from polydice.dataset import make_folds
from polydice.device import Hardware
from polydice.synthetic import make_synthetic

from .cases import Workload, epoch_vs_bare_loop, loader_feed_rate, loader_vs_tensors, refresh_vs_naive
from .timing import CaseResult, machine_lines

# The real Kvasir-SEG release, where the workplace keeps it beside the repository.
KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir-seg"


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run.

    ``epoch_images`` go through each timed epoch, ``refresh_images`` through each ε refresh; the
    Tune trial trains ``tune_epochs`` on the first ``tune_images`` of the dataset; the memory case
    loads the whole dataset again at ``memory_image_size``, so that the dataset is large next to a
    trial's own memory. ``warmup``: one untimed call of each side before the timed repeats.
    """

    image_size: int
    base_channels: int
    batch_size: int
    mc_samples: int
    epoch_images: int
    refresh_images: int
    repeats: int
    tune_images: int
    tune_epochs: int
    tune_repeats: int
    memory_image_size: int
    memory_base_channels: int
    memory_batch_size: int
    memory_repeats: int
    synthetic_images: int = 1000
    warmup: bool = True
    feed_images: int = 256  # synthetic images at 224 px through the loader, for its feed rate


PRESETS = {
    # The whole run in about a minute, for the test suite; the numbers mean nothing.
    "smoke": Settings(image_size=32, base_channels=4, batch_size=4, mc_samples=2, epoch_images=8, refresh_images=8,
                      repeats=1, tune_images=24, tune_epochs=2, tune_repeats=1, memory_image_size=32,
                      memory_base_channels=4, memory_batch_size=4, memory_repeats=1, synthetic_images=48,
                      warmup=False, feed_images=32),
    # Under 5 minutes on 2 CPU cores. The memory case at 512 px: a 1000 MiB dataset against about
    # 0.6 GiB per trial, so that one copy more or less is well outside the noise of the trials' own memory.
    "quick": Settings(image_size=64, base_channels=8, batch_size=16, mc_samples=10, epoch_images=160,
                      refresh_images=64, repeats=5, tune_images=200, tune_epochs=4, tune_repeats=3,
                      memory_image_size=512, memory_base_channels=4, memory_batch_size=2, memory_repeats=1),
    # Longer and larger; on a GPU add --image-size 224 --base-channels 64 --batch-size 32.
    "full": Settings(image_size=128, base_channels=16, batch_size=16, mc_samples=10, epoch_images=320,
                     refresh_images=160, repeats=5, tune_images=1000, tune_epochs=6, tune_repeats=3,
                     memory_image_size=512, memory_base_channels=4, memory_batch_size=2, memory_repeats=3),
}


IN_PROCESS = {"refresh_vs_naive": refresh_vs_naive, "loader_vs_tensors": loader_vs_tensors,
              "epoch_vs_bare_loop": epoch_vs_bare_loop}
CASES = (*IN_PROCESS, "loader_images_per_s_per_core", "tune_vs_direct", "tune_whole_vs_direct",
         "memory_4trials_vs_4x1")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats: under 5 minutes on 2 CPU cores")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", default=str(KVASIR) if KVASIR.is_dir() else "",
                   help="Kvasir-SEG folder (images/, masks/); empty for the synthetic set (default: %(default)r)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:i] (default: auto)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads on both sides of every ratio (default: all cores)")
    p.add_argument("--trial-cpus", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="CPUs of the Tune trial, and torch threads of the direct run it is timed against; one "
                        "core is left to Ray's driver and daemons, as on a real node (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader processes (default: 0)")
    p.add_argument("--only", nargs="+", choices=CASES, default=list(CASES), metavar="NAME",
                   help=f"run only these cases: {', '.join(CASES)} (default: all)")
    for name in ("image_size", "base_channels", "batch_size", "repeats"):
        p.add_argument("--" + name.replace("_", "-"), type=int, help="override the preset")
    return p.parse_args(argv)


def mode_of(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def settings_of(args: argparse.Namespace) -> Settings:
    preset = PRESETS[mode_of(args)]
    overrides = {k: getattr(args, k) for k in ("image_size", "base_channels", "batch_size", "repeats")}
    return dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})


def load(args: argparse.Namespace, settings: Settings, size: int) -> SegmentationData:
    if args.data_dir:
        return load_dataset("kvasir", args.data_dir, size, num_workers=args.threads)
    return make_synthetic(settings.synthetic_images, size, seed=0)


def subset(data: SegmentationData, n: int) -> SegmentationData:
    return SegmentationData(data.name, data.images[:n], data.masks[:n], data.groups[:n], data.names[:n])


def base_config(args: argparse.Namespace, settings: Settings) -> TrainConfig:
    """The adaptive method with an ε refresh (and so a checkpoint) every second epoch from epoch 2,
    so that the timed epochs of a Tune trial include them."""
    return TrainConfig(
        dataset="kvasir" if args.data_dir else "synthetic",
        data_dir=args.data_dir or None,
        n_synthetic=settings.synthetic_images,
        image_size=settings.image_size,
        base_channels=settings.base_channels,
        batch_size=settings.batch_size,
        mc_samples=settings.mc_samples,
        method="adaptive",
        epochs=settings.tune_epochs,
        e0=2,
        tau=2,
        device=args.device,
        num_workers=args.num_workers,
    )


def memory_config(cfg: TrainConfig, settings: Settings) -> TrainConfig:
    """Cheap trials over a big dataset: ``dice`` for one epoch of two batches and two batches of
    validation. A copy of the dataset would cost its whole size however little a trial reads, and
    short trials keep their own memory small and steady (glibc's heap after a full epoch at 384 px
    varied by ±200 MiB from run to run, more than the margin between one copy and two). ``dice``
    has no ε refresh, whose memory is set by ``mc_memory_gb``, not by the dataset."""
    return cfg.replace(method="dice", epochs=1, max_batches=2, image_size=settings.memory_image_size,
                       base_channels=settings.memory_base_channels, batch_size=settings.memory_batch_size)


def report(result: CaseResult) -> None:
    for line in result.details:
        print(line, flush=True)
    print(result.ratio_line(), flush=True)


def run_ray_cases(args, settings: Settings, cfg: TrainConfig, data: SegmentationData, hw: Hardware) -> None:
    from polydice.tune import init_ray

    from .ray_cases import MEMORY_TRIALS, memory_4trials_vs_4x1, tune_vs_direct, tune_whole_vs_direct

    # A private temp dir (short: Ray's sockets live below it) keeps this instance apart from any other.
    own_tmp = "RAY_TMPDIR" not in os.environ
    if own_tmp:
        os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="pdbench", dir="/tmp")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # with verbose=0, no experiment tables between the results
    # Trials this short checkpoint every few seconds; Tune's advice on snapshot frequency would
    # print after each checkpoint (the studies silence it the same way).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    storage = tempfile.mkdtemp(prefix="polydice-bench-")
    try:
        init_ray(None, num_cpus=max(args.threads, MEMORY_TRIALS))
        if "tune_vs_direct" in args.only:
            report(tune_vs_direct(cfg, subset(data, settings.tune_images), hw, args.trial_cpus,
                                  settings.tune_repeats, storage))
        if "tune_whole_vs_direct" in args.only:
            report(tune_whole_vs_direct(cfg, subset(data, settings.tune_images), hw, args.trial_cpus,
                                        settings.tune_repeats, storage))
        if "memory_4trials_vs_4x1" in args.only:
            mem_cfg = memory_config(cfg, settings)
            big = load(args, settings, mem_cfg.image_size)
            report(memory_4trials_vs_4x1(mem_cfg, big, hw, settings.memory_repeats, storage))
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
        if own_tmp:
            shutil.rmtree(os.environ.pop("RAY_TMPDIR"), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_of(args)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = base_config(args, settings)
    hw = Hardware.from_config(cfg)
    for line in machine_lines(hw, args.threads):
        print(line, flush=True)

    data = load(args, settings, cfg.image_size)
    source = f"Kvasir-SEG from {args.data_dir}" if args.data_dir else "synthetic (no Kvasir-SEG folder given)"
    print(f"data: {source}, {len(data)} images at {cfg.image_size} px; mode {mode_of(args)}: {settings}", flush=True)
    train_idx = make_folds(data.groups, cfg.folds, seed=cfg.split_seed, val_fraction=cfg.val_fraction)[cfg.fold][0]
    work = Workload(cfg, data, train_idx[: settings.epoch_images], hw, settings.repeats, settings.warmup,
                    settings.refresh_images)
    print(f"model: U-Net, base channels {cfg.base_channels}, {cfg.image_size} px, batch {cfg.batch_size}; "
          "each ratio is the median of per-repeat ratios, the two sides run back to back", flush=True)

    for name, case in IN_PROCESS.items():
        if name in args.only:
            report(case(work))
    if "loader_images_per_s_per_core" in args.only:
        for line in loader_feed_rate(settings.feed_images, settings.repeats, settings.warmup):
            print(line, flush=True)
    if {"tune_vs_direct", "tune_whole_vs_direct", "memory_4trials_vs_4x1"} & set(args.only):
        run_ray_cases(args, settings, cfg, data, hw)
    print(f"total wall time {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
