"""The Optuna database of a study: a storage that waits for a database that restarts.

The driver's alone (a trial process never imports it, nor Optuna and SQLAlchemy): the studies open
their Optuna studies through :func:`study_storage`. A database that is unreachable a while is waited
for; one that refuses this process (a wrong password, no such database) fails at once
(:class:`StudyDatabaseRefused`). The URL's password is in no message and in no pickle of the storage.
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import time
from typing import Any, Callable

import optuna
import sqlalchemy

# How long the driver waits for an unreachable Optuna database before it stops the study: a
# PostgreSQL restart takes seconds, a managed database's failover one to two minutes.
DB_TIMEOUT_S = 300.0
# Server errors that waiting does not cure (PostgreSQL SQLSTATE classes): 28 authorisation (a wrong
# password), 3D no such database.
_LASTING_SQLSTATE_CLASSES = ("28", "3D")
# libpq reports a refused connection as text alone ("FATAL:  database "x" does not exist"): such a
# refusal is lasting unless it is one of these, which pass.
_PASSING_REFUSALS = ("starting up", "shutting down", "in recovery", "not yet accepting connections",
                     "too many clients", "terminating connection")
# The database this process's study uses (set by study_storage); see StudyStorage.__setstate__.
_study_url: str | None = None
_in_storage_call = threading.local()


class StudyDatabaseRefused(ValueError):
    """The Optuna database refused the connection for a reason that waiting does not cure (SQLSTATE
    class 28, authorisation: a wrong password, an unknown role; 3D, no such database). The message
    names the URL without its password and gives the server's answer, on one line.

    A ``ValueError``, as for any wrong argument: the study scripts print it as one ``error:`` line.
    """


class StudyDatabaseError(SystemExit):
    """The Optuna database did not answer within the wait; the message (one ``error:`` line) says
    so, and that ``--resume`` continues the study.

    A ``SystemExit``: ``OptunaSearch`` catches every ``Exception`` of a ``tell`` and only logs it,
    which would drop a finished trial's result and carry on; this passes through it and through
    Tune, and a driver that does not catch it ends with the message alone. The study then stands
    as after a killed driver: Tune's last snapshot and every result the database holds.
    """


def _shown_url(url: str) -> str:
    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def _connection_problem(exc: BaseException) -> tuple[bool, str] | None:
    """``(passing, what went wrong)`` when ``exc`` (or an error it was raised from) is a lost or
    refused database connection: ``passing`` when it may come back (the server restarts, fails over,
    is unreachable a while), not for a refusal that waiting does not cure (a wrong password, no such
    database); ``None`` for anything else, e.g. invalid data."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            sqlstate, text = getattr(exc.orig, "sqlstate", None) or "", str(exc.orig).strip()
            if not text:
                return True, type(exc.orig).__name__
            if sqlstate[:2] in _LASTING_SQLSTATE_CLASSES or (
                    not sqlstate and "FATAL:" in text and not any(p in text for p in _PASSING_REFUSALS)):
                # libpq's message of a refused login may take several lines (one per address tried).
                return False, "; ".join(line.strip() for line in text.splitlines() if line.strip())
            return True, text.splitlines()[0]
        exc = exc.__cause__ or exc.__context__
    return None


class StudyStorage(optuna.storages.RDBStorage):
    """Optuna's ``RDBStorage`` for a study that runs for days: it outlives a restart of its database.

    - ``pool_pre_ping``: a pooled connection that a database restart closed is replaced when it is
      next checked out, instead of failing the next statement.
    - Every storage call that fails on a lost or refused connection is retried, with a growing
      pause (0.25 s to 5 s), until ``timeout_s`` has passed since the call began; then
      :class:`StudyDatabaseError` stops the study. The wait and the reconnection are printed.
      A write whose commit reached the database just before the connection broke is sent again:
      a new trial then exists twice (the spare one stays ``RUNNING``), a finished trial's state is
      refused as already set.
    - A refusal that waiting does not cure (a wrong password, no such database) raises
      :class:`StudyDatabaseRefused` at once.
    - SQLite files are not retried: an unreachable file does not come back by waiting.
    - Pickled (Tune saves the search algorithm, and with it this storage, in ``tuner.pkl`` and
      ``searcher-state-*.pkl`` of the experiment), the URL is written without its password.
    - Restored from a pickle (Tune's experiment state holds the search algorithm and with it this
      storage), it connects to the database this process opened with :func:`study_storage`,
      not to the URL it was saved with: a results folder copied to another machine, or a study
      whose database moved, resumes against the database its command line names.
    """

    def __init__(self, url: str, timeout_s: float = DB_TIMEOUT_S):
        self.timeout_s = float(timeout_s)
        # With timeout_s = 0 a failing call is not retried, but still told apart (refused or unreachable).
        self.waits = sqlalchemy.engine.make_url(url).get_backend_name() != "sqlite"
        self._retrying(lambda: optuna.storages.RDBStorage.__init__(self, url, engine_kwargs={"pool_pre_ping": True}))

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        return {**state, "url": _shown_url(state["url"])}

    def __setstate__(self, state: dict) -> None:
        # The saved URL has no password (see __getstate__): it names the database, it cannot open it.
        if _study_url is not None:
            if state.get("url") != _shown_url(_study_url):
                print(f"optuna: the experiment was saved with the database {_shown_url(state['url'])}; "
                      f"using {_shown_url(_study_url)}", file=sys.stderr, flush=True)
            state = {**state, "url": _study_url}
        super().__setstate__(state)

    def _retrying(self, call: Callable[[], Any]) -> Any:
        # A call that makes other storage calls (create_new_trial → _create_new_trial) waits once.
        if not self.waits or getattr(_in_storage_call, "active", False):
            return call()
        _in_storage_call.active = True
        try:
            return self._wait_for_database(call)
        finally:
            _in_storage_call.active = False

    def _wait_for_database(self, call: Callable[[], Any]) -> Any:
        start, pause, announced = time.monotonic(), 0.25, False
        while True:
            try:
                result = call()
            except Exception as exc:
                found = _connection_problem(exc)
                waited = time.monotonic() - start
                if found is None:
                    raise
                passing, problem = found
                if not passing:
                    raise StudyDatabaseRefused(
                        f"the Optuna database {_shown_url(self.url)} refused the connection ({problem}); "
                        "waiting does not cure that: check the URL, its user and password"
                    ) from exc
                if waited >= self.timeout_s:
                    raise StudyDatabaseError(
                        f"error: the Optuna database {_shown_url(self.url)} did not answer for {waited:.0f} s "
                        f"({problem}); the study stops here, and --resume continues it once the database is back"
                    ) from exc
                if not announced:
                    print(f"optuna: the database {_shown_url(self.url)} does not answer ({problem}); "
                          f"waiting up to {self.timeout_s:.0f} s", file=sys.stderr, flush=True)
                    announced = True
                time.sleep(min(pause, self.timeout_s - waited))
                pause = min(2 * pause, 5.0)
                continue
            if announced:
                print(f"optuna: the database answers again, after {time.monotonic() - start:.1f} s",
                      file=sys.stderr, flush=True)
            return result


def _retried(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return self._retrying(lambda: method(self, *args, **kwargs))

    return call


# Every storage call: BaseStorage's public methods and the private ones Optuna's cache calls on its backend.
for _name in sorted({n for n, _ in inspect.getmembers(optuna.storages.BaseStorage, inspect.isfunction)
                     if not n.startswith("_")}
                    | {"_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
                       "_get_stale_trial_ids"}):
    if hasattr(optuna.storages.RDBStorage, _name):
        setattr(StudyStorage, _name, _retried(getattr(optuna.storages.RDBStorage, _name)))
del _name


def study_storage(url: str, timeout_s: float = DB_TIMEOUT_S) -> StudyStorage:
    """The Optuna storage of this process's study, waiting up to ``timeout_s`` for an unreachable
    database (at start, and at every call later); see :class:`StudyStorage`. ``url`` becomes the
    database of every storage this process restores from a pickle.

    Args:
        url: SQLAlchemy URL (``postgresql://...``, ``sqlite:///...``).
        timeout_s: seconds to wait for the database; 0 fails at once.

    Raises:
        StudyDatabaseRefused: the database refused the connection for good (a wrong password, no
            such database), at once.
        StudyDatabaseError: the database did not answer within ``timeout_s``.
    """
    global _study_url
    _study_url = url
    return StudyStorage(url, timeout_s)
