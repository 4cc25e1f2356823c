"""The Ray Tune ratios: a trial's time against a direct call, and the memory of concurrent trials.

Both use the project's own trainable (:func:`polydice.tune.make_trainable`, which shares the dataset
through the object store with ``tune.with_parameters``) and ``run_config``; Ray is started once,
before anything is timed.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import tempfile
import threading
import time

import psutil
import torch
from ray import tune

from polydice.config import TrainConfig
from polydice.data import SegmentationData
from polydice.dataset import make_folds
from polydice.device import Hardware
from polydice.model import forward_flops, refresh_flops
from polydice.schedule import refresh_epochs
from polydice.train import train
from polydice.tune import make_trainable, run_config

from .timing import CaseResult, interleaved, median_ratio, rate_line

MEMORY_TRIALS = 4
MiB = 2**20


def _fit(trainable, storage: str, name: str, param_space: dict | None = None, concurrent: int = 1,
         reuse_actors: bool = False) -> tune.ResultGrid:
    tuner = tune.Tuner(
        trainable,
        param_space=param_space or {},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=reuse_actors),
        run_config=run_config(name, storage, max_failures=0, verbose=0),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"a benchmark trial failed: {grid.errors[0]}")
    return grid


def _interleave_tune_direct(under_tune, direct, repeats: int, hw: Hardware) -> None:
    """Both sides back to back, ``repeats`` times, without a warm-up call (the Tune side's start-up
    is part of what is measured); the direct side sets the trial's thread count, restored after."""
    outer_threads = torch.get_num_threads()
    try:
        interleaved({"tune": under_tune, "direct": direct}, repeats, hw.device, warmup=False)
    finally:
        torch.set_num_threads(outer_threads)


def _run_flops(cfg: TrainConfig, data: SegmentationData) -> tuple[int, float]:
    """Training images seen and FLOPs of one ``train()`` run: 3x forward per training image,
    1x per validation image, :func:`refresh_flops` per training image at each ε refresh."""
    train_idx, val_idx, _ = make_folds(data.groups, cfg.folds, seed=cfg.split_seed, val_fraction=cfg.val_fraction)[cfg.fold]
    f = forward_flops(cfg.base_channels, cfg.image_size)
    refreshes = len(refresh_epochs(cfg.epochs, cfg.e0, cfg.tau)) if cfg.uses_controller else 0
    per_epoch = len(train_idx) * 3 * f["total"] + len(val_idx) * f["total"]
    refresh = len(train_idx) * refresh_flops(cfg.base_channels, cfg.image_size, cfg.mc_samples)
    return cfg.epochs * len(train_idx), cfg.epochs * per_epoch + refreshes * refresh


def tune_vs_direct(cfg: TrainConfig, data: SegmentationData, hw: Hardware, threads: int, repeats: int,
                   storage: str) -> CaseResult:
    """Training under Tune ÷ ``train()`` called directly, from the end of epoch 1 to the last epoch.

    Both sides run the same config, data, output files and thread count; validation every epoch,
    no test. The window starts at the first epoch's report so that it leaves out start-up: for the
    Tune side the trial actor's process start and imports, for both the first epoch's one-time
    costs. Inside it lies everything Tune adds per epoch: ``tune.report``, the checkpoints written
    at each ε refresh and at the last epoch, and their copy to the storage path. The start-up is
    printed beside the ratio; it is paid once per trial slot, not per epoch.
    """
    if cfg.epochs < 2:
        raise ValueError(f"tune_vs_direct needs at least 2 epochs to time the epochs after the first, got {cfg.epochs}")
    trainable = make_trainable(cfg, data, cpus_per_trial=threads, gpus_per_trial=1 if hw.device.type == "cuda" else 0)
    names = itertools.count()
    windows: dict[str, list[float]] = {"tune": [], "direct": []}
    whole: dict[str, list[float]] = {"tune": [], "direct": []}

    def under_tune():
        start = time.perf_counter()
        grid = _fit(trainable, storage, f"tune-vs-direct-{next(names)}")
        whole["tune"].append(time.perf_counter() - start)
        # time_this_iter_s: seconds between consecutive reports, as the trial itself measured them.
        windows["tune"].append(float(grid[0].metrics_dataframe["time_this_iter_s"].iloc[1:].sum()))

    def direct():
        torch.set_num_threads(threads)  # what the trial sets from its CPU share
        stamps: list[float] = []
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            train(cfg, lambda metrics, state: stamps.append(time.perf_counter()), data=data, out_dir=out,
                  evaluate_test=False)
        whole["direct"].append(time.perf_counter() - start)
        windows["direct"].append(stamps[-1] - stamps[0])

    _interleave_tune_direct(under_tune, direct, repeats, hw)
    images, flops = _run_flops(cfg, data)
    per_epoch = (cfg.epochs - 1) / cfg.epochs
    startup = statistics.median(w - s for w, s in zip(whole["tune"], windows["tune"]))
    startup_direct = statistics.median(w - s for w, s in zip(whole["direct"], windows["direct"]))
    return CaseResult("tune_vs_direct", median_ratio(windows["tune"], windows["direct"]), 1.10, [
        f"tune_vs_direct: {cfg.epochs} epochs of train() on {len(data)} images ({cfg.method}, ε refresh and "
        f"checkpoint at epochs {refresh_epochs(cfg.epochs, cfg.e0, cfg.tau)}), validation each epoch, no test; "
        f"{threads} CPU(s) per trial and as many torch threads directly; timed from the end of epoch 1 to the "
        "end of the last",
        rate_line("Tune trial, epochs 2..", windows["tune"], images * per_epoch, flops * per_epoch),
        rate_line("train() directly, epochs 2..", windows["direct"], images * per_epoch, flops * per_epoch),
        f"  left out: start-up and epoch 1 take {startup:.2f} s under Tune (trial actor start, imports) and "
        f"{startup_direct:.2f} s directly (median); whole runs: Tune {statistics.median(whole['tune']):.2f} s, "
        f"direct {statistics.median(whole['direct']):.2f} s, ratio {median_ratio(whole['tune'], whole['direct']):.3f}",
    ])


def tune_whole_vs_direct(cfg: TrainConfig, data: SegmentationData, hw: Hardware, threads: int, repeats: int,
                         storage: str, trials: int = 4) -> CaseResult:
    """``trials`` short trials one after another under Tune, start-up included ÷ the same runs
    called directly one after another in one process.

    What a study pays per trial beyond its training: the trial actor's start and imports (paid once
    per ``fit()``: Tune reuses the actor for the next trial, here as in the studies), the dataset
    fetched from the object store, reports, checkpoints and their copy to storage, Tune's
    bookkeeping.
    """
    trainable = make_trainable(cfg, data, cpus_per_trial=threads, gpus_per_trial=1 if hw.device.type == "cuda" else 0)
    seeds = list(range(trials))
    names = itertools.count()
    times: dict[str, list[float]] = {"tune": [], "direct": []}
    actors: list[int] = []
    outside: list[float] = []  # seconds of a fit() outside its trials' own training time
    first_extra: list[float] = []  # the first trial's time beyond the median of the others

    def under_tune():
        start = time.perf_counter()
        grid = _fit(trainable, storage, f"tune-whole-{next(names)}", {"seed": tune.grid_search(seeds)},
                    reuse_actors=True)
        times["tune"].append(time.perf_counter() - start)
        actors.append(len({r.metrics.get("pid") for r in grid}))
        # time_total_s: the trial's own clock, from the trainable's start to its last report.
        trial_s = sorted((r.metrics["trial_id"], float(r.metrics["time_total_s"])) for r in grid)
        outside.append(times["tune"][-1] - sum(s for _, s in trial_s))
        if len(trial_s) > 1:
            first_extra.append(trial_s[0][1] - statistics.median(s for _, s in trial_s[1:]))

    def direct():
        torch.set_num_threads(threads)
        start = time.perf_counter()
        for seed in seeds:
            with tempfile.TemporaryDirectory() as out:
                train(cfg.replace(seed=seed), lambda metrics, state: None, data=data, out_dir=out, evaluate_test=False)
        times["direct"].append(time.perf_counter() - start)

    _interleave_tune_direct(under_tune, direct, repeats, hw)
    images, flops = _run_flops(cfg, data)
    return CaseResult("tune_whole_vs_direct", median_ratio(times["tune"], times["direct"]), 1.15, [
        f"tune_whole_vs_direct: {trials} trials of {cfg.epochs} epochs on {len(data)} images one after another, "
        f"whole runs (Ray already started); {threads} CPU(s) per trial; trial actors used per repeat: {actors}",
        rate_line(f"{trials} Tune trials", times["tune"], trials * images, trials * flops),
        rate_line(f"{trials} train() calls", times["direct"], trials * images, trials * flops),
        f"  where the Tune side's extra time goes (medians): {statistics.median(outside):.2f} s of each fit() lie "
        "outside the trials (the trial actor's process start and imports, Tune's set-up and wind-down), and "
        f"the first trial on the new actor takes {statistics.median(first_extra) if first_extra else 0.0:.2f} s "
        "longer than the others (its process's first optimizer step imports torch._dynamo, first epoch on "
        "cold caches); both are paid once per actor, not per trial",
    ])


def node_pss() -> int:
    """Proportional set size of this process and all its descendants (every Ray process of a
    local instance: GCS, raylet with the object store, workers), summed.

    PSS charges each shared page to its mappers in equal parts, so the sum counts a page of the
    object store once however many workers map it, where a sum of RSS would count it per worker.
    """
    root = psutil.Process()
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a worker that exits between listing and reading holds nothing any more
    return total


class PeakPss:
    """``with PeakPss() as peak: ...`` samples :func:`node_pss` in a thread; ``peak.value`` after.

    Reading PSS walks every process's page tables, which takes a good part of a second when a
    large object store is mapped by several workers; the sampler waits ``idle_factor`` times as
    long as its last sample took (at least ``interval_s``), so that it uses at most
    1 / (1 + idle_factor) of a core and does not slow the trials it measures.
    """

    def __init__(self, interval_s: float = 0.1, idle_factor: float = 4.0):
        self.interval_s = interval_s
        self.idle_factor = idle_factor
        self.value = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            self.value = max(self.value, node_pss())
            self.samples += 1
            self._stop.wait(max(self.interval_s, self.idle_factor * (time.perf_counter() - start)))

    def __enter__(self) -> "PeakPss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _settled_pss(samples: int = 5) -> int:
    gc.collect()
    values = []
    for _ in range(samples):
        values.append(node_pss())
        time.sleep(0.2)
    return int(statistics.median(values))


def _max_overlap(grid: tune.ResultGrid) -> int:
    """How many trials were running at the same instant (from each trial's start and end)."""
    spans = [(r.metrics["timestamp"] - r.metrics["time_total_s"], r.metrics["timestamp"]) for r in grid]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    return max(itertools.accumulate(step for _, step in events))


def _footprint(cfg: TrainConfig, data: SegmentationData, hw: Hardware, storage: str, name: str,
               trials: int) -> tuple[int, int, int]:
    """Peak node PSS above the level before the dataset enters the object store, while ``trials``
    trials run at once; how many did overlap; how many PSS samples were taken."""
    baseline = _settled_pss()
    gpus = 1 / MEMORY_TRIALS if hw.device.type == "cuda" else 0
    trainable = make_trainable(cfg, data, cpus_per_trial=1, gpus_per_trial=gpus)  # ray.put of the dataset
    with PeakPss() as peak:
        grid = _fit(trainable, storage, name, {"seed": tune.grid_search(list(range(trials)))}, concurrent=trials)
    return peak.value - baseline, _max_overlap(grid), peak.samples


def memory_4trials_vs_4x1(cfg: TrainConfig, data: SegmentationData, hw: Hardware, repeats: int,
                          storage: str) -> CaseResult:
    """Peak PSS of 4 concurrent trials ÷ 4 × that of one trial, each above the pre-put baseline.

    With one trial the footprint is F1 = d + m (the dataset's object-store copy d, the trial's
    private memory m). If the node holds the dataset once, 4 trials take F4 = d + 4m, so
    F4 / 4F1 = (4m + d) / (4(m + d)); each extra copy anywhere adds d. The target is the
    midpoint between one copy and two, (4m + 1.5d) / (4(m + d)), with m = F1 - d measured.
    """
    d = data.images.nbytes + data.masks.nbytes
    ratios, targets, lines = [], [], []
    for repeat in range(repeats):
        order = (1, MEMORY_TRIALS) if repeat % 2 == 0 else (MEMORY_TRIALS, 1)
        runs = {k: _footprint(cfg, data, hw, storage, f"memory-{k}x-{repeat}", k) for k in order}
        (f1, _, samples1), (f4, overlap, samples4) = runs[1], runs[MEMORY_TRIALS]
        m = f1 - d
        ratios.append(f4 / (MEMORY_TRIALS * f1))
        targets.append((MEMORY_TRIALS * m + 1.5 * d) / (MEMORY_TRIALS * (m + d)))
        lines.append(
            f"  repeat {repeat + 1}: F1 {f1 / MiB:.0f} MiB, F4 {f4 / MiB:.0f} MiB ({overlap} trials overlapped), "
            f"private per trial: alone {m / MiB:.0f} MiB, of 4 {(f4 - d) / MEMORY_TRIALS / MiB:.0f} MiB; "
            f"held-once ratio {(MEMORY_TRIALS * m + d) / (MEMORY_TRIALS * f1):.3f}; "
            f"{samples1} and {samples4} PSS samples"
        )
    return CaseResult("memory_4trials_vs_4x1", statistics.median(ratios), statistics.median(targets), [
        f"memory_4trials_vs_4x1: dataset {len(data)} images at {cfg.image_size} px = {d / MiB:.1f} MiB (d), "
        f"trials train {cfg.method} for {cfg.epochs} epoch(s), batch {cfg.batch_size}, "
        f"base channels {cfg.base_channels}; PSS summed over the driver and all Ray processes",
        *lines,
        "  target: (4m + 1.5d) / (4(m + d)), halfway between one copy of the dataset on the node and two",
    ])
