"""A password in ``--optuna-storage``: never printed or written; a wrong one fails at once.

- A refusal that waiting does not cure (PostgreSQL SQLSTATE class 28, authorisation: a wrong
  password, a login the server does not allow) fails the first storage call at once with
  :class:`~polydice.studydb.StudyDatabaseRefused`; an outage (a server starting up, a broken
  connection) is still waited for. Checked with stand-in driver errors, then against a real
  PostgreSQL server on 127.0.0.1 that asks for a password (scram-sha-256).
- ``studies/tune_adaptive.py`` with a wrong password ends within seconds, with one ``error:`` line
  naming the URL without its password; with the right one, a smoke study leaves the password in
  no file it writes (Tune's experiments, best_config.json, the report) and in none of its output.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import time
from pathlib import Path

# Before Ray is imported (by the study subprocesses): Ray binds loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402

optuna = pytest.importorskip("optuna")
sqlalchemy = pytest.importorskip("sqlalchemy")

import ray_fixtures as rf  # noqa: E402
from polydice import studydb  # noqa: E402

PASSWORD = "S3cret-pw"
SMOKE_ARGS = ["--smoke", "--epochs", "2", "--image-size", "32", "--base-channels", "4", "--folds", "2",
              "--num-samples", "1", "--search-fold", "0", "--seeds", "1", "--num-cpus", "2"]
OPTUNA_TIMEOUT_S = 120
STUDY_TIMEOUT_S = 300


@pytest.fixture(scope="module", autouse=True)
def no_study_database_left():
    """``study_storage`` makes its URL the database of every storage this process restores; no
    test's database may outlive this module."""
    yield
    studydb._study_url = None


@pytest.fixture(scope="module")
def postgres():
    """One server for the module; TCP logins need ``PASSWORD``."""
    with rf.postgres_server(password=PASSWORD) as server:
        yield server


def _redacted(url: str) -> str:
    return url.replace(f":{PASSWORD}@", ":***@")


# ----------------------------------------------------------------------------- stand-in driver errors

URL = f"postgresql://polydice:{PASSWORD}@127.0.0.1:5432/polydice"


class _DriverError(Exception):
    """A DB-API error as psycopg raises it: the server's message and, when the server sent one, its
    SQLSTATE (psycopg leaves ``sqlstate`` None for a refused login: libpq gives only the text)."""

    def __init__(self, message: str, sqlstate: str | None):
        super().__init__(message)
        self.sqlstate = sqlstate


def _connects_failing_with(monkeypatch, errors: list[_DriverError]) -> list[float]:
    """Optuna's ``RDBStorage.__init__`` (where the storage first connects) fails with each of
    ``errors`` in turn, then succeeds; returns the times it was called."""
    calls: list[float] = []

    def connect(self, url, **kwargs):
        calls.append(time.monotonic())
        self.url = url  # as Optuna does, before it connects
        if len(calls) <= len(errors):
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, errors[len(calls) - 1])

    monkeypatch.setattr(optuna.storages.RDBStorage, "__init__", connect)
    return calls


AUTHORISATION_FAILURES = {
    "28P01 wrong password": _DriverError('FATAL:  password authentication failed for user "polydice"', "28P01"),
    "28000 no pg_hba.conf entry": _DriverError(
        'no pg_hba.conf entry for host "10.0.0.7", user "polydice", database "polydice", no encryption', "28000"),
    "text only, as psycopg gives it": _DriverError(
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        'FATAL:  password authentication failed for user "polydice"', None),
}
OUTAGES = {
    "57P03 starting up": _DriverError("FATAL:  the database system is starting up", "57P03"),
    "08006 connection lost": _DriverError("server closed the connection unexpectedly", "08006"),
    "text only, refused": _DriverError(
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: Connection refused', None),
}


@pytest.mark.parametrize("error", AUTHORISATION_FAILURES.values(), ids=AUTHORISATION_FAILURES.keys())
def test_an_authorisation_failure_fails_at_once(monkeypatch, capsys, error):
    calls = _connects_failing_with(monkeypatch, [error])
    with pytest.raises(studydb.StudyDatabaseRefused) as info:
        studydb.study_storage(URL, timeout_s=60)
    assert len(calls) == 1, "an authorisation failure was retried"
    message = str(info.value)
    assert message.startswith(f"the Optuna database {_redacted(URL)} refused the connection ("), message
    assert str(error).splitlines()[0] in message and "\n" not in message
    assert PASSWORD not in message + capsys.readouterr().err


@pytest.mark.parametrize("error", OUTAGES.values(), ids=OUTAGES.keys())
def test_an_outage_is_still_waited_for(monkeypatch, capsys, error):
    calls = _connects_failing_with(monkeypatch, [error, error])
    studydb.study_storage(URL, timeout_s=60)
    assert len(calls) == 3 and calls[-1] - calls[0] >= 0.7  # pauses of 0.25 s and 0.5 s
    err = capsys.readouterr().err
    assert f"optuna: the database {_redacted(URL)} does not answer (" in err and "answers again" in err, err
    assert PASSWORD not in err


def test_without_a_wait_a_refusal_and_an_outage_still_differ(monkeypatch):
    """``--optuna-timeout 0``: neither is retried; each ends with its own one-line message."""
    _connects_failing_with(monkeypatch, [AUTHORISATION_FAILURES["28P01 wrong password"]])
    with pytest.raises(studydb.StudyDatabaseRefused):
        studydb.study_storage(URL, timeout_s=0)
    calls = _connects_failing_with(monkeypatch, [OUTAGES["57P03 starting up"]])
    with pytest.raises(studydb.StudyDatabaseError, match=r"^error: the Optuna database .* did not answer for 0 s"):
        studydb.study_storage(URL, timeout_s=0)
    assert len(calls) == 1


# ----------------------------------------------------------------------------- a real server


def test_a_wrong_password_fails_at_once(postgres):
    wrong = postgres.url.replace(PASSWORD, "WRONG")
    start = time.monotonic()
    with pytest.raises(studydb.StudyDatabaseRefused, match="password authentication failed") as info:
        studydb.study_storage(wrong, timeout_s=20)
    assert time.monotonic() - start < 10
    assert str(info.value).startswith(f"the Optuna database {wrong.replace(':WRONG@', ':***@')} refused")
    assert "WRONG" not in str(info.value)


def test_a_pickled_storage_holds_no_password(postgres, capsys):
    """Tune pickles the search algorithm, and with it the storage, into the experiment; restored in
    this process, the storage connects to the database ``study_storage`` opened, password and all."""
    storage = studydb.study_storage(postgres.url, timeout_s=30)
    optuna.create_study(study_name="pickled", storage=storage)
    saved = pickle.dumps(storage)
    assert PASSWORD.encode() not in saved
    restored = pickle.loads(saved)
    assert restored.url == postgres.url
    assert "pickled" in {s.study_name for s in optuna.get_all_study_summaries(restored)}
    assert "saved with the database" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- the study script


def _study(args: list[str], cwd: Path, timeout: float) -> tuple[int, str, str, float]:
    """``studies/tune_adaptive.py ARGS`` in its own session (and Ray temp dir), run in ``cwd``;
    returns (exit code, stdout, stderr, seconds). Every process of its session is gone afterwards."""
    ray_tmp = rf.short_tmpdir("pdsec")
    start = time.monotonic()
    proc = subprocess.Popen([rf.PYTHON, str(rf.STUDIES / "tune_adaptive.py"), *args], cwd=cwd, env=rf.ray_env(ray_tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        rf.kill_session(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"the study did not end in {timeout:.0f} s\n{out[-3000:]}\n{err[-3000:]}") from None
    finally:
        left = rf.kill_session(proc.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the study survived its end: {left}"
    return proc.returncode, out, err, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.ray
def test_a_study_with_a_wrong_password_ends_at_once_with_one_error_line(postgres, tmp_path):
    wrong = postgres.url.replace(PASSWORD, "WRONG")
    rc, out, err, seconds = _study([*SMOKE_ARGS, "--optuna-storage", wrong, "--optuna-timeout", str(OPTUNA_TIMEOUT_S),
                                    "--storage-path", str(tmp_path / "results")], tmp_path, timeout=90)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1, f"exit {rc}\n{out[-3000:]}\n{err[-5000:]}"
    assert errors[0].startswith(f"error: the Optuna database {wrong.replace(':WRONG@', ':***@')} refused the "
                                "connection (") and "password authentication failed" in errors[0], errors[0]
    assert "Traceback" not in err and "WRONG" not in out + err
    # Ray's start included (a few seconds), far below the --optuna-timeout a retried refusal would wait.
    assert seconds < 60, seconds


@pytest.fixture(scope="module")
def password_study(postgres, tmp_path_factory):
    """A finished smoke study (search of fold 0, its final run and the report) whose Optuna URL has
    the right password; the driver runs in ``root``, the study is in ``root/results``."""
    root = tmp_path_factory.mktemp("secret-study")
    rc, out, err, _ = _study([*SMOKE_ARGS, "--optuna-storage", postgres.url, "--storage-path", str(root / "results")],
                             root, timeout=STUDY_TIMEOUT_S)
    assert rc == 0, f"{out[-5000:]}\n{err[-5000:]}"
    return {"root": root, "results": root / "results", "out": out, "err": err}


@pytest.mark.slow
@pytest.mark.ray
def test_the_password_is_in_no_file_the_study_writes_nor_in_its_output(postgres, password_study):
    """Every file under the driver's folder, none exempt. The project's: best_config.json and the
    report (table.md, table.csv, best_config_*.csv, plots), polydice-experiment.json, and in each
    trial folder summary.json, history.csv, epsilon.csv, per_image.csv, model.pt and checkpoints.
    Ray Tune's: tuner.pkl, experiment_state-*.json, search_gen_state-*.json, searcher-state-*.pkl,
    basic-variant-state-*.json, and per trial params.json, params.pkl, result.json, progress.csv,
    TensorBoard events. Of these only the search experiment's tuner.pkl and searcher-state-*.pkl
    ever held the password (Tune pickles the search algorithm, and with it the Optuna storage);
    ``StudyStorage.__getstate__`` keeps it out."""
    results = password_study["results"]
    report = results / "adaptive-report"
    for name in ("best_config.json", "table.md", "table.csv"):
        assert (report / name).is_file(), sorted(p.name for p in report.iterdir())
    for pattern in ("adaptive-fold0/tuner.pkl", "adaptive-fold0/searcher-state-*.pkl",
                    "adaptive-fold0/experiment_state-*.json", "adaptive-final/tuner.pkl",
                    "adaptive-*/*/params.json", "adaptive-final/*/summary.json"):
        assert list(results.glob(pattern)), f"no {pattern}: the walk below would miss what it should check"
    files = [p for p in password_study["root"].rglob("*") if p.is_file()]
    leaked = sorted(str(p.relative_to(password_study["root"])) for p in files if PASSWORD.encode() in p.read_bytes())
    assert not leaked, f"the password is in {leaked}"
    assert PASSWORD not in password_study["out"] + password_study["err"]

    best = json.loads((report / "best_config.json").read_text())
    assert best["optuna_storage"] == _redacted(postgres.url) == (
        f"postgresql://polydice:***@127.0.0.1:{postgres.port}/polydice")
    assert f"Optuna, {_redacted(postgres.url)}" in (report / "table.md").read_text()
