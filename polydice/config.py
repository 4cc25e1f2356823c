"""One frozen dataclass holds every hyperparameter of a training run.

Ray Tune's ``param_space`` keys are these field names; :meth:`TrainConfig.replace` rejects any
other key, so a typo in a search space fails at once instead of being silently ignored.
Defaults are the thesis settings (Sec. 4.1.2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

METHODS = ("adaptive", "polydice", "dice", "focal", "ce_dice", "pm_dice", "dsc_pp")
DATASETS = ("synthetic", "kvasir", "cvc")
# The two readings of PolyDice's scale s (polydice.losses.scale_and_angle).
SCALES = ("norm", "inner")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one run: one method on one fold.

    Data:
        dataset, data_dir, image_size, n_synthetic (images of the synthetic set), fold, folds,
        val_fraction (inner validation split taken by group from the fold's training part),
        sequence_csv (CVC ``frame,sequence`` overrides), split_seed (folds and the synthetic set
        are seeded by it, not by ``seed``, so every method and trial sees the same splits), augment.
    Method:
        method (one of ``METHODS``; ``adaptive`` is PolyDice-1 with per-image ε), eps (fixed ε of
        ``polydice``), order (PolyDice-K), polydice_scale (``"norm"``: the s of thesis Eq. 2, the
        default; ``"inner"``: the thesis's printed s, an ablation), focal_gamma, pm_gamma,
        dscpp_gamma, pm_include_background (PM Dice averages background and foreground as its
        Eq. 5; ``False``: foreground only).
    Controller (Algorithm 1):
        e0, tau, mc_samples (T), q, k, eps_min, eps_max, delta.
    Optimisation:
        epochs, batch_size, lr, weight_decay, base_channels, dropout, seed, select_best (test the
        weights of the epoch with the best validation Dice rather than the last epoch's).
    Hardware:
        device (``auto`` picks CUDA when present), amp and channels_last (used on CUDA only),
        compile (``torch.compile`` the model), num_workers (loader processes), mc_memory_gb
        (memory budget of the batched MC decoder).
    Evaluation and logging:
        nsd_tolerance (pixels), tag (label of the run in reports, e.g. ``adaptive-tuned``), log_maps (uncertainty maps written per refresh), log_every
        (steps between synchronising loss scalars), tensorboard.
    Debugging:
        max_batches (at most this many batches per training epoch and per validation pass; 0:
        all. For smoke runs and benchmarks; ε refreshes and the test see every image).
    """

    dataset: str = "synthetic"
    data_dir: str | None = None
    image_size: int = 224
    n_synthetic: int = 160
    fold: int = 0
    folds: int = 5
    val_fraction: float = 0.2
    sequence_csv: str | None = None
    split_seed: int = 0
    augment: bool = True

    method: str = "adaptive"
    eps: float = 0.0
    order: int = 1
    polydice_scale: str = "norm"
    focal_gamma: float = 2.0
    pm_gamma: float = 1.0
    dscpp_gamma: float = 2.0
    pm_include_background: bool = True

    e0: int = 10
    tau: int = 10
    mc_samples: int = 10
    q: float = 25.0
    k: float = 2.0
    eps_min: float = 0.0
    eps_max: float = 0.5
    delta: float = 1e-8

    epochs: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    base_channels: int = 64
    dropout: float = 0.5
    seed: int = 0
    select_best: bool = True

    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    num_workers: int = 0
    mc_memory_gb: float = 2.0

    nsd_tolerance: float = 2.0
    tag: str = ""
    log_maps: int = 4
    log_every: int = 20
    tensorboard: bool = True

    max_batches: int = 0

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
