"""The study's Optuna searcher after ``--resume``: Tune's experiment state and the searcher's pickle
out of step, as a driver killed between their writes leaves them.

Each test drives the real search algorithm Tune builds (``SearchGenerator`` over the limiter over
the searcher) through the calls the Tune controller makes, saves it with ``save_to_dir`` at the
moment the kill would have left the searcher's file, restores a fresh one with
``restore_from_dir`` as ``Tuner.restore`` does, then replays what the resumed experiment does. The
same replay on Ray's own ``OptunaSearch`` + ``ConcurrencyLimiter`` shows each failure.
"""

from __future__ import annotations

import pytest

pytest.importorskip("ray.tune")
optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState  # noqa: E402
from ray.tune.search import ConcurrencyLimiter, SearchGenerator  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from polydice.resume import (  # noqa: E402
    RETRY_ATTR,
    TUNE_TRIAL_ATTR,
    StudyConcurrencyLimiter,
    StudySearch,
    close_stale_trials,
    study_search_alg,
)

SPACE = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
STUDY = "resume"


def _searcher(tmp_path, cls=None):
    return (cls or StudySearch)(space=SPACE, metric="v", mode="max", study_name=STUDY,
                                storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db"),
                                sampler=optuna.samplers.RandomSampler(seed=0))


def _alg(tmp_path, ours: bool = True, concurrent: int = 1) -> SearchGenerator:
    """The search algorithm as Tune wraps it: ``SearchGenerator(limiter(searcher))``."""
    if ours:
        return study_search_alg(_searcher(tmp_path), concurrent)
    return SearchGenerator(ConcurrencyLimiter(_searcher(tmp_path, OptunaSearch), concurrent))


def _restored(tmp_path, saved: SearchGenerator, ours: bool = True) -> SearchGenerator:
    state = tmp_path / "experiment"
    state.mkdir(exist_ok=True)
    saved.save_to_dir(str(state), session_str="s")
    alg = _alg(tmp_path, ours)
    alg.restore_from_dir(str(state))
    return alg


def _limiter(alg: SearchGenerator):
    return alg.searcher


def _study(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{tmp_path}/optuna.db")


def _result(value: float, it: int = 1) -> dict:
    return {"v": value, "training_iteration": it}


def _run(limiter, trial_id: str, value: float) -> None:
    limiter.on_trial_result(trial_id, _result(value / 2, 1))
    limiter.on_trial_complete(trial_id, _result(value, 2))


def _searcher_behind(tmp_path, ours: bool):
    """Trial ``a`` finished, the searcher saved, then ``b`` suggested and running at the kill: the
    experiment state (written after) knows ``b``, the restored searcher does not."""
    alg = _alg(tmp_path, ours)
    lim = _limiter(alg)
    assert lim.suggest("a") is not None
    _run(lim, "a", 0.5)
    state = tmp_path / "experiment"
    state.mkdir()
    alg.save_to_dir(str(state), session_str="s")
    assert lim.suggest("b") is not None
    lim.on_trial_result("b", _result(0.3))
    restored = _alg(tmp_path, ours)
    restored.restore_from_dir(str(state))
    return _limiter(restored)


def test_resumed_trial_unknown_to_the_restored_searcher_is_taken_from_the_database(tmp_path):
    lim = _searcher_behind(tmp_path, ours=True)
    _run(lim, "b", 0.7)  # Tune resumes b under its id
    trials = _study(tmp_path).trials
    assert [(t.state, t.value, t.user_attrs[TUNE_TRIAL_ATTR]) for t in trials] == [
        (TrialState.COMPLETE, 0.5, "a"), (TrialState.COMPLETE, 0.7, "b")]
    assert trials[1].intermediate_values == {1: 0.3}  # reported before the kill, kept
    assert lim.suggest("c") is not None  # the search goes on, b no longer counts as live
    assert lim.suggest("d") is None  # and the cap still holds with c running


def test_ray_optuna_search_fails_on_the_same_resume(tmp_path):
    lim = _searcher_behind(tmp_path, ours=False)
    with pytest.raises(KeyError):
        lim.on_trial_result("b", _result(0.35))
    lim.on_trial_complete("b", _result(0.7))  # dropped: b is not among the limiter's live trials
    assert _study(tmp_path).trials[1].state == TrialState.RUNNING


def _searcher_ahead(tmp_path, ours: bool):
    """``b`` suggested and saved in the searcher, but the experiment state (older) never had it:
    the resumed experiment asks for a new trial ``c``."""
    alg = _alg(tmp_path, ours)
    lim = _limiter(alg)
    lim.suggest("a")
    _run(lim, "a", 0.5)
    lim.suggest("b")
    return _limiter(_restored(tmp_path, alg, ours))


def test_trial_the_experiment_never_had_does_not_block_the_search(tmp_path):
    lim = _searcher_ahead(tmp_path, ours=True)
    assert lim.suggest("c") is not None
    _run(lim, "c", 0.6)
    study = _study(tmp_path)
    assert close_stale_trials(study) == [1]  # b: suggested, never run
    states = [(t.user_attrs[TUNE_TRIAL_ATTR], t.state) for t in _study(tmp_path).trials]
    assert states == [("a", TrialState.COMPLETE), ("b", TrialState.FAIL), ("c", TrialState.COMPLETE)]
    assert close_stale_trials(study) == []


def test_ray_concurrency_limiter_waits_forever_for_that_trial(tmp_path):
    lim = _searcher_ahead(tmp_path, ours=False)
    assert lim.suggest("c") is None and lim.suggest("c2") is None  # Tune would wait for b forever


def test_errored_trial_retried_on_resume_keeps_its_result(tmp_path):
    alg = _alg(tmp_path)
    lim = _limiter(alg)
    lim.suggest("a")
    lim.on_trial_result("a", _result(0.2))
    lim.on_trial_complete("a", error=True)  # the trial's worker died
    restored = _limiter(_restored(tmp_path, alg))
    _run(restored, "a", 0.8)  # resume_errored: Tune runs a again under its id
    trials = _study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params and trials[1].value == 0.8
    assert trials[1].user_attrs[RETRY_ATTR] == 0 and trials[1].user_attrs[TUNE_TRIAL_ATTR] == "a"
    again = _limiter(_restored(tmp_path, restored))  # a second resume adds nothing more
    _run(again, "a", 0.9)
    assert len(_study(tmp_path).trials) == 2


def test_trial_told_after_the_searcher_saved_is_not_told_twice(tmp_path):
    alg = _alg(tmp_path)
    lim = _limiter(alg)
    lim.suggest("a")
    state = tmp_path / "experiment"
    state.mkdir()
    alg.save_to_dir(str(state), session_str="s")
    _run(lim, "a", 0.5)  # told to Optuna, then the kill before the next save
    restored = _alg(tmp_path)
    restored.restore_from_dir(str(state))
    _run(_limiter(restored), "a", 0.9)  # Tune resumes a from its checkpoint
    trials = _study(tmp_path).trials
    assert [(t.state, t.value) for t in trials] == [(TrialState.COMPLETE, 0.5)]
    assert _limiter(restored).suggest("b") is not None


def test_uncapped_search_has_no_limiter(tmp_path):
    alg = _alg(tmp_path, concurrent=0)
    assert isinstance(alg.searcher, StudySearch)
    assert isinstance(_alg(tmp_path, concurrent=2).searcher, StudyConcurrencyLimiter)


# ----------------------------------------------------------------------------- a checkpoint gone (real Tune)

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def _scripted(config):
    """Three epochs, a checkpoint each; fails in epoch 3 while ``fail_marker`` exists."""
    from ray import tune

    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = json.loads((Path(folder) / "checkpoint.pt").read_text())["epoch"]
    for epoch in range(start + 1, 4):
        if epoch == 3 and os.path.exists(config["fail_marker"]):
            raise RuntimeError("worker lost")
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "checkpoint.pt").write_text(json.dumps({"epoch": epoch}))
            tune.report({"epoch": epoch, "resumed_after": start}, checkpoint=tune.Checkpoint.from_directory(folder))


@pytest.fixture(scope="module")
def local_ray():
    import ray_fixtures as rf

    with rf.local_ray("pdres", 1, by_value=__name__):
        yield


@pytest.mark.ray
@pytest.mark.parametrize("newer", [True, False], ids=["newer-checkpoint-left", "none-left"])
def test_trial_whose_recorded_checkpoint_is_gone_continues(local_ray, tmp_path, newer):
    """The state names ``checkpoint_000001`` (epoch 2), deleted from storage; with ``newer`` the
    folder holds a later complete checkpoint (epoch 2 again, as ``checkpoint_000002``). Resumed,
    the trial continues from that one, or starts over from epoch 1, and finishes, where Tune alone
    fails it on every retry."""
    from ray import tune

    from polydice.tune import run_config

    marker = tmp_path / "fail"
    marker.touch()
    name, storage = "gone", str(tmp_path / "results")
    grid = tune.Tuner(_scripted, param_space={"fail_marker": str(marker)},
                      run_config=run_config(name, storage, max_failures=0, verbose=0)).fit()
    assert grid.errors
    trial_dir = Path(grid[0].path)
    assert sorted(p.name for p in trial_dir.glob("checkpoint_*")) == ["checkpoint_000001"]  # one kept
    if newer:
        shutil.copytree(trial_dir / "checkpoint_000001", trial_dir / "checkpoint_000002")
    shutil.rmtree(trial_dir / "checkpoint_000001")
    marker.unlink()

    grid = tune.Tuner.restore(str(Path(storage) / name), _scripted, resume_errored=True).fit()
    assert not grid.errors, grid.errors
    assert grid[0].metrics["epoch"] == 3
    assert grid[0].metrics["resumed_after"] == (2 if newer else 0)
    note = (trial_dir / "restarted.txt").read_text()
    assert ("continues from" if newer else "starts again from epoch 1") in note, note


def _scored(config):
    from ray import tune

    tune.report({"v": config["x"]})


@pytest.mark.ray
@pytest.mark.parametrize("saved_count", [1, 4], ids=["count-behind", "count-ahead"])
def test_resumed_search_counts_the_trials_of_the_experiment(local_ray, tmp_path, saved_count):
    """The search's saved count of created trials out of step with the experiment's 3 trials (1 of
    3, or 4 of 5): the resumed search ends with exactly 3, or 5, trials, where Tune alone would run
    2 more than asked, or 1 fewer."""
    import glob

    import ray.cloudpickle as cloudpickle
    from ray import tune

    from polydice.resume import TrialCount
    from polydice.tune import run_config

    def tuner(num_samples):
        search_alg = study_search_alg(_searcher(tmp_path), 1)
        return tune.Tuner(_scored, tune_config=tune.TuneConfig(metric="v", mode="max", search_alg=search_alg,
                                                               num_samples=num_samples),
                          run_config=run_config("count", str(tmp_path / "results"), max_failures=0, verbose=0,
                                                callbacks=[TrialCount(search_alg)]))

    experiment = tmp_path / "results" / "count"
    assert len(tuner(3).fit()) == 3
    # As if saved by a search of num_samples trials that had created saved_count of them.
    num_samples = 3 if saved_count < 3 else 5
    state_file = sorted(glob.glob(str(experiment / "search_gen_state-*.json")))[-1]
    with open(state_file, "rb") as f:
        state = cloudpickle.load(f)
    state.update(counter=saved_count, total_samples=num_samples, finished=saved_count >= num_samples)
    with open(state_file, "wb") as f:
        cloudpickle.dump(state, f)

    grid = tune.Tuner.restore(str(experiment), _scored).fit()
    assert len(grid) == num_samples, len(grid)
    assert len(_study(tmp_path).trials) == num_samples
