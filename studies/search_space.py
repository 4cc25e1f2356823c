"""The search space of the adaptive controller, a picklable define-by-run object.

Tune checkpoints the searcher by pickling it, so the space is a module-level class (a closure
would not pickle) in a module the driver can import again on ``--resume``.
"""

from __future__ import annotations

import optuna

# The thesis configuration (Sec. 4.1.2), evaluated first.
THESIS = dict(k=2.0, q=25.0, e0=10, tau=10, eps_min=0.0, eps_max=0.5)


def search_ranges(epochs: int) -> dict:
    """Bounds of the search; E0 and τ scale with the epoch budget."""
    return dict(
        k=(0.25, 16.0),
        q=(5.0, 75.0),
        e0=(1, max(2, epochs // 2)),
        tau=(1, max(2, epochs // 4)),
        eps_min=(-0.3, 0.3),
        eps_max_above_min=(0.05, 1.0),
    )


class AdaptiveSpace:
    """Define-by-run space: ε_max is drawn above ε_min, so every proposal has ε_min < ε_max.

    ``constants`` (e.g. the outer fold a nested search belongs to) are added to every proposal
    without being searched: Ray's OptunaSearch merges a define-by-run function's returned dict
    into the trial's config.
    """

    def __init__(self, epochs: int, constants: dict | None = None):
        self.epochs = epochs
        self.constants = dict(constants or {})

    def __call__(self, trial: optuna.Trial) -> dict | None:
        r = search_ranges(self.epochs)
        trial.suggest_float("k", *r["k"], log=True)
        trial.suggest_float("q", *r["q"])
        trial.suggest_int("e0", *r["e0"])
        trial.suggest_int("tau", *r["tau"])
        eps_min = trial.suggest_float("eps_min", *r["eps_min"])
        low, high = r["eps_max_above_min"]
        trial.suggest_float("eps_max", eps_min + low, eps_min + high)
        return dict(self.constants) or None


def thesis_point(epochs: int) -> dict:
    """The thesis configuration, E0 and τ clipped into the range of a shorter run."""
    r = search_ranges(epochs)
    point = dict(THESIS)
    point["e0"] = min(max(point["e0"], r["e0"][0]), r["e0"][1])
    point["tau"] = min(max(point["tau"], r["tau"][0]), r["tau"][1])
    return point
