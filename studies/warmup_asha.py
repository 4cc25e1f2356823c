"""ASHA early stopping that waits for each trial's own ε warm-up.

A trial of the adaptive search trains with ε = 0 until epoch E0; from E0 on its ε is refreshed
every τ epochs. Before epoch ``E0 + τ`` its validation Dice says little about its controller
settings, so :class:`WarmupASHA` never stops a trial before then, and from then on applies ASHA's
rungs as usual. The warm-up is the trial's own (``e0`` and ``tau`` of its config), not the largest
the search can propose, so the rungs can start early: a 200-epoch search with rungs at epochs
2, 6, 18, 54 and 162 judges a trial with E0 = 10, τ = 10 from epoch 54 on, and one with E0 = 2,
τ = 3 from epoch 6 on.

``epochs_saved`` counts what the stopping saved, from the results of a search.
"""

from __future__ import annotations

from typing import Iterable

from ray.tune.schedulers import ASHAScheduler, TrialScheduler


def warmup_epochs(config: dict, default: int = 0) -> int:
    """``E0 + τ`` of a trial's config (E0 = 0 acts as 1, as in the ε controller); ``default``
    when the config has no ``e0`` or ``tau``."""
    if "e0" not in config or "tau" not in config:
        return default
    return max(int(config["e0"]), 1) + int(config["tau"])


class WarmupASHA(ASHAScheduler):
    """Tune's ASHA (``AsyncHyperBandScheduler``) that never stops a trial before its warm-up.

    While ``result[time_attr] < E0 + τ`` of the trial, every result continues. The rungs the
    trial passes meanwhile still record its value at their milestone (ASHA's bookkeeping: a rung
    holds each trial's value at the rung's own epoch), without a decision. So the rungs below a
    trial's warm-up keep their full population, and the trial is judged first at the first rung
    at or after its warm-up. (Merely skipping its results during the warm-up would leave those
    rungs empty for it, and ASHA would then fill them one per later epoch, judging the trial on
    a low rung by a value from a later epoch and raising that rung's cutoff for everyone else.)

    Args:
        default_warmup: warm-up of trials whose config has no ``e0`` or ``tau`` (0: none beyond
            ASHA's ``grace_period``).
        **asha_kwargs: ``ASHAScheduler``'s own (``time_attr`` must count epochs: ``"epoch"``).

    Raises:
        ValueError: for a negative ``default_warmup``.
    """

    def __init__(self, *, default_warmup: int = 0, **asha_kwargs):
        if default_warmup < 0:
            raise ValueError(f"default_warmup must be >= 0, got {default_warmup}")
        super().__init__(**asha_kwargs)
        self._default_warmup = int(default_warmup)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        t = result.get(self._time_attr)
        value = result.get(self._metric)
        if t is None or value is None or t >= self._max_t or t >= warmup_epochs(trial.config, self._default_warmup):
            return super().on_trial_result(tune_controller, trial, result)
        bracket = self._trial_info[trial.trial_id]
        for milestone, recorded in bracket._rungs:
            if t >= milestone and trial.trial_id not in recorded:
                recorded[trial.trial_id] = self._metric_op * value
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return super().debug_string().replace("AsyncHyperBand", "WarmupASHA", 1)


def epochs_saved(results: Iterable, max_t: int, time_attr: str = "epoch") -> dict:
    """What early stopping saved in a finished search.

    Args:
        results: Tune ``Result`` objects (a ``ResultGrid``); each has ``metrics`` (its last result)
            and ``error``. Failed trials and trials that never reported are left out.
        max_t: epochs of a trial that is not stopped.

    Returns:
        ``trials`` (counted), ``stopped`` (ended before ``max_t``), ``epochs_run`` (Σ last epoch),
        ``epochs_saved`` (Σ ``max_t`` − last epoch) and ``fraction_saved`` (of ``trials × max_t``).
    """
    last = [int(r.metrics[time_attr]) for r in results if r.error is None and time_attr in (r.metrics or {})]
    run = sum(min(e, max_t) for e in last)
    saved = len(last) * max_t - run
    return dict(trials=len(last), stopped=sum(e < max_t for e in last), epochs_run=run, epochs_saved=saved,
                fraction_saved=saved / (len(last) * max_t) if last else 0.0)
