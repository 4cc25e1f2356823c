"""A run's state and its files: what a checkpoint holds, how it is written and read back, which
config changes a resumed run may make, and the names of the files a run folder holds.

A checkpoint is ``{"version", "config", "run"}``: the format version, the run's
:class:`~polydice.config.TrainConfig` as a dict, and :meth:`RunState.state_dict`. It holds tensors
and plain Python values only, so that it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from .config import TrainConfig
from .model import UNet
from .schedule import EpsilonController

# The files of a run folder.
MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "checkpoint.pt"
# The command line keeps the checkpoint that the last one replaced, for when the last one is unreadable.
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
SUMMARY_FILE = "summary.json"
PER_IMAGE_FILE = "per_image.csv"
EPSILON_FILE = "epsilon.csv"
HISTORY_FILE = "history.csv"
# What a finished run leaves besides its checkpoints and TensorBoard events.
OUTPUT_FILES = (MODEL_FILE, SUMMARY_FILE, PER_IMAGE_FILE, EPSILON_FILE, HISTORY_FILE)

CHECKPOINT_VERSION = 2
# What a version-2 checkpoint holds: {"version", "config", "run"}, "run" being RunState.state_dict().
RUN_STATE_KEYS = ("epoch", "model", "optimizer", "scaler", "controller", "history", "eps_records", "best")
EPSILON_COLUMNS = ["epoch", "index", "difficulty", "epsilon"]

# Fields a resumed run may change: more epochs, or other hardware; none changes what is computed
# per epoch except through the device's arithmetic.
RESUMABLE_CHANGES = {"epochs", "device", "amp", "channels_last", "compile", "num_workers", "mc_memory_gb",
                     "log_maps", "log_every", "tensorboard", "data_dir"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, of another format version, or not a
    polydice checkpoint at all. The message names the file."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, read-only storage); the message names the
    file. Nothing half-written is left under the checkpoint's name."""


@dataclass
class RunResult:
    """Everything a run produces; :func:`write_outputs` turns it into files."""

    summary: dict
    history: pd.DataFrame
    epsilon: pd.DataFrame
    per_image: pd.DataFrame = field(default_factory=pd.DataFrame)


@dataclass
class BestEpoch:
    """The epoch with the highest validation Dice so far and, when kept, its weights."""

    val_dice: float = -math.inf
    epoch: int = 0
    state: dict[str, Tensor] | None = None


@dataclass
class RunState:
    """Everything a run carries from one epoch to the next and across a checkpoint.

    The training loop takes this one object. :meth:`state_dict` holds tensors and plain Python
    values only, so that a checkpoint loads with ``torch.load(..., weights_only=True)``. Random
    state needs no saving: each epoch reseeds from ``(seed, epoch)``.

    Attributes:
        model, optimizer, scaler: the U-Net, its Adam optimizer and the AMP loss scaler.
        controller: the per-image ε table of the adaptive method; ``None`` for the others.
        epoch: the last finished epoch (0 before the first).
        history: one metrics dict per finished epoch.
        eps_records: one ``epoch,index,difficulty,epsilon`` frame per ε refresh.
        best: the best validation epoch so far, with its weights when the run selects them.
    """

    model: UNet
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    controller: EpsilonController | None = None
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    eps_records: list[pd.DataFrame] = field(default_factory=list)
    best: BestEpoch = field(default_factory=BestEpoch)

    def record_validation(self, epoch: int, val_dice: float, keep_weights: bool) -> None:
        """Make ``epoch`` the best one if its validation Dice beats every earlier epoch's."""
        if val_dice > self.best.val_dice:
            weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()} if keep_weights else None
            self.best = BestEpoch(float(val_dice), int(epoch), weights)

    def load_selected_weights(self, select_best: bool) -> tuple[int, float]:
        """Put the weights the run keeps into the model: the best validation epoch's when
        ``select_best`` (else, or when no epoch was validated, the last epoch's).

        Returns:
            ``(epoch, val_dice)`` of those weights.
        """
        if select_best and self.best.state is not None:
            self.model.load_state_dict(self.best.state)
            return self.best.epoch, self.best.val_dice
        return self.epoch, self.history[-1]["val_dice"] if self.history else float("nan")

    def epsilon_table(self) -> pd.DataFrame:
        """Every refresh's ε, ``epoch,index,difficulty,epsilon``, in refresh order."""
        if not self.eps_records:
            return pd.DataFrame(columns=EPSILON_COLUMNS)
        return pd.concat(self.eps_records, ignore_index=True)

    def state_dict(self) -> dict:
        eps = pd.concat(self.eps_records, ignore_index=True) if self.eps_records else None
        eps_columns = None if eps is None else {col: torch.tensor(eps[col].to_numpy()) for col in EPSILON_COLUMNS}
        return {
            "epoch": int(self.epoch),
            "model": _cpu_copy(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "history": [dict(h) for h in self.history],
            "eps_records": eps_columns,
            "best": {
                "val_dice": float(self.best.val_dice),
                "epoch": int(self.best.epoch),
                "state": None if self.best.state is None else _cpu_copy(self.best.state),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; tensors move to the model's device.

        Raises:
            ValueError: when the state has an ε table and this run has no controller, or the
                reverse (another method), or its ε table belongs to other training images.
        """
        if (state["controller"] is None) != (self.controller is None):
            raise ValueError("the saved run and this one differ in whether they have an ε controller")
        device = next(self.model.parameters()).device
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves its state to the parameters' device
        self.scaler.load_state_dict(state["scaler"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
        self.epoch = int(state["epoch"])
        self.history = [dict(h) for h in state["history"]]
        records = state["eps_records"]
        self.eps_records = [] if records is None else [pd.DataFrame({k: v.numpy() for k, v in records.items()})]
        best = state["best"]
        weights = None if best["state"] is None else {k: v.to(device) for k, v in best["state"].items()}
        self.best = BestEpoch(float(best["val_dice"]), int(best["epoch"]), weights)


def _cpu_copy(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def checkpoint_state(cfg: TrainConfig, run: RunState) -> dict:
    """A checkpoint after ``run.epoch``: the config it belongs to and the run's state."""
    return {"version": CHECKPOINT_VERSION, "config": cfg.to_dict(), "run": run.state_dict()}


def _check_version(checkpoint: dict) -> None:
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint format version {checkpoint.get('version')!r}; this polydice reads "
                              f"version {CHECKPOINT_VERSION}")


def restore_checkpoint(checkpoint: dict, cfg: TrainConfig, run: RunState) -> None:
    """Continue ``run`` from ``checkpoint``.

    Raises:
        ValueError: for another checkpoint version (:class:`CheckpointError`), a config that differs
            in a field outside :data:`RESUMABLE_CHANGES`, or fewer ``epochs`` than the checkpoint
            has finished.
    """
    _check_version(checkpoint)
    diff = {
        k: (v, getattr(cfg, k))
        for k, v in checkpoint["config"].items()
        if k not in RESUMABLE_CHANGES and getattr(cfg, k, v) != v
    }
    if diff:
        raise ValueError(f"checkpoint was written with a different config (saved, now): {diff}")
    if checkpoint["run"]["epoch"] > cfg.epochs:
        raise ValueError(f"checkpoint has finished epoch {checkpoint['run']['epoch']}, past epochs={cfg.epochs}")
    run.load_state_dict(checkpoint["run"])


def resumed_config(checkpoint: dict, overrides: dict) -> TrainConfig:
    """The config of a checkpointed run with ``overrides`` applied.

    Raises:
        ValueError: naming every override outside :data:`RESUMABLE_CHANGES` that differs from the
            checkpoint's value, or for another checkpoint version (:class:`CheckpointError`).
    """
    _check_version(checkpoint)
    saved = TrainConfig.from_dict(checkpoint["config"])
    fixed = [
        f"--{k.replace('_', '-')} {v} (the run has {getattr(saved, k)})"
        for k, v in overrides.items()
        if k not in RESUMABLE_CHANGES and v != getattr(saved, k)
    ]
    if fixed:
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUMABLE_CHANGES))
        raise ValueError(f"a resumed run cannot change {'; '.join(fixed)}; it may change only {allowed}")
    return saved.replace(**overrides)


def save_checkpoint(state: dict, path: str | os.PathLike, *, keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically: a process killed mid-write, a full disk or read-only
    storage leaves the previous checkpoint intact and no partial file behind.

    The bytes go to ``<path>.tmp``, are flushed to the disk (``fsync``), and only then replace
    ``path``; a failed write removes the temporary file.

    Args:
        state: :func:`checkpoint_state`.
        path: the checkpoint file.
        keep_previous: keep the checkpoint this one replaces as :data:`PREVIOUS_CHECKPOINT_FILE`
            beside it, for :func:`load_run_checkpoint` to fall back on.

    Raises:
        CheckpointWriteError: the file could not be written; the message names it.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as a RuntimeError
        with suppress(OSError):  # read-only storage refuses even this
            tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    try:
        if keep_previous and path.exists():
            os.replace(path, path.with_name(PREVIOUS_CHECKPOINT_FILE))
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot replace checkpoint {path}: {exc}") from exc


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint with ``weights_only=True`` and check that it is one this code can continue.

    Raises:
        CheckpointError (a ``ValueError``): naming the file, when it is missing, unreadable or
            truncated, not a polydice checkpoint (a ``model.pt``, say), of another format version
            (naming both versions), or lacks part of the run's state.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or not a torch file at all
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a polydice checkpoint (it holds a {type(state).__name__})")
    if "format" in state:  # model.pt and other files that name their format
        raise CheckpointError(f"{path}: a {state['format']!r} file, not a training checkpoint ({CHECKPOINT_FILE})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {state.get('version')!r}, but this polydice reads version "
            f"{CHECKPOINT_VERSION}; it was written by another version of polydice"
        )
    run = state.get("run")
    missing = [k for k in ("config", "run") if not isinstance(state.get(k), dict)]
    missing += [f"run.{k}" for k in RUN_STATE_KEYS if isinstance(run, dict) and k not in run]
    if missing:
        raise CheckpointError(f"{path}: checkpoint version {CHECKPOINT_VERSION} without {', '.join(missing)}")
    return state


def load_run_checkpoint(folder: str | os.PathLike) -> tuple[dict, list[str]]:
    """The newest usable checkpoint of a run folder: ``checkpoint.pt``, else the one it replaced
    (:data:`PREVIOUS_CHECKPOINT_FILE`, kept by the command line).

    Returns:
        The checkpoint, and why each newer file was passed over (empty when ``checkpoint.pt`` is used).

    Raises:
        CheckpointError: naming each file tried, when none is usable.
    """
    problems = []
    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
        path = Path(folder) / name
        if name == PREVIOUS_CHECKPOINT_FILE and not path.exists():
            break
        try:
            return load_checkpoint(path), problems
        except CheckpointError as exc:
            problems.append(str(exc))
    raise CheckpointError("; ".join(problems))


def write_outputs(result: RunResult, out_dir: str | os.PathLike) -> None:
    """``summary.json``, ``history.csv``, ``epsilon.csv`` and (when tested) ``per_image.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(result.summary, indent=2, default=float) + "\n")
    result.history.to_csv(out / HISTORY_FILE, index=False)
    result.epsilon.to_csv(out / EPSILON_FILE, index=False, columns=EPSILON_COLUMNS)
    if len(result.per_image):
        result.per_image.to_csv(out / PER_IMAGE_FILE, index=False)
