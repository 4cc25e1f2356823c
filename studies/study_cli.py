"""Flags and set-up shared by the study scripts (resources, storage, data, smoke settings)."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import storage  # noqa: E402
from polydice.config import DATASETS, SCALES, SELECTION_SEED_OFFSET, TrainConfig  # noqa: E402

# --smoke: tiny everything, a first look in a few minutes on a laptop CPU.
SMOKE = dict(epochs=3, image_size=32, base_channels=4, n_synthetic=40, mc_samples=3, batch_size=8, e0=1, tau=1)


def add_common_flags(p: argparse.ArgumentParser, seeds_help: str) -> None:
    """The flags of every study script; ``seeds_help`` says which of its runs ``--seeds`` repeats."""
    g = p.add_argument_group("cluster and resources")
    g.add_argument("--address", default=None, help="Ray cluster address host:port (default: $RAY_ADDRESS, else a local Ray on 127.0.0.1)")
    g.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs the study may use (default: all visible; 0 runs on CPUs). Locally they are declared "
                        "to Ray as logical resources, so the scheduling can be tried without GPUs")
    g.add_argument("--gpus-per-trial", type=float, default=None, help="GPU share per trial, fractional allowed (default: 1 when GPUs are used)")
    g.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs per trial (default: 1)")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    g.add_argument("--max-concurrent", type=int, default=0, help="cap on trials running at once (default: as resources allow)")
    g.add_argument("--max-failures", type=int, default=2, help="restarts of a trial from its last checkpoint after a worker dies (default: 2)")
    g.add_argument("--dashboard", action="store_true", help="start the Ray dashboard of a local run (bound to 127.0.0.1)")
    g.add_argument("--verbose", action="store_true",
                   help="Ray Tune's progress tables and every trial's log (default: one line per finished trial)")

    g = p.add_argument_group("storage")
    g.add_argument("--storage-path", default="results",
                   help="Tune results and reports: a local folder, a shared NFS path, or a URI that Ray Tune accepts "
                        "(s3://bucket/prefix, gs://...; an S3-compatible server: AWS_ENDPOINT_URL, or "
                        "s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http). Credentials come from the "
                        "environment (AWS_ACCESS_KEY_ID, ..., an instance role), not the URI (default: results)")
    g.add_argument("--resume", action="store_true", help="resume the interrupted study/grid of the same name")

    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, default="synthetic",
                   help="dataset; synthetic is generated in memory (default: synthetic)")
    g.add_argument("--data-dir", default=None,
                   help="dataset folder (Kvasir-SEG: images/ + masks/; CVC-ClinicDB: Original/ + Ground Truth/); "
                        "needed unless --dataset synthetic (default: none)")
    g.add_argument("--sequence-csv", default=None, help="CVC-ClinicDB frame,sequence CSV overriding the official sequences (default: the 29 official ones)")
    g.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 200, the thesis; 30 on the synthetic set; 3 with --smoke)")
    g.add_argument("--image-size", type=int, default=None,
                   help="image side in pixels (default: 224; 64 on the synthetic set; 32 with --smoke)")
    g.add_argument("--base-channels", type=int, default=None,
                   help="U-Net width (default: 64, the thesis; 16 on the synthetic set; 4 with --smoke)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="batch size (default: 32; 16 on the synthetic set; 8 with --smoke)")
    g.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 1e-3, the thesis)")
    g.add_argument("--mc-samples", type=int, default=None,
                   help="T, MC-Dropout passes per ε refresh (default: 10; 3 with --smoke)")
    g.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: 5)")
    g.add_argument("--seed", type=int, default=0,
                   help="base training seed: replicate r of a run (see --seeds) trains with --seed + r (default: 0)")
    g.add_argument("--seeds", type=int, default=3, metavar="N", help=seeds_help)
    g.add_argument("--polydice-scale", choices=SCALES, default="norm",
                   help="PolyDice scale s: 'norm' is thesis Eq. 2 (Dice = s·cos θ), 'inner' the thesis's printed "
                        "formula, an ablation (default: norm)")
    g.add_argument("--smoke", action="store_true", help="tiny everything: a first look in a few minutes on a CPU")


def base_config(args: argparse.Namespace, **extra) -> TrainConfig:
    """The fixed part of every trial's config: thesis defaults, then --smoke, then explicit flags."""
    values: dict = dict(dataset=args.dataset, data_dir=args.data_dir, sequence_csv=args.sequence_csv,
                        folds=args.folds, seed=args.seed, polydice_scale=args.polydice_scale)
    if args.dataset == "synthetic":
        # The embedded set is small; 64 px and a slim U-Net keep a CPU study to minutes per trial.
        values.update(image_size=64, base_channels=16, epochs=30, batch_size=16)
    if args.smoke:
        values.update(SMOKE)
    for flag in ("epochs", "image_size", "base_channels", "batch_size", "lr", "mc_samples"):
        if getattr(args, flag) is not None:
            values[flag] = getattr(args, flag)
    values.update(extra)
    return TrainConfig.from_dict(values)


def replicate_seeds(args: argparse.Namespace) -> list[int]:
    """The training seeds of a run's replicates, ``--seed + r`` for r < ``--seeds``.

    Raises:
        ValueError: ``--seeds`` below 1, or so large that a replicate would take the seed of the
            hard-set selection run (``--seed`` + ``SELECTION_SEED_OFFSET``).
    """
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.seeds >= SELECTION_SEED_OFFSET:
        raise ValueError(f"--seeds must be below {SELECTION_SEED_OFFSET}, got {args.seeds}: the seed --seed + "
                         f"{SELECTION_SEED_OFFSET} is the hard-set selection run's, which no compared run may use")
    return [args.seed + r for r in range(args.seeds)]


def controller_params(config: dict) -> str:
    """The adaptive controller's parameters in a config, to 3 significant digits: ``k=2.45, q=55.1, ...``."""
    return ", ".join(f"{k}={config[k]:.3g}" for k in ("k", "q", "e0", "tau", "eps_min", "eps_max") if k in config)


def progress(args: argparse.Namespace, total: int | None = None) -> dict:
    """``run_config`` settings for the study's console output: Tune's tables with ``--verbose``,
    else one line per finished trial (the quiet console itself is :func:`quiet_console`, which every
    study calls at its start)."""
    if args.verbose:
        return {"verbose": 1}
    from ray import tune

    class TrialLines(tune.Callback):
        """One line per finished trial, numbered among the experiment's finished trials (so a
        resumed study goes on counting from those that ended before the interruption)."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trials, trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, "FAILED (its error is in the trial folder's error.txt)")

        def _line(self, trials, trial, status):
            done = 1 + sum(1 for t in trials if t is not trial and t.is_finished())
            config, result = trial.config, trial.last_result or {}
            overrides = config.get("overrides", {})
            what = overrides.get("tag") or controller_params(config)
            fold = config.get("fold", overrides.get("fold", "?"))
            seed = overrides.get("seed", config.get("seed"))
            if seed is not None:  # a replicate; a search trial trains with --seed
                what = f"seed {seed} {what}"
            score = ""
            val = result.get("best_val_dice", result.get("val_dice"))
            if val is not None:
                score = f": val Dice {val:.4f} (epoch {result.get('best_epoch', '?')})"
            if "test_dice" in result:
                score += f", test Dice {result['test_dice']:.4f}"
            print(f"  [{done}/{total or len(trials)}] fold {fold} {what}{score} {status}", flush=True)

    return {"verbose": 0, "callbacks": [TrialLines()]}


def quiet_console(args: argparse.Namespace) -> None:
    """Without ``--verbose``: no Tune experiment box, INFO lines or sync advice, for new and
    resumed experiments alike (a resumed one keeps the settings it was saved with, so this runs
    at the start of every study)."""
    if args.verbose:
        return
    import logging

    # Tune's new console output prints an experiment box even at verbose 0; the legacy reporter
    # prints nothing there. Its INFO lines and the snapshot-frequency advice are noise on a console.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass


def trial_dirname(trial) -> str:
    """A trial's folder (and TensorBoard run) named by what it trains: ``dice-fold2-seed1-<id>``,
    ``adaptive-tuned-fold0-seed0-<id>``, not by a dict of overrides. A search trial (its sampled
    parameters at the top of its config, its seed --seed) is ``search-fold1-<id>``."""
    config = trial.config
    overrides = config.get("overrides", {})
    label = overrides.get("tag") or config.get("tag") or ("search" if "k" in config else "trial")
    fold = overrides.get("fold", config.get("fold", "x"))
    seed = overrides.get("seed", config.get("seed"))
    replicate = "" if seed is None else f"-seed{seed}"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{label}-fold{fold}{replicate}-{trial.trial_id}")


def redact(url: str) -> str:
    """A storage or database URL (or any text holding one) without its credentials, for anything
    printed or written: see :func:`storage.redact`."""
    return storage.redact(url)


def detect_gpus(mode: str) -> float:
    if mode == "cluster":
        import ray

        return float(ray.cluster_resources().get("GPU", 0))
    import torch

    return float(torch.cuda.device_count())


def resources(args: argparse.Namespace) -> tuple[float, float]:
    """(cpus_per_trial, gpus_per_trial) after defaults; call after :func:`start_ray`."""
    if args.cpus_per_trial <= 0:
        raise SystemExit(f"error: --cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if not args.num_gpus:
        return args.cpus_per_trial, 0.0
    gpus = 1.0 if args.gpus_per_trial is None else args.gpus_per_trial
    if not 0 < gpus <= args.num_gpus:
        raise SystemExit(f"error: --gpus-per-trial {gpus} must be in (0, --num-gpus {args.num_gpus}]")
    return args.cpus_per_trial, gpus


def start_ray(args: argparse.Namespace) -> str:
    from polydice.tune import init_ray

    local_gpus = args.num_gpus if not (args.address or os.environ.get("RAY_ADDRESS")) else None
    mode = init_ray(args.address, num_cpus=args.num_cpus, num_gpus=local_gpus, dashboard=args.dashboard,
                    log_to_driver=args.verbose)
    found = detect_gpus(mode)
    if args.num_gpus is None:
        args.num_gpus = found
    elif mode == "local" and args.num_gpus > found:
        print(f"note: --num-gpus {args.num_gpus:g} on a machine with {found:g} CUDA devices: Ray schedules "
              "the trials as on a GPU node, and a trial without a device trains on the CPU", flush=True)
    return mode


def max_concurrent(args: argparse.Namespace, gpus_per_trial: float) -> int:
    """Trials at once: limited by --num-gpus / --gpus-per-trial when GPUs are used (0 = no cap)."""
    caps = []
    if args.max_concurrent:
        caps.append(args.max_concurrent)
    if gpus_per_trial > 0 and args.num_gpus:
        caps.append(max(1, math.floor(args.num_gpus / gpus_per_trial + 1e-9)))
    return min(caps) if caps else 0


def existing_experiments(root: str, experiments: list[str], resume: bool, what: str) -> tuple[list[str], int | None]:
    """The experiments of ``experiments`` saved earlier, and ``None`` when the study may go on or
    the exit code after one ``error:`` line (storage that cannot be read, or a study of that name
    without ``--resume``: never start over one). ``what`` names the study in that line."""
    from ray import tune

    try:
        found = [e for e in experiments if tune.Tuner.can_restore(e)]
    except OSError as exc:  # a missing bucket, refused credentials, an unreachable endpoint
        print(storage.redact(f"error: the storage path {root} cannot be read: {exc}"), file=sys.stderr)
        return [], 2
    if found and not resume:
        print(storage.redact(f"error: {what} already exists ({found[0]}); pass --resume to continue it "
                             "or choose another name"), file=sys.stderr)
        return found, 2
    return found, None
