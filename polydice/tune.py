"""Ray Tune integration: :func:`polydice.train.train` as a function trainable.

With :mod:`polydice.resume` (what a killed study needs put right on resume), the only modules of
the package that import Ray; the Optuna database helpers are in :mod:`polydice.studydb`. The studies
in ``studies/`` build their search spaces on these.

- The dataset is decoded once by the driver and shared through the object store with
  ``tune.with_parameters``: every trial on a node maps the same copy.
- Each trial reports its metrics every epoch (``tune.report``) and a checkpoint at every ε refresh,
  every ``checkpoint_every`` epochs and at the end. The checkpoint holds the run's
  :class:`~polydice.checkpoint.RunState` (model, optimizer, ε table, controller state, history, best
  epoch); a restarted trial continues from it with the same ε.
- A trial's own files (``model.pt``, TensorBoard events, ``summary.json``, ``epsilon.csv``,
  ``per_image.csv``) go to its trial folder and are synced to ``storage_path`` (artifacts), so that
  ``tensorboard --logdir`` on the results shows Tune's scalars beside the ε/difficulty histograms
  and uncertainty maps. ``model.pt`` (the best validation epoch's weights) is an artifact, not a
  checkpoint, so no later checkpoint evicts it; a tested run also puts it, with the other output
  files, into its final checkpoint.
- Resources per trial: ``cpus_per_trial`` and ``gpus_per_trial`` (fractional GPUs pack several
  trials on one card); inside a trial the device is picked from what Ray made visible.
- Faults: a checkpoint that cannot be stored (a full disk, read-only storage) fails the trial
  naming its path, and the previous one stays the one a restart restores; a restarted trial whose
  checkpoint is unusable (truncated, another version's) starts over, saying why in
  ``restarted.txt``. The Optuna study's database may restart under a running study
  (:func:`study_storage` waits for it); a resumed experiment must be where it was started
  (:func:`restore_or_create`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import ray
from ray._private import ray_constants
import torch
from ray import tune

from .config import TrainConfig
from .data import SegmentationData
from .checkpoint import (CHECKPOINT_FILE, OUTPUT_FILES, CheckpointError, CheckpointWriteError, load_checkpoint,
                         save_checkpoint)
from .train import NonFiniteLossError, train

LOOPBACK = "127.0.0.1"


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: float | None = None,
    dashboard: bool = False,
    log_to_driver: bool = True,
) -> str:
    """Connect to a cluster, or start a local Ray instance bound to loopback.

    Args:
        address: ``host:port`` of a running cluster; ``None`` reads ``RAY_ADDRESS``, and without it
            a local instance starts.
        num_cpus, num_gpus: resources a *local* instance declares. They are logical: declaring 4
            GPUs on a CPU machine lets Ray schedule 0.5-GPU trials exactly as on a GPU node
            (torch then finds no CUDA device and the trial runs on the CPU).
        dashboard: start the dashboard of a local instance (on 127.0.0.1).
        log_to_driver: print the trials' own output in this process (off for a compact console:
            a failed trial's traceback is still in its folder's ``error.txt``).

    Returns:
        ``"cluster"`` or ``"local"``.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return "cluster" if address else "local"
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return "cluster"
    # By default Ray registers the host's network address and listens on every interface, even
    # for a laptop run; with this variable set to 0 every Ray port binds 127.0.0.1. The processes
    # Ray starts read it from their environment, but this process read it once when Ray was
    # imported, so its copy of the flag is switched off too.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        # "local" starts a new instance; no address would join a cluster that `ray start` left
        # recorded in Ray's temp dir on this machine.
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=dashboard,
        dashboard_host=LOOPBACK,
        _node_ip_address=LOOPBACK,
        log_to_driver=log_to_driver,
    )
    return "local"


def _threads_for_trial() -> int:
    try:
        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    except Exception:  # outside a Tune session
        cpus = os.cpu_count() or 1
    return max(1, int(cpus))


def training_function(
    config: dict,
    *,
    base: dict,
    data: SegmentationData,
    evaluate_test: bool,
    checkpoint_every: int,
) -> None:
    """The function trainable: one :func:`polydice.train.train` run per Tune trial.

    ``config`` (Tune's sampled parameters) overrides ``base``; both use ``TrainConfig`` field names,
    so a misspelt key in a search space fails the trial at once with the list of unknown keys.
    """
    config = dict(config)
    # A grid over whole method specifications passes them as one dict under "overrides".
    cfg = TrainConfig.from_dict({**base, **config.pop("overrides", {}), **config})
    # Several trials share a node: each uses only the CPUs Ray gave it.
    torch.set_num_threads(_threads_for_trial())

    trial_dir = Path(tune.get_context().get_trial_dir())
    checkpoint = tune.get_checkpoint()
    resume = None if checkpoint is None else _restored_state(checkpoint, trial_dir)

    last: dict = {}

    def report(metrics: dict, state: dict | None) -> None:
        last.update(metrics)
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(state, Path(folder) / CHECKPOINT_FILE)
            _report_checkpoint(metrics, folder)

    try:
        result = train(
            cfg,
            report,
            data=data,
            out_dir=trial_dir,
            resume=resume,
            evaluate_test=evaluate_test,
            checkpoint_every=checkpoint_every,
        )
    except NonFiniteLossError as exc:
        # A diverged configuration is an outcome of the search, not a crash to retry: retrying from
        # the last checkpoint would diverge again. The trial ends with what it reached.
        (trial_dir / "diverged.txt").write_text(f"{exc}\n")
        tune.report({**last, "diverged": True, "error_message": str(exc)})
        return
    if evaluate_test:
        # One last result with the test metrics; its checkpoint carries the run's output files so
        # that they reach storage_path even when artifacts are not synced.
        final = {k: v for k, v in result.summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        final.update(epoch=cfg.epochs, done_testing=True)
        with tempfile.TemporaryDirectory() as folder:
            for name in OUTPUT_FILES:
                if (trial_dir / name).exists():
                    (Path(folder) / name).write_bytes((trial_dir / name).read_bytes())
            tune.report(final, checkpoint=tune.Checkpoint.from_directory(folder))


def _restored_state(checkpoint: tune.Checkpoint, trial_dir: Path) -> dict | None:
    """The run state in a restarted trial's checkpoint, or ``None`` to start the trial over when
    that checkpoint is unusable (truncated, corrupt, of another format version).

    Tune keeps one checkpoint per trial (:func:`run_config`), so there is no earlier one to fall
    back on. Failing would have Tune restart the trial on the same file ``max_failures`` times, and
    ``--resume`` (which retries errored trials) again; starting over costs this trial's time only
    and ends with the numbers of an uninterrupted run, since every epoch reseeds from (seed, epoch).
    The reason is printed and appended to ``restarted.txt`` in the trial folder.
    """
    with checkpoint.as_directory() as folder:
        try:
            return load_checkpoint(Path(folder) / CHECKPOINT_FILE)
        except CheckpointError as exc:
            message = f"{exc}; the trial starts again from epoch 1 (Tune keeps no earlier checkpoint of it)"
    print(message, file=sys.stderr, flush=True)
    trial_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / "restarted.txt", "a") as file:
        file.write(message + "\n")
    return None


def _report_checkpoint(metrics: dict, folder: str) -> None:
    """``tune.report`` with a checkpoint; a checkpoint that cannot be stored fails the trial with
    the path it was going to, and what it wrote of it is removed.

    Tune stores the folder under ``storage_path`` and registers it only once it is complete, so the
    trial's previous checkpoint stays the one a restart restores.
    """
    try:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    except OSError as exc:  # a full disk or read-only storage
        storage = tune.get_context().get_storage()
        destination = storage.checkpoint_fs_path
        try:
            storage.storage_filesystem.delete_dir(destination)
        except OSError:
            pass  # nothing was created, or the storage refuses even that; Tune never registered it
        raise CheckpointWriteError(
            f"cannot store the checkpoint of epoch {metrics.get('epoch')} at {destination}: {exc}"
        ) from exc


def make_trainable(
    base: TrainConfig,
    data: SegmentationData,
    *,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    evaluate_test: bool = False,
    checkpoint_every: int = 0,
):
    """The trainable with the dataset put once into the object store and resources attached.

    The base config's folds are computed here, in the driver, and travel with the data (see
    :meth:`SegmentationData.folds`): a trial does not split again."""
    data.folds(base.folds, base.split_seed, base.val_fraction)
    fn = tune.with_parameters(
        training_function,
        base=base.to_dict(),
        data=data,
        evaluate_test=evaluate_test,
        checkpoint_every=checkpoint_every,
    )
    return tune.with_resources(fn, {"cpu": cpus_per_trial, "gpu": gpus_per_trial})


def storage_uri(path: str | os.PathLike) -> str:
    """Tune wants an absolute path or a URI (``s3://``, ``gs://``) as ``storage_path``."""
    text = str(path)
    return text if "://" in text else str(Path(text).expanduser().resolve())


# The Optuna database helpers live in polydice.studydb (the driver's alone: a trial process does not
# import Optuna or SQLAlchemy); these names stay importable from here, and Tune experiments saved
# with polydice.tune.StudyStorage in them still restore.
_STUDYDB_NAMES = ("DB_TIMEOUT_S", "StudyDatabaseError", "StudyStorage", "study_storage")


def __getattr__(name: str):
    if name in _STUDYDB_NAMES:
        from . import studydb

        return getattr(studydb, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_config(
    name: str,
    storage_path: str,
    *,
    max_failures: int = 2,
    stop: dict | None = None,
    verbose: int = 1,
    callbacks: list | None = None,
) -> tune.RunConfig:
    return tune.RunConfig(
        name=name,
        storage_path=storage_uri(storage_path),
        # A trial whose worker dies restarts from its last checkpoint, up to max_failures times.
        failure_config=tune.FailureConfig(max_failures=max_failures),
        # Tune snapshots the experiment (result.json included) to storage at least every
        # num_to_keep trial checkpoints, and a restarted trial copies result.json back from
        # storage over the driver's newer copy: with 2, rows reported before a worker died could
        # vanish from result.json (one run in four of the kill test). With 1, storage holds every
        # row up to the checkpoint the trial restarts from.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        sync_config=tune.SyncConfig(sync_artifacts=True),
        stop=stop,
        verbose=verbose,
        # On resume, a trial whose recorded checkpoint was deleted before the kill continues from
        # the newest one in its folder instead of failing (polydice.resume).
        callbacks=[_missing_checkpoint_fallback(), *(callbacks or [])],
    )


def _missing_checkpoint_fallback():
    from .resume import MissingCheckpointFallback  # the driver's alone: not imported by trials

    return MissingCheckpointFallback(CHECKPOINT_FILE)


# Written into a new experiment's folder (local paths): where it was started.
EXPERIMENT_RECORD = "polydice-experiment.json"


def _check_where_started(experiment_path: str) -> None:
    """Refuse to resume a local experiment away from the folder it was started in.

    Tune restores the search algorithm with the experiment's saved storage path, and creates the
    trials it suggests after a resume there, not in the folder it was restored from: they would
    fail (the old folder is gone) or write into another copy of the study (it is not).
    """
    record = Path(experiment_path) / EXPERIMENT_RECORD
    if "://" in experiment_path or not record.is_file():
        return
    try:
        started = json.loads(record.read_text())["experiment_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable record: nothing to compare; Tune decides
    try:
        same = Path(started).exists() and os.path.samefile(started, experiment_path)
    except OSError:
        same = False
    if not same:
        raise ValueError(
            f"--resume: the Tune experiment at {experiment_path} was started at {started}, and Ray Tune "
            f"{ray.__version__} creates the new trials of a resumed study there, not here; make {started} lead "
            f"here (move the folder back, or a symbolic link {started} -> {experiment_path}) and resume again"
        )


def restore_or_create(
    experiment_path: str,
    trainable: Any,
    make_tuner: Callable[[], tune.Tuner],
    resume: bool,
) -> tune.Tuner:
    """``Tuner.restore`` an interrupted experiment when asked (finished trials are kept, unfinished
    ones continue from their checkpoints, errored ones are retried), else a new ``Tuner``; a new
    experiment in a local folder records that folder in it (:data:`EXPERIMENT_RECORD`).

    Raises:
        ValueError: when ``resume`` is set but there is nothing to resume at ``experiment_path``,
            the experiment was started in another folder (copied or moved here: see
            :func:`_check_where_started`), or what is there cannot be restored (truncated, or written
            by another version of Ray or polydice whose classes this one does not have).
    """
    if resume:
        if not tune.Tuner.can_restore(experiment_path):
            raise ValueError(f"--resume: no Tune experiment to resume at {experiment_path}")
        _check_where_started(experiment_path)
        try:
            return tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True)
        except Exception as exc:  # unpickling runs whatever the saved state names: any error may come
            raise ValueError(
                f"--resume: the Tune experiment at {experiment_path} cannot be restored by Ray {ray.__version__} "
                f"({type(exc).__name__}: {exc}); it is truncated, or was written by another version of Ray or "
                "polydice: resume it with that version, or start a new study (another --study-name)"
            ) from exc
    tuner = make_tuner()
    if "://" not in experiment_path:
        write_json(Path(experiment_path) / EXPERIMENT_RECORD,
                   {"experiment_path": str(Path(experiment_path).absolute()), "ray": ray.__version__})
    return tuner


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
