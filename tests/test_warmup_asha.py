"""WarmupASHA: no trial is stopped before its own E0 + τ epochs, ASHA's rungs apply after it.

A scripted trainable (no model: each epoch it reports a score fixed by its config) runs under a
real local Tune, Ray bound to loopback, once with plain ASHA and once with WarmupASHA; the rung
bookkeeping is checked directly on the scheduler with stand-in trials.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

# Before Ray is imported: Ray reads this once, at import, to decide which interfaces to bind.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402

pytest.importorskip("ray.tune")

from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler, TrialScheduler  # noqa: E402

import ray_fixtures as rf  # noqa: E402

sys.path.insert(0, str(rf.STUDIES))
from warmup_asha import WarmupASHA, epochs_saved, warmup_epochs  # noqa: E402

MAX_T = 30  # rungs of grace 1, reduction factor 3: epochs 1, 3, 9, 27
ASHA = dict(time_attr="epoch", max_t=MAX_T, grace_period=1, reduction_factor=3)

# name -> (e0, tau, score before the warm-up ends, score from then on, growth per epoch)
TRIALS = {
    "steady": (1, 1, 0.5, 0.5, 0.01),    # good from the start; runs to the end under both
    "late": (6, 3, 0.1, 0.9, 0.0),       # poor until its adaptation acts at epoch 9, then the best
    "bad": (1, 2, 0.2, 0.2, 0.001),      # poor throughout, warm-up over at epoch 3
    "slow_bad": (8, 4, 0.3, 0.3, 0.0),   # poor throughout, warm-up over at epoch 12
    # Poor throughout, warm-up over at epoch 4: the rung at 3 = E0 + τ − 1 is still its warm-up, so
    # it is judged at 9 (stopped at 3 if the warm-up ended an epoch early).
    "edge_bad": (2, 2, 0.25, 0.25, 0.0),
}


def score(name: str, epoch: int) -> float:
    e0, tau, before, after, growth = TRIALS[name]
    return (before if epoch < e0 + tau else after) + growth * epoch


def scripted_trainable(config: dict) -> None:
    for epoch in range(1, MAX_T + 1):
        tune.report({"epoch": epoch, "score": score(config["name"], epoch)})


# ----------------------------------------------------------------------------- bookkeeping


def _scheduler(cls=WarmupASHA, **kwargs):
    sched = cls(**ASHA, **kwargs)
    sched.set_search_properties("score", "max")
    return sched


def _feed(sched, name: str, config: dict | None = None) -> tuple[list[str], SimpleNamespace]:
    """Report ``name``'s scores epoch by epoch until a STOP; returns the decisions."""
    if config is None:
        e0, tau = TRIALS[name][:2]
        config = dict(name=name, e0=e0, tau=tau)
    trial = SimpleNamespace(trial_id=name, config=config)
    sched.on_trial_add(None, trial)
    actions = []
    for epoch in range(1, MAX_T + 1):
        actions.append(sched.on_trial_result(None, trial, {"epoch": epoch, "score": score(name, epoch)}))
        if actions[-1] == TrialScheduler.STOP:
            break
    return actions, trial


def test_warmup_epochs():
    assert warmup_epochs({"e0": 10, "tau": 10}) == 20
    assert warmup_epochs({"e0": 0, "tau": 3}) == 4  # E0 = 0 refreshes first before epoch 1
    assert warmup_epochs({"k": 2.0}, default=7) == 7
    with pytest.raises(ValueError, match="default_warmup"):
        WarmupASHA(default_warmup=-1, **ASHA)


def test_rungs_hold_each_trials_value_at_their_own_epoch():
    sched = _scheduler()
    stops = {}
    for name in TRIALS:
        actions, _ = _feed(sched, name)
        stops[name] = len(actions) if actions[-1] == TrialScheduler.STOP else None
        e0, tau = TRIALS[name][:2]
        assert TrialScheduler.STOP not in actions[: e0 + tau - 1], (name, actions)
    assert stops == {"steady": MAX_T, "late": MAX_T, "bad": 3, "slow_bad": 27, "edge_bad": 9}
    rungs = {int(m): recorded for m, recorded in sched._brackets[0]._rungs}
    for milestone, recorded in rungs.items():
        for name, value in recorded.items():
            assert value == pytest.approx(score(name, milestone)), (milestone, name)
    # The warm-up trials are in the low rungs too; a stopped trial only up to its stop.
    assert set(rungs[1]) == set(rungs[3]) == set(TRIALS)
    assert set(rungs[9]) == {"steady", "late", "slow_bad", "edge_bad"}
    assert set(rungs[27]) == {"steady", "late", "slow_bad"}


def test_a_rung_one_epoch_before_the_warmup_ends_does_not_judge():
    """E0 = 2, τ = 2 (warm-up over at epoch 4), rungs 1 / 3 / 9 / 27: the rung at epoch 3 records
    the trial's value without a decision, though the trial would not pass its cutoff; the trial is
    stopped at the next rung, 9."""
    sched = _scheduler()
    for name in ("steady", "late", "bad", "slow_bad"):
        _feed(sched, name)
    rungs = {int(m): recorded for m, recorded in sched._brackets[0]._rungs}
    assert score("edge_bad", 3) < sched._brackets[0].cutoff(rungs[3])  # a decision at epoch 3 would stop it
    actions, _ = _feed(sched, "edge_bad")
    assert actions == [TrialScheduler.CONTINUE] * 8 + [TrialScheduler.STOP], actions
    assert rungs[3]["edge_bad"] == pytest.approx(score("edge_bad", 3))


def test_trials_without_e0_and_tau_use_the_default_warmup():
    sched = _scheduler(default_warmup=9)
    _feed(sched, "steady")
    actions, _ = _feed(sched, "bad", config={"name": "bad"})
    assert actions[-1] == TrialScheduler.STOP and len(actions) == 9
    sched = _scheduler()
    _feed(sched, "steady")
    actions, _ = _feed(sched, "bad", config={"name": "bad"})
    assert len(actions) == 1  # no warm-up: ASHA's first rung


def test_epochs_saved():
    results = [SimpleNamespace(metrics={"epoch": e}, error=None) for e in (30, 3, 27)]
    results += [SimpleNamespace(metrics={"epoch": 5}, error=RuntimeError()), SimpleNamespace(metrics={}, error=None)]
    assert epochs_saved(results, MAX_T) == dict(trials=3, stopped=2, epochs_run=60, epochs_saved=30,
                                                fraction_saved=pytest.approx(30 / 90))


# ----------------------------------------------------------------------------- real Tune


@pytest.fixture(scope="module")
def local_ray():
    with rf.local_ray("pdasha", 1, by_value=__name__):
        yield


def _run(scheduler, storage: Path) -> tuple[dict, tune.ResultGrid]:
    """The four trials one after the other (ASHA's decisions depend on the order).

    Returns:
        ``{name: last epoch}`` and the results.
    """
    param_space = {
        "name": tune.grid_search(list(TRIALS)),
        "e0": tune.sample_from(lambda spec: TRIALS[spec.config.name][0]),
        "tau": tune.sample_from(lambda spec: TRIALS[spec.config.name][1]),
    }
    results = tune.Tuner(
        scripted_trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler, max_concurrent_trials=1),
        run_config=tune.RunConfig(name="asha", storage_path=str(storage), verbose=0),
    ).fit()
    assert not results.errors, results.errors
    return {r.config["name"]: r.metrics["epoch"] for r in results}, results


@pytest.mark.slow
@pytest.mark.ray
def test_warmup_asha_under_tune(local_ray, tmp_path):
    plain, plain_results = _run(ASHAScheduler(**ASHA), tmp_path / "plain")
    warm, warm_results = _run(WarmupASHA(**ASHA), tmp_path / "warmup")

    # Plain ASHA stops every poor start at its first rung, the late one (the best) included.
    assert plain == {"steady": MAX_T, "late": 1, "bad": 1, "slow_bad": 1, "edge_bad": 1}
    # (1) No trial stopped before its E0 + τ; the late one survives and ends best.
    for name, last in warm.items():
        e0, tau = TRIALS[name][:2]
        assert last >= e0 + tau, (name, last)
    assert warm["late"] == MAX_T and warm["steady"] == MAX_T
    # (2) A poor trial past its warm-up is stopped, at the first rung at or after it (3, 27 and 9:
    # edge_bad's warm-up ends at 4, one epoch after the rung at 3).
    assert warm["bad"] == 3 and warm["slow_bad"] == 27 and warm["edge_bad"] == 9
    # (3) Epochs saved: 27 + 3 + 21 of 150 with the warm-up, 4 × 29 with plain ASHA.
    assert epochs_saved(warm_results, MAX_T)["epochs_saved"] == 51
    assert epochs_saved(plain_results, MAX_T)["epochs_saved"] == 116
