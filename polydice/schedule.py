"""The adaptive ε controller of thesis Algorithm 1.

Refresh epochs are 1-based: epoch e refreshes when ``e ≥ E0`` and ``(e − E0) mod τ = 0``, before
its training starts; E0 = 0 behaves as E0 = 1. Until the first refresh every ε is 0. The ε of each
training image is kept by its dataset index, so batches drawn in any order look their ε up, and
the table survives a checkpoint through ``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .uncertainty import epsilon_from_difficulty


def _effective_e0(e0: int) -> int:
    return max(int(e0), 1)


def refresh_epochs(epochs: int, E0: int, tau: int) -> list[int]:
    """1-based epochs in ``1..epochs`` at which ε is refreshed (Algorithm 1, line 4).

    Raises:
        ValueError: for ``tau < 1``, a negative ``E0`` or negative ``epochs``.
    """
    if tau < 1:
        raise ValueError(f"tau must be >= 1, got {tau}")
    if E0 < 0:
        raise ValueError(f"E0 must be >= 0, got {E0}")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    return list(range(_effective_e0(E0), int(epochs) + 1, int(tau)))


class EpsilonController:
    """Per-image ε of the training images, refreshed from MC-Dropout difficulty on schedule.

    Args:
        indices: dataset indices of the training images (the keys of the ε table).
        e0: first refresh epoch E0 (1-based; 0 behaves as 1).
        tau: refresh interval τ ≥ 1.
        q, k, eps_min, eps_max, delta: the mapping of :func:`epsilon_from_difficulty`.

    Raises:
        ValueError: for duplicate indices, ``tau < 1`` or ``eps_min > eps_max``.
    """

    def __init__(
        self,
        indices,
        e0: int = 10,
        tau: int = 10,
        q: float = 25,
        k: float = 2.0,
        eps_min: float = 0.0,
        eps_max: float = 0.5,
        delta: float = 1e-8,
    ):
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or len(np.unique(indices)) != len(indices):
            raise ValueError("indices must be a 1-D array of distinct dataset indices")
        if tau < 1 or e0 < 0:
            raise ValueError(f"need tau >= 1 and e0 >= 0, got tau={tau}, e0={e0}")
        if eps_min > eps_max:
            raise ValueError(f"eps_min ({eps_min}) must not exceed eps_max ({eps_max})")
        self.e0, self.tau, self.q, self.k = int(e0), int(tau), float(q), float(k)
        self.eps_min, self.eps_max, self.delta = float(eps_min), float(eps_max), float(delta)
        # A copy: the folds of a Tune trial come read-only from Ray's object store.
        self.indices = torch.tensor(indices)
        size = int(indices.max()) + 1 if len(indices) else 0
        # Dense lookup: dataset index -> row of the table (-1 for images that are not training images).
        self._row = torch.full((size,), -1, dtype=torch.long)
        self._row[self.indices] = torch.arange(len(indices))
        self.epsilon = torch.zeros(len(indices), dtype=torch.float32)
        self.difficulty = torch.zeros(len(indices), dtype=torch.float64)
        self.last_refresh = 0  # epoch of the latest refresh, 0 before the first

    def should_refresh(self, epoch: int) -> bool:
        """Whether ε is refreshed before training epoch ``epoch`` (1-based)."""
        e0 = _effective_e0(self.e0)
        return epoch >= e0 and (epoch - e0) % self.tau == 0

    def update(self, epoch: int, difficulty: Tensor) -> Tensor:
        """Set every training image's ε from its difficulty ``(N,)`` (same order as ``indices``).

        Returns:
            The new ε table ``(N,)``.
        """
        difficulty = torch.as_tensor(difficulty, dtype=torch.float64).cpu()
        if difficulty.shape != (len(self.indices),):
            raise ValueError(f"difficulty must be ({len(self.indices)},), got {tuple(difficulty.shape)}")
        eps = epsilon_from_difficulty(difficulty, self.q, self.k, self.eps_min, self.eps_max, self.delta)
        self.difficulty = difficulty.clone()
        self.epsilon = eps.float()
        self.last_refresh = int(epoch)
        return self.epsilon

    def epsilon_for(self, dataset_indices: Tensor) -> Tensor:
        """ε ``(B,)`` of a batch, looked up by the images' dataset indices."""
        dataset_indices = torch.as_tensor(dataset_indices, dtype=torch.long).cpu()
        if len(dataset_indices) and (dataset_indices.max() >= len(self._row) or dataset_indices.min() < 0):
            raise KeyError(f"dataset index out of range of the training table: {dataset_indices.tolist()}")
        rows = self._row[dataset_indices]
        if (rows < 0).any():
            missing = dataset_indices[rows < 0].tolist()
            raise KeyError(f"images {missing} are not training images of this controller")
        return self.epsilon[rows]

    def state_dict(self) -> dict:
        return {
            "indices": self.indices.clone(),
            "epsilon": self.epsilon.clone(),
            "difficulty": self.difficulty.clone(),
            "last_refresh": self.last_refresh,
            "e0": self.e0,
            "tau": self.tau,
            "q": self.q,
            "k": self.k,
            "eps_min": self.eps_min,
            "eps_max": self.eps_max,
            "delta": self.delta,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the ε table; the training indices must be the same images.

        Raises:
            ValueError: when the checkpoint belongs to another training set.
        """
        if not torch.equal(torch.as_tensor(state["indices"]), self.indices):
            raise ValueError("checkpointed ε table belongs to a different set of training images")
        for key in ("e0", "tau", "q", "k", "eps_min", "eps_max", "delta"):
            setattr(self, key, type(getattr(self, key))(state[key]))
        self.epsilon = torch.as_tensor(state["epsilon"], dtype=torch.float32).clone()
        self.difficulty = torch.as_tensor(state["difficulty"], dtype=torch.float64).clone()
        self.last_refresh = int(state["last_refresh"])
