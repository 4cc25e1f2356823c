"""polydice: uncertainty-adaptive PolyDice training for medical image segmentation.

The pieces for a training loop of one's own::

    from polydice import PolyDiceLoss, EpsilonController, estimate_uncertainty, UNet

They are imported on first use, so that ``import polydice`` itself stays instant (no torch, and
never Ray, which only ``polydice.tune`` and ``polydice.resume`` import).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "PolyDiceLoss": "losses",
    "polydice_loss": "losses",
    "build_loss": "losses",
    "EpsilonController": "schedule",
    "refresh_epochs": "schedule",
    "estimate_uncertainty": "uncertainty",
    "mutual_information": "uncertainty",
    "difficulty_scores": "uncertainty",
    "epsilon_from_difficulty": "uncertainty",
    "UNet": "model",
    "mc_dropout_mode": "model",
    "load_model_file": "model",
    "TrainConfig": "config",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'polydice' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
