"""One frozen dataclass holds every hyperparameter of a training run.

Ray Tune's ``param_space`` keys are these field names; :meth:`TrainConfig.replace` rejects any
other key, so a typo in a search space fails at once instead of being silently ignored.
Defaults are the thesis settings (Sec. 4.1.2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

METHODS = ("adaptive", "polydice", "dice", "focal", "ce_dice", "pm_dice", "dsc_pp", "dice_linear")
DATASETS = ("synthetic", "kvasir", "cvc")
# The two readings of PolyDice's scale s (polydice.losses.scale_and_angle).
SCALES = ("norm", "inner")


def _field(default, help: str, choices: tuple[str, ...] | None = None):
    """A config field with its command-line help (``python -m polydice.train --help``)."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one run: one method on one fold.

    Every field carries its meaning as ``help`` metadata (and ``choices`` where its values are a
    fixed set); the training command line is generated from them, one flag per field. The groups:

    - Data: where the images come from, the fold, the inner validation split, augmentation.
    - Method: the loss and its parameters.
    - Controller: the per-image ε of Algorithm 1 (adaptive method only).
    - Optimisation: Adam, the U-Net's width and dropout, the seed, model selection.
    - Hardware: device, mixed precision, loader processes, MC memory budget.
    - Evaluation and logging; Debugging (``max_batches`` for smoke runs).
    """

    # Data
    dataset: str = _field("synthetic", "dataset; synthetic is generated in memory and needs no files",
                          choices=DATASETS)
    data_dir: str | None = _field(None, "folder of the kvasir or cvc images")
    image_size: int = _field(224, "side in pixels every image is resized to (a multiple of 16)")
    n_synthetic: int = _field(160, "images of the synthetic set")
    fold: int = _field(0, "the cross-validation fold that is the test part (0-based)")
    folds: int = _field(5, "number of cross-validation folds")
    val_fraction: float = _field(0.2, "inner validation split taken (by group) from the fold's training part")
    sequence_csv: str | None = _field(None, "CVC-ClinicDB frame,sequence CSV overriding the 29 official sequences")
    split_seed: int = _field(0, "seeds the folds and the synthetic set (not seed), so that every method and "
                                "trial sees the same splits")
    augment: bool = _field(True, "flips and brightness/contrast, each p = 0.5")

    # Method
    method: str = _field("adaptive", "loss; adaptive is PolyDice-1 with per-image ε, polydice uses the fixed --eps",
                         choices=METHODS)
    eps: float = _field(0.0, "fixed ε of the polydice method")
    order: int = _field(1, "PolyDice order K")
    polydice_scale: str = _field("norm", "PolyDice scale s: norm is the s of thesis Eq. 2; inner is the thesis's "
                                         "printed s (an ablation)", choices=SCALES)
    focal_gamma: float = _field(2.0, "γ of the focal loss")
    pm_gamma: float = _field(1.0, "γ of PM Dice")
    dscpp_gamma: float = _field(2.0, "γ of DSC++ (2 is the dice method on binary masks, 1 is dice_linear)")
    pm_include_background: bool = _field(True, "PM Dice averages background and foreground (its Eq. 5); "
                                               "off: foreground only")

    # Controller (Algorithm 1)
    e0: int = _field(10, "E0: first ε refresh epoch (1-based; 0 acts as 1)")
    tau: int = _field(10, "τ: epochs between ε refreshes")
    mc_samples: int = _field(10, "T: MC-Dropout samples per refresh")
    q: float = _field(25.0, "percentile D_q of the difficulty normalisation (Eq. 12)")
    k: float = _field(2.0, "slope k of the sigmoid control (Eq. 13)")
    eps_min: float = _field(0.0, "lower end of ε")
    eps_max: float = _field(0.5, "upper end of ε")
    delta: float = _field(1e-8, "δ of the difficulty normalisation (Eq. 12)")

    # Optimisation
    epochs: int = _field(200, "training epochs")
    batch_size: int = _field(32, "images per batch")
    lr: float = _field(1e-3, "Adam learning rate")
    weight_decay: float = _field(0.0, "Adam weight decay")
    base_channels: int = _field(64, "U-Net width c (64 in the thesis; 8-16 for CPU runs)")
    dropout: float = _field(0.5, "dropout rate p after down4 and after up4")
    seed: int = _field(0, "seeds the initial weights, the batches, augmentation and MC-Dropout")
    select_best: bool = _field(True, "test and keep the weights of the epoch with the best validation Dice; "
                                     "off: the last epoch's")

    # Hardware
    device: str = _field("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    amp: bool = _field(True, "mixed precision (bf16, else fp16) on CUDA")
    channels_last: bool = _field(True, "channels-last tensors on CUDA")
    compile: bool = _field(False, "torch.compile the model")
    num_workers: int = _field(0, "data loader processes")
    mc_memory_gb: float = _field(2.0, "memory budget of the batched MC-Dropout decoder, GiB")

    # Evaluation and logging
    nsd_tolerance: float = _field(2.0, "tolerance of the normalised surface Dice, pixels")
    tag: str = _field("", "label of the run in reports, e.g. adaptive-tuned")
    log_maps: int = _field(4, "images whose uncertainty maps go to TensorBoard at each refresh")
    log_every: int = _field(20, "training steps between checks of the loss on the host")
    tensorboard: bool = _field(True, "write TensorBoard events")

    # Debugging
    max_batches: int = _field(0, "at most this many batches per training epoch and per validation (0: all), "
                                 "for smoke runs; ε refreshes and the test see every image")

    def __post_init__(self) -> None:
        errors = []
        if self.method not in METHODS:
            errors.append(f"unknown method {self.method!r}; valid methods: {', '.join(METHODS)}")
        if self.dataset not in DATASETS:
            errors.append(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(DATASETS)}")
        if self.dataset != "synthetic" and not self.data_dir:
            errors.append(f"dataset {self.dataset!r} needs data_dir (the folder holding the images)")
        if self.image_size < 16 or self.image_size % 16:
            errors.append(f"image_size must be a multiple of 16 (four 2x poolings), got {self.image_size}")
        if not 0 <= self.fold < self.folds:
            errors.append(f"fold must be in [0, {self.folds}), got {self.fold}")
        if self.folds < 2:
            errors.append(f"folds must be >= 2, got {self.folds}")
        if not 0.0 < self.val_fraction < 1.0:
            errors.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.e0 < 0 or self.tau < 1:
            errors.append(f"need e0 >= 0 and tau >= 1, got e0={self.e0}, tau={self.tau}")
        if self.mc_samples < 2:
            errors.append(f"mc_samples (T) must be >= 2, got {self.mc_samples}")
        if not 0.0 <= self.q <= 100.0:
            errors.append(f"q must be a percentile in [0, 100], got {self.q}")
        if self.eps_min > self.eps_max:
            errors.append(f"eps_min ({self.eps_min}) must not exceed eps_max ({self.eps_max})")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            errors.append(f"need epochs >= 1, batch_size >= 1, lr > 0; got {self.epochs}, {self.batch_size}, {self.lr}")
        if self.base_channels < 1:
            errors.append(f"base_channels must be >= 1, got {self.base_channels}")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.method == "adaptive" and self.dropout == 0.0:
            errors.append("the adaptive method needs dropout > 0 for MC-Dropout")
        if self.max_batches < 0:
            errors.append(f"max_batches must be >= 0 (0: all batches), got {self.max_batches}")
        if self.polydice_scale not in SCALES:
            errors.append(f"polydice_scale must be one of {', '.join(SCALES)}, got {self.polydice_scale!r}")
        if self.order < 1:
            errors.append(f"order must be >= 1, got {self.order}")
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, **overrides) -> "TrainConfig":
        """A copy with ``overrides`` applied.

        Raises:
            ValueError: for a key that is not a field (the message lists the unknown keys), or an
                invalid value.
        """
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown TrainConfig keys: {', '.join(unknown)}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a mapping (e.g. a Tune config or a ``summary.json``), rejecting unknown keys."""
        return cls().replace(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def uses_controller(self) -> bool:
        return self.method == "adaptive"


# The per-fold Dice-loss replicate whose per-image test Dice selects the thesis's "cases difficult for
# conventional methods" (studies/grid_baselines.py trains it, studies/report.py reads it). It trains
# with a seed no compared run uses, so its own noise picks the set and no compared run judges it.
SELECTION_TAG = "dice-select"
SELECTION_SEED_OFFSET = 10_000  # its seed: the study's --seed plus this; compared runs use --seed + 0 … N−1


def run_label(config: dict) -> str:
    """A run's label in reports and predictions, from its config dict (``TrainConfig.to_dict()``):
    ``tag`` if set, else the method (``polydice-eps+0.2`` for a fixed ε), as the studies name runs."""
    if config.get("tag"):
        return str(config["tag"])
    if config.get("method") == "polydice":
        return f"polydice-eps{float(config.get('eps', 0.0)):+.1f}"
    return str(config.get("method"))
