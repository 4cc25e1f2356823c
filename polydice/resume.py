"""Resuming a study whose driver was killed: what Tune's saved state can get wrong, put right.

Two parts: an Optuna search whose state survives the kill (:class:`StudySearch`,
:class:`StudyConcurrencyLimiter`, :class:`TrialCount`, :func:`close_stale_trials`), and a callback
that restarts a trial whose recorded checkpoint is no longer in storage
(:class:`MissingCheckpointFallback`).

Ray Tune saves a search in two parts, at different moments and as separate files: the experiment
state (which trials exist, and in what state) and the searcher's pickle (which Optuna trial belongs
to which Tune trial, which trials the searcher has been told of). A driver killed between the two
writes, or while the two are copied to remote storage, leaves them out of step, and
``Tuner.restore`` then resumes:

- a trial the restored ``OptunaSearch`` never saw: its first result raises ``KeyError`` in
  ``on_trial_result``, and its completion is dropped by ``ConcurrencyLimiter``, whose restored
  set of live trials does not hold it;
- or a ``ConcurrencyLimiter`` that counts as running a trial the experiment never had: it waits
  for that trial forever, and the study hangs after its last real trial.

The Optuna database is written at once, in the same call that creates the trial, and a
database transaction is all or nothing; so the searcher here labels every Optuna trial with its Tune
trial id (user attribute :data:`TUNE_TRIAL_ATTR`) and, when restored, takes the running trials
back from the database instead of trusting its pickle. The limiter relearns which trials are live
from what they report. After the search, :func:`close_stale_trials` fails the Optuna trials that
nothing runs any more (the trial that was running at a kill and that Tune never knew of).

A trial that failed and is retried by ``--resume`` (Tune's ``resume_errored``) has a failed
Optuna trial, which Optuna cannot reopen: its new result is added to the study as a new complete
trial with the same parameters (user attribute ``retry_of`` names the failed one), where
``OptunaSearch`` would only log a warning and lose it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
import pyarrow.fs
from optuna.trial import TrialState
from ray import tune
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)

#: User attribute of an Optuna trial: the Tune trial id it was suggested for.
TUNE_TRIAL_ATTR = "tune_trial_id"
#: User attribute of a trial added for a retried one: the failed Optuna trial's number.
RETRY_ATTR = "retry_of"


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that labels each Optuna trial with its Tune trial id and, when Tune restores
    it, reconciles its state with the Optuna database (see the module's docstring).

    Takes ``OptunaSearch``'s arguments; use it with an Optuna storage (a database), which is what
    makes the reconciliation possible: with an in-memory study it behaves as ``OptunaSearch``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Tune trial id -> the failed Optuna trial that a resumed run of it retries.
        self._retried: dict[str, optuna.trial.FrozenTrial] = {}

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if params is not None and ot_trial is not None:
            ot_trial.set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return params

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.__dict__.setdefault("_retried", {})
        self.reconcile()

    def reconcile(self) -> dict[str, list[str]]:
        """Bring the trial maps in line with the Optuna database.

        Returns the Tune trial ids per change (``adopted``: running in the database, unknown to the
        pickle; ``finished``: told in the database, not in the pickle; ``retried``: failed in the
        database, to be retried), for logs and tests.
        """
        changes: dict[str, list[str]] = {"adopted": [], "finished": [], "retried": []}
        if self._ot_study is None:
            return changes
        for frozen in self._ot_study.get_trials(deepcopy=False):
            trial_id = frozen.user_attrs.get(TUNE_TRIAL_ATTR)
            if trial_id is None or RETRY_ATTR in frozen.user_attrs:
                continue
            if frozen.state == TrialState.RUNNING:
                if trial_id not in self._ot_trials:
                    self._ot_trials[trial_id] = optuna.Trial(self._ot_study, frozen._trial_id)
                    changes["adopted"].append(trial_id)
                self._completed_trials.discard(trial_id)
            elif frozen.state == TrialState.FAIL:
                # Tune retries an errored trial on resume (resume_errored) under the same id.
                self._retried[trial_id] = frozen
                self._completed_trials.discard(trial_id)
                changes["retried"].append(trial_id)
            elif trial_id not in self._completed_trials:
                self._completed_trials.add(trial_id)
                changes["finished"].append(trial_id)
        # A retry that already has its added trial is done.
        for frozen in self._ot_study.get_trials(deepcopy=False):
            if RETRY_ATTR in frozen.user_attrs:
                trial_id = frozen.user_attrs.get(TUNE_TRIAL_ATTR)
                if self._retried.pop(trial_id, None) is not None:
                    self._completed_trials.add(trial_id)
        if any(changes.values()):
            logger.info("Optuna searcher reconciled with the study's database: %s", changes)
        return changes

    def _searched(self, trial_id: str) -> bool:
        """Whether a report of ``trial_id`` goes to the study: not for a trial already told, nor
        for one that neither this searcher nor the database knows (that one is warned of once)."""
        if trial_id in self._completed_trials:
            return False
        if trial_id in self._ot_trials or trial_id in self._retried:
            return True
        self.reconcile()  # a trial Tune resumed that the saved searcher did not know
        if trial_id in self._ot_trials or trial_id in self._retried:
            return True
        logger.warning("Tune trial %s is not in the Optuna study; its results are not searched on", trial_id)
        self._completed_trials.add(trial_id)
        return False

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if not self._searched(trial_id) or trial_id in self._retried:
            return  # (a retried trial's Optuna trial is finished: it takes no intermediate values)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not self._searched(trial_id):
            return
        failed = self._retried.pop(trial_id, None)
        if failed is None:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        value = None if (error or not result) else result.get(self.metric)
        if value is not None:
            self._ot_study.add_trial(optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                value=value,
                params=failed.params,
                distributions=failed.distributions,
                user_attrs={**failed.user_attrs, RETRY_ATTR: failed.number},
            ))
        self._completed_trials.add(trial_id)


class StudyConcurrencyLimiter(ConcurrencyLimiter):
    """``ConcurrencyLimiter`` that relearns, after a restore, which trials are live.

    Its saved set of live trials may name a trial the restored experiment does not have (it would
    then wait for it forever), or miss one Tune resumes (whose completion it would drop). Restored,
    it starts empty and counts a trial as live from its first result; a completion of a trial it
    did not count is passed on to the searcher.
    """

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self.live_trials = set()
        self.num_unfinished_live_trials = 0
        self.cached_results = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self._limit_concurrency and trial_id not in self.live_trials:
            self.live_trials.add(trial_id)
            self.num_unfinished_live_trials += 1
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._limit_concurrency and trial_id not in self.live_trials:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


def study_search_alg(searcher: StudySearch, max_concurrent: int | None) -> SearchGenerator:
    """The search algorithm to hand to ``TuneConfig(search_alg=...)`` (with
    ``max_concurrent_trials=None``): the searcher, under :class:`StudyConcurrencyLimiter` when
    trials are capped, in the ``SearchGenerator`` that :class:`TrialCount` corrects."""
    return SearchGenerator(StudyConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher)


class TrialCount(tune.Callback):
    """On resume, sets the search's count of created trials to the trials the experiment has.

    ``SearchGenerator`` saves that count with the searcher, apart from the experiment state, so a
    kill between the two writes leaves it one behind (the resumed search would run a trial more
    than ``num_samples``) or one ahead (a trial fewer). Hand it the ``SearchGenerator`` given to
    ``TuneConfig`` (see :func:`study_search_alg`); Tune saves both in one file, so a restored
    experiment's callback holds its restored search.
    """

    def __init__(self, search_alg: SearchGenerator) -> None:
        self.search_alg = search_alg
        self._done = False

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._done:
            return
        self._done = True
        state = self.search_alg.get_state()
        if state["counter"] != len(trials):
            logger.info("search: %d trials created by the restored search, %d in the experiment; counting %d",
                        state["counter"], len(trials), len(trials))
            state["counter"] = len(trials)
            state["finished"] = len(trials) >= state["total_samples"]
            self.search_alg.set_state(state)


def close_stale_trials(study: optuna.Study) -> list[int]:
    """Fail the study's trials still marked running once its search has ended (nothing runs
    them: a trial suggested just before a kill that the resumed experiment never had). Returns
    their numbers. Call it only when no search on ``study`` is running."""
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for frozen in stale:
        study._storage.set_trial_user_attr(frozen._trial_id, "closed", "not run: left by an interrupted search")
        study._storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)
    return [t.number for t in stale]


# ----------------------------------------------------------------------------- checkpoints gone


class MissingCheckpointFallback(tune.Callback):
    """Before a restored trial starts, check that the checkpoint Tune will restore still exists.

    Tune keeps one checkpoint per trial (``num_to_keep=1``, see :func:`polydice.tune.run_config`):
    the previous one is deleted as soon as a new one is stored, and the experiment state that
    names the new one reaches storage a little later. A driver killed in between leaves a state
    that names a deleted checkpoint; Tune would fail that trial on every retry ("Could not recover
    from checkpoint as it does not exist on storage anymore"). Such a trial continues instead from
    the newest complete checkpoint in its folder (the one that replaced it), or, when there is
    none, starts over; ``restarted.txt`` in the trial folder says which.
    """

    def __init__(self, checkpoint_file: str = "checkpoint.pt") -> None:
        self.checkpoint_file = checkpoint_file
        self._checked: set[str] = set()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        for trial in trials:
            if trial.status != trial.PENDING or trial.trial_id in self._checked:
                continue
            self._checked.add(trial.trial_id)
            try:
                self._check(trial)
            except Exception as exc:  # a check that cannot run leaves Tune's own behaviour
                logger.warning("could not check the checkpoint of trial %s: %s", trial, exc)

    def _check(self, trial) -> None:
        manager = trial.run_metadata.checkpoint_manager
        recorded = manager.latest_checkpoint_result
        if recorded is None:
            return
        checkpoint = recorded.checkpoint
        fs = checkpoint.filesystem
        if fs.get_file_info(checkpoint.path).type != pyarrow.fs.FileType.NotFound:
            return
        newest = self._newest_complete(fs, str(Path(checkpoint.path).parent))
        # Imported here: a private module of Ray's, needed only on this rare path.
        from ray.train._internal.checkpoint_manager import _CheckpointManager
        from ray.train._internal.session import _TrainingResult

        fresh = _CheckpointManager(manager.checkpoint_config)
        if newest is not None:
            fresh.register_checkpoint(_TrainingResult(checkpoint=tune.Checkpoint(newest, filesystem=fs),
                                                      metrics=dict(recorded.metrics)))
            message = (f"the recorded checkpoint {checkpoint.path} is gone from storage (deleted when a newer one was "
                       f"stored, before the experiment state said so); the trial continues from {newest}")
        else:
            message = (f"the recorded checkpoint {checkpoint.path} is gone from storage and the trial folder holds no "
                       "other; the trial starts again from epoch 1")
        trial.run_metadata.checkpoint_manager = fresh
        logger.warning("trial %s: %s", trial, message)
        try:
            local = Path(trial.local_path)
            local.mkdir(parents=True, exist_ok=True)
            with open(local / "restarted.txt", "a") as file:
                file.write(message + "\n")
        except OSError:
            pass

    def _newest_complete(self, fs: pyarrow.fs.FileSystem, trial_path: str) -> str | None:
        """The newest ``checkpoint_*`` folder of the trial that holds the checkpoint file."""
        entries = fs.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True))
        folders = sorted((e.path for e in entries if e.type == pyarrow.fs.FileType.Directory
                          and e.base_name.startswith("checkpoint_")), reverse=True)
        for folder in folders:
            if fs.get_file_info(f"{folder}/{self.checkpoint_file}").type == pyarrow.fs.FileType.File:
                return folder
        return None
