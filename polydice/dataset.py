"""A segmentation dataset in memory, and its cross-validation folds.

What every source of data produces: the readers of :mod:`polydice.data` and the generator of
:mod:`polydice.synthetic` both return a :class:`SegmentationData`, whose folds (by image, or by
video sequence for CVC-ClinicDB) are computed once per split and kept with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MIN_IMAGE_SIZE = 8


class DataError(ValueError):
    """A dataset, file or split request that cannot be used; the message names the path."""


@dataclass
class SegmentationData:
    """A whole dataset, decoded and resized, in memory.

    Attributes:
        name: ``'synthetic'``, ``'kvasir'`` or ``'cvc'``.
        images: ``(N, S, S, 3)`` uint8 RGB.
        masks: ``(N, S, S)`` uint8 in {0, 1}.
        groups: ``(N,)`` int64, the unit that folds never split: the video sequence for
            CVC-ClinicDB, one distinct group per image otherwise.
        names: ``N`` file stems (or ids for the synthetic set).

    Raises:
        DataError: if the arrays do not have these shapes and dtypes or disagree on N.
    """

    name: str
    images: np.ndarray
    masks: np.ndarray
    groups: np.ndarray
    names: list[str]
    # (n_folds, seed, val_fraction) -> make_folds' result; see folds().
    _folds: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] != 3:
            raise DataError(f"images must be (N, S, S, 3) uint8, got {self.images.shape} {self.images.dtype}")
        if self.masks.dtype != np.uint8 or self.masks.shape != self.images.shape[:3]:
            raise DataError(
                f"masks must be {self.images.shape[:3]} uint8 to match the images, "
                f"got {self.masks.shape} {self.masks.dtype}"
            )
        if self.groups.shape != (n,) or len(self.names) != n:
            raise DataError(
                f"{n} images need {n} groups and names, got {self.groups.shape} groups, {len(self.names)} names"
            )

    @property
    def n_groups(self) -> int:
        """Number of distinct groups (video sequences for CVC-ClinicDB)."""
        return int(np.unique(self.groups).size)

    def __len__(self) -> int:
        return len(self.images)

    def folds(self, n_folds: int = 5, seed: int = 0, val_fraction: float = 0.2) -> list:
        """:func:`make_folds` of this dataset's groups, computed once per argument set and kept
        with the data: a study computes its folds in the driver before the data goes to the
        trials, which then neither split again nor load scikit-learn (about 1 s per trial process)."""
        key = (int(n_folds), int(seed), float(val_fraction))
        if key not in self._folds:
            self._folds[key] = make_folds(self.groups, n_folds, seed=seed, val_fraction=val_fraction)
        return self._folds[key]


def make_folds(
    groups, n_folds: int = 5, seed: int = 0, val_fraction: float = 0.2
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cross-validation folds with an inner validation split, never splitting a group.

    The test parts come from ``KFold(shuffle=True, random_state=seed)`` when every image is its
    own group (Kvasir-SEG, synthetic) and from ``GroupKFold`` otherwise (CVC-ClinicDB sequences;
    shuffled with ``seed`` where scikit-learn >= 1.6 supports it). Each fold's validation part is
    ``GroupShuffleSplit(test_size=val_fraction, random_state=seed + fold)`` of its training part.

    Args:
        groups: ``(N,)`` group of each image (``SegmentationData.groups``).
        n_folds: number of folds, 2 <= n_folds <= number of groups.
        seed: seed of the shuffles.
        val_fraction: fraction of the training part's groups held out for validation, in (0, 1).

    Returns:
        ``n_folds`` tuples ``(train, val, test)`` of sorted int64 index arrays; the test parts
        partition ``range(N)`` and no group appears in two parts of one fold.

    Raises:
        DataError: n_folds < 2 or more folds than groups; val_fraction outside (0, 1); a training
            part with too few groups to hold out a validation part.
    """
    # Imported here: a trial process that gets its folds with the data never needs scikit-learn.
    from sklearn.model_selection import GroupKFold, GroupShuffleSplit, KFold

    groups = np.asarray(groups).reshape(-1)
    n_groups = np.unique(groups).size
    if n_folds < 2:
        raise DataError(f"n_folds must be >= 2, got {n_folds}")
    if n_folds > n_groups:
        raise DataError(
            f"cannot make {n_folds} folds from {n_groups} groups: every test part needs a whole "
            "group (a video sequence for CVC-ClinicDB, an image otherwise)"
        )
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")

    if n_groups == len(groups):
        splits = KFold(n_folds, shuffle=True, random_state=seed).split(groups)
    else:
        # Shuffled, seeded group folds need scikit-learn >= 1.6 (the floor in pyproject.toml).
        splits = GroupKFold(n_folds, shuffle=True, random_state=seed).split(groups, groups=groups)

    folds = []
    for fold, (train_val, test) in enumerate(splits):
        inner = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=seed + fold)
        try:
            train, val = next(inner.split(train_val, groups=groups[train_val]))
        except ValueError as error:
            raise DataError(
                f"fold {fold}: its training part has {np.unique(groups[train_val]).size} group(s), "
                f"too few to hold out val_fraction={val_fraction}: {error}"
            ) from error
        folds.append(tuple(np.sort(part).astype(np.int64) for part in (train_val[train], train_val[val], test)))
    return folds
