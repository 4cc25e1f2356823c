"""Storage paths and URIs (``studies/storage.py``): local folders exactly as before, and a real S3 API
(a moto server on 127.0.0.1 started here) for the helpers, the report and a whole study that is
killed mid-search and resumed with ``--storage-path s3://bucket/prefix``.

The S3 tests are skipped, with the reason, when moto (the ``dev`` extra) is missing or its server
cannot start on 127.0.0.1. Every server and study process a test starts is stopped in its teardown.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUDIES = REPO / "studies"
if str(STUDIES) not in sys.path:
    sys.path.insert(0, str(STUDIES))

import storage  # noqa: E402

# Dummy credentials for the local server; nothing leaves 127.0.0.1.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
SECRET = "S3cr3tV4lue"


# ----------------------------------------------------------------------------- local paths and URLs


def test_join_keeps_a_uri_query_and_local_paths_stay_paths(tmp_path):
    assert storage.join("s3://b/p", "x", "y.json") == "s3://b/p/x/y.json"
    assert storage.join("s3://b", "x") == "s3://b/x"
    assert storage.join("s3://b/p/?endpoint_override=127.0.0.1:9000&scheme=http", "exp") == \
        "s3://b/p/exp?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("gs://bucket/a/", "b") == "gs://bucket/a/b"
    assert storage.join("results", "adaptive-final") == str(Path("results", "adaptive-final"))
    assert storage.join(tmp_path, "a", "b") == str(tmp_path / "a" / "b")
    assert storage.is_remote("s3://b/p") and storage.is_remote("gs://b") and not storage.is_remote("results")
    assert not storage.is_remote("file:///tmp/x") and not storage.is_remote("C:/results")
    assert storage.resolve("s3://b/p?x=1") == "s3://b/p?x=1"
    assert storage.resolve("results") == str((Path.cwd() / "results").resolve())


@pytest.mark.parametrize("url,expected", [
    ("postgresql://optuna:s3cret@db.internal:5432/studies", "postgresql://optuna:***@db.internal:5432/studies"),
    ("postgresql+psycopg://u:p%40ss@127.0.0.1/x", "postgresql+psycopg://u:***@127.0.0.1/x"),
    ("sqlite:////tmp/results/adaptive-optuna.db", "sqlite:////tmp/results/adaptive-optuna.db"),
    ("s3://AKIAX:abc/def+g@bucket/prefix", "s3://AKIAX:***@bucket/prefix"),
    ("s3://bucket/p?endpoint_override=127.0.0.1:9000&scheme=http",
     "s3://bucket/p?endpoint_override=127.0.0.1:9000&scheme=http"),
    ("s3://bucket/p?access_key=AKIAX&secret_key=abc&session_token=t0k&region=eu-west-1",
     "s3://bucket/p?access_key=***&secret_key=***&session_token=***&region=eu-west-1"),
    ("postgresql://u@h/db?password=pw&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
    ("error: a study exists (s3://k:pw@b/p/adaptive-fold0); pass --resume",
     "error: a study exists (s3://k:***@b/p/adaptive-fold0); pass --resume"),
    ("results/adaptive-final", "results/adaptive-final"),
])
def test_credentials_in_urls_are_redacted(url, expected):
    assert storage.redact(url) == expected
    assert storage.has_credentials(url) == (url != expected)


def test_small_files_and_folders_on_a_local_path(tmp_path):
    path = storage.join(tmp_path, "report", "best_config.json")
    assert not storage.exists(path)
    storage.write_json(path, {"folds": {"0": {"value": 0.5}}})
    assert storage.exists(path) and json.loads(storage.read_text(path)) == {"folds": {"0": {"value": 0.5}}}
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["best_config.json"]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(tmp_path, "missing.json"))
    # A local folder is its own local copy; upload to a local path is a copy.
    assert storage.download(tmp_path / "report", tmp_path / "elsewhere") == tmp_path / "report"
    assert not (tmp_path / "elsewhere").exists()
    storage.upload(tmp_path / "report", storage.join(tmp_path, "copy"))
    assert (tmp_path / "copy" / "best_config.json").read_text() == Path(path).read_text()
    uri, local = storage.report_dirs(tmp_path, "adaptive")
    assert uri == str(tmp_path.resolve() / "adaptive-report") and local == Path(uri)
    assert storage.optuna_db(tmp_path, "adaptive") == tmp_path.resolve() / "adaptive-optuna.db"
    assert storage.optuna_db("s3://b/p", "adaptive") == Path.cwd() / "adaptive-optuna.db"
    assert storage.report_dirs("s3://b/p?x=1", "adaptive") == ("s3://b/p/adaptive-report?x=1",
                                                                Path.cwd() / "adaptive-report")


# ----------------------------------------------------------------------------- the S3 server


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (port chosen by the system), stopped at the end of the module."""
    try:
        from moto.server import ThreadedMotoServer
        import boto3
    except ImportError as exc:
        pytest.skip(f"no local S3 server: moto[server] and boto3 (the 'dev' extra) are not installed ({exc})")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)  # start() waits forever if binding fails
    starter.start()
    starter.join(30)
    if starter.is_alive():
        pytest.skip("the local S3 server (moto) did not start on 127.0.0.1 within 30 s")
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.list_buckets()
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is a reason to skip
        server.stop()
        pytest.skip(f"the local S3 server (moto) on 127.0.0.1 does not answer: {exc}")
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)  # this process's pyarrow reads the dummy credentials from here
    try:
        yield {"endpoint": endpoint, "port": port, "client": client}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _bucket(s3) -> str:
    name = f"polydice-{uuid.uuid4().hex[:12]}"
    s3["client"].create_bucket(Bucket=name)
    return name


def _uri(s3, bucket: str, path: str = "", credentials: str = "") -> str:
    """``s3://[credentials@]bucket/path?endpoint_override=127.0.0.1:PORT&scheme=http``."""
    user = f"{credentials}@" if credentials else ""
    return f"s3://{user}{bucket}/{path}?endpoint_override=127.0.0.1:{s3['port']}&scheme=http"


def _keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _get(s3, bucket: str, key: str) -> bytes:
    return s3["client"].get_object(Bucket=bucket, Key=key)["Body"].read()


def _fake_run(folder: Path, tag: str, method: str, dice: list[float]) -> None:
    """A tested run's files as the report reads them, plus weights the report must not download."""
    folder.mkdir(parents=True)
    config = {"dataset": "synthetic", "method": method, "tag": tag, "fold": 0, "folds": 2, "seed": 0}
    (folder / "summary.json").write_text(json.dumps({
        "config": config, "test_dice": sum(dice) / len(dice), "test_iou": 0.4, "val_dice": 0.6, "best_epoch": 2,
        "n_test": len(dice)}))
    rows = ["index,group,dice,difficulty"] + [f"{i},{i},{d},{0.1 * i}" for i, d in enumerate(dice)]
    (folder / "per_image.csv").write_text("\n".join(rows) + "\n")
    (folder / "model.pt").write_bytes(b"\0" * 1024)


def test_small_files_and_folders_on_s3(s3, tmp_path):
    bucket = _bucket(s3)
    path = storage.join(_uri(s3, bucket, "prefix"), "adaptive-report", "best_config.json")
    assert not storage.exists(path)
    with pytest.raises(FileNotFoundError):
        storage.read_text(path)
    storage.write_json(path, {"protocol": "nested"})
    assert storage.exists(path) and json.loads(storage.read_text(path)) == {"protocol": "nested"}
    assert "prefix/adaptive-report/best_config.json" in _keys(s3, bucket)
    storage.write_json(path, {"protocol": "single-fold"})  # replaced whole
    assert json.loads(_get(s3, bucket, "prefix/adaptive-report/best_config.json")) == {"protocol": "single-fold"}

    local = tmp_path / "exp"
    _fake_run(local / "dice-fold0-a", "dice", "dice", [0.5, 0.6])
    (local / "dice-fold0-a" / "checkpoint_000001").mkdir()
    (local / "dice-fold0-a" / "checkpoint_000001" / "summary.json").write_text("{}")
    storage.upload(local, _uri(s3, bucket, "prefix/exp"))
    assert "prefix/exp/dice-fold0-a/model.pt" in _keys(s3, bucket)
    time.sleep(1.1)  # the copies keep the objects' times, not the download's
    copy = storage.download(_uri(s3, bucket, "prefix/exp"), tmp_path / "copy")
    files = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file())
    assert files == ["dice-fold0-a/checkpoint_000001/summary.json", "dice-fold0-a/per_image.csv",
                     "dice-fold0-a/summary.json"]  # the report's files only, no weights
    assert (copy / "dice-fold0-a" / "per_image.csv").read_bytes() == (local / "dice-fold0-a" / "per_image.csv").read_bytes()
    assert abs((copy / "dice-fold0-a" / "summary.json").stat().st_mtime - time.time()) > 1.0
    one = storage.download(path, tmp_path / "one")
    assert one == tmp_path / "one" / "best_config.json" and json.loads(one.read_text())["protocol"] == "single-fold"
    with pytest.raises(FileNotFoundError, match=r"nothing at s3://"):
        storage.download(_uri(s3, bucket, "prefix/none"), tmp_path / "none")


def test_report_from_s3_to_s3_names_the_uris_without_credentials(s3, tmp_path):
    import report

    bucket = _bucket(s3)
    local = tmp_path / "exp"
    _fake_run(local / "dice-fold0-a", "dice", "dice", [0.5, 0.6, 0.7, 0.2])
    _fake_run(local / "adaptive-thesis-fold0-b", "adaptive-thesis", "adaptive", [0.6, 0.6, 0.8, 0.3])
    storage.upload(local, _uri(s3, bucket, "prefix/grid"))
    results = _uri(s3, bucket, "prefix/grid", credentials=f"testing:{SECRET}")
    out = _uri(s3, bucket, "prefix/grid-report", credentials=f"testing:{SECRET}")
    seen = []

    def builder(results_dirs, out_dir, **kwargs):
        seen.extend(str(p.relative_to(d)) for d in results_dirs for p in Path(d).rglob("*") if p.is_file())
        return report.make_report(results_dirs, out_dir, **kwargs)

    table, uploaded = storage.make_report([results], out, builder=builder)
    assert uploaded == storage.join(out, "table.md") and not table.exists()  # built in a temporary folder
    assert sorted(seen) == ["adaptive-thesis-fold0-b/per_image.csv", "adaptive-thesis-fold0-b/summary.json",
                            "dice-fold0-a/per_image.csv", "dice-fold0-a/summary.json"]  # no weights downloaded
    keys = _keys(s3, bucket, "prefix/grid-report/")
    assert {"prefix/grid-report/table.md", "prefix/grid-report/table.csv"} <= set(keys), keys
    for key in keys:
        assert SECRET.encode() not in _get(s3, bucket, key), key
    md = _get(s3, bucket, "prefix/grid-report/table.md").decode()
    assert f"`{storage.redact(results)}`" in md and "testing:***@" in md
    assert "polydice-report-" not in md  # no temporary copy is named
    assert "adaptive-thesis" in _get(s3, bucket, "prefix/grid-report/table.csv").decode()
    # A local --out keeps its tables where asked.
    table, uploaded = storage.make_report([results], tmp_path / "local-report")
    assert uploaded is None and table == tmp_path / "local-report" / "table.md" and SECRET not in table.read_text()
    # A missing best_config.json is listed in the report, as a missing local one is.
    missing = _uri(s3, bucket, "prefix/none/best_config.json", credentials=f"testing:{SECRET}")
    table, _ = storage.make_report([results], tmp_path / "report-3", best_config=missing)
    assert f"best configuration {storage.redact(missing)} could not be read" in table.read_text()
    assert SECRET not in table.read_text()
    with pytest.raises(ValueError, match=r"results folder s3://testing:\*\*\*@.* does not exist"):
        storage.make_report([_uri(s3, bucket, "prefix/none", credentials=f"testing:{SECRET}")], tmp_path / "r")


# ----------------------------------------------------------------------------- a study on S3


SMOKE_ARGS = ["--smoke", "--epochs", "3", "--image-size", "32", "--base-channels", "4", "--seeds", "1"]
STUDY_TIMEOUT = 240


def _optuna_counts(db: Path, study: str, live: bool = True) -> dict:
    """Trials per state. ``live``: the study is running; read only, and {} while it holds the
    file. Otherwise a writing connection, which rolls back what a killed driver left half written
    (a read-only one cannot, and fails)."""
    if not db.exists():
        return {}
    query = ("SELECT t.state, COUNT(*) FROM trials t JOIN studies s ON t.study_id = s.study_id "
             "WHERE s.study_name = ? GROUP BY t.state")
    if not live:
        with sqlite3.connect(db, timeout=30) as con:
            return dict(con.execute(query, (study,)).fetchall())
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            rows = con.execute(query, (study,)).fetchall()
    except sqlite3.Error:
        return {}
    return dict(rows)


def _run(args: list[str], env: dict, log: Path, cwd: Path, timeout: float) -> tuple[int, str]:
    """A study subprocess run to its end in ``cwd``; its whole session is stopped afterwards."""
    import ray_fixtures as rf

    return rf.run_study(args, env, log, timeout, cwd=cwd)


@pytest.mark.slow
@pytest.mark.ray
def test_study_on_s3_killed_resumed_and_reported(s3, tmp_path):
    """``tune_adaptive.py --storage-path s3://bucket/prefix`` (endpoint from AWS_ENDPOINT_URL): it
    says at start where the Optuna SQLite file stays; SIGKILLed after the first search trial, then
    ``--resume`` in the same folder: the study ends with both trials, the final run is tested, and
    best_config.json, the report and the database copy are in the bucket. ``report.py`` then reads
    the final runs from S3 and writes a report to S3 (endpoint and credentials in the URIs), with no
    credential in any file; and ``--resume`` from another folder stops at once, naming the file."""
    pytest.importorskip("ray.tune")
    pytest.importorskip("optuna")
    pytest.importorskip("psutil")
    import ray_fixtures as rf

    bucket = _bucket(s3)
    work = tmp_path / "work"  # the driver's folder: the Optuna SQLite file and the local report
    work.mkdir()
    ray_tmp = rf.short_tmpdir("pds3")
    env = rf.ray_env(ray_tmp, AWS_ENDPOINT_URL=s3["endpoint"], **AWS_ENV)
    storage_path = f"s3://{bucket}/prefix"
    args = [str(STUDIES / "tune_adaptive.py"), *SMOKE_ARGS, "--search-fold", "0", "--num-samples", "3",
            "--max-concurrent", "1", "--num-cpus", "2", "--storage-path", storage_path]
    db = work / "adaptive-optuna.db"
    t0 = time.monotonic()
    try:
        first = rf.StudyProcess(args, env, tmp_path / "first.log", cwd=work)
        try:
            deadline = time.monotonic() + STUDY_TIMEOUT
            # Killed once the first trial is in the Optuna study and in Tune's state in the bucket.
            while time.monotonic() < deadline:
                assert first.proc.poll() is None, f"the study ended before it was killed:\n{first.tail()}"
                first.remember_children()
                if _optuna_counts(db, "adaptive-fold0").get("COMPLETE", 0) >= 1:
                    states = [k for k in _keys(s3, bucket, "prefix/adaptive-fold0/") if "experiment_state" in k]
                    if states and b"TERMINATED" in _get(s3, bucket, states[-1]):
                        break
                time.sleep(0.3)
            else:
                raise AssertionError(f"no search trial finished in {STUDY_TIMEOUT}s:\n{first.tail()}")
        finally:
            left = first.close()
        assert not left, f"processes survived the kill: {left}"
        out1 = (tmp_path / "first.log").read_text(errors="replace")
        # Where the Optuna studies stay is said before any training.
        assert f"optuna: SQLite file {db}" in out1 and out1.index("optuna: SQLite file") < out1.index("search: fold 0")
        done = _optuna_counts(db, "adaptive-fold0", live=False).get("COMPLETE", 0)
        # Three trials, so that one is left to run even when a second one ended while the state was synced.
        assert done in (1, 2), f"{done} trials finished before the kill\n{out1[-4000:]}"
        assert "prefix/adaptive-fold0/tuner.pkl" in _keys(s3, bucket)

        rc, out = _run([*args, "--resume"], env, tmp_path / "resume.log", work, STUDY_TIMEOUT)
        assert rc == 0, out[-8000:]
        assert f"continuing study 'adaptive-fold0' with {done} finished trials" in out, out[-8000:]
        counts = _optuna_counts(db, "adaptive-fold0", live=False)
        assert counts.get("COMPLETE") == 3 and counts.get("RUNNING", 0) == 0, counts
        keys = _keys(s3, bucket, "prefix/")
        for key in ("adaptive-report/table.md", "adaptive-report/table.csv", "adaptive-report/best_config.json",
                    "adaptive-optuna.db"):
            assert f"prefix/{key}" in keys, (key, keys)
        assert any(k.startswith("prefix/adaptive-final/") and k.endswith("/summary.json") for k in keys), keys
        best = json.loads(_get(s3, bucket, "prefix/adaptive-report/best_config.json"))
        assert best["protocol"] == "single-fold" and best["folds"]["0"]["n_complete"] == counts["COMPLETE"], best
        assert "adaptive-tuned-fold0" in _get(s3, bucket, "prefix/adaptive-report/table.csv").decode()
        md = _get(s3, bucket, "prefix/adaptive-report/table.md").decode()
        assert f"`{storage_path}/adaptive-final`" in md and "polydice-report-" not in md
        assert (work / "adaptive-report" / "table.md").read_text() == md  # the local copy of the report
        assert f"table: {work / 'adaptive-report' / 'table.md'} (uploaded to {storage_path}/adaptive-report/table.md)" in out
        # The uploaded database copy holds the finished study.
        copy = tmp_path / "copy.db"
        copy.write_bytes(_get(s3, bucket, "prefix/adaptive-optuna.db"))
        assert _optuna_counts(copy, "adaptive-fold0", live=False).get("COMPLETE") == counts["COMPLETE"]

        # The report from S3 to S3, endpoint and credentials in the URIs, no endpoint variable.
        report_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        report_env["AWS_EC2_METADATA_DISABLED"] = "true"
        results = _uri(s3, bucket, "prefix/adaptive-final", credentials=f"testing:{SECRET}")
        best_uri = _uri(s3, bucket, "prefix/adaptive-report/best_config.json", credentials=f"testing:{SECRET}")
        proc = subprocess.run([sys.executable, str(STUDIES / "report.py"), "--results", results, "--best-config", best_uri,
                               "--out", _uri(s3, bucket, "prefix/r2", credentials=f"testing:{SECRET}")],
                              env=report_env, cwd=work, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert SECRET not in proc.stdout + proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == storage.redact(_uri(s3, bucket, "prefix/r2/table.md",
                                                                           credentials=f"testing:{SECRET}"))
        r2 = _keys(s3, bucket, "prefix/r2/")
        assert {"prefix/r2/table.md", "prefix/r2/table.csv", "prefix/r2/best_config_per_fold.csv"} <= set(r2), r2
        for key in r2:
            assert SECRET.encode() not in _get(s3, bucket, key), key
        r2_md = _get(s3, bucket, "prefix/r2/table.md").decode()
        assert "adaptive-tuned-fold0" in r2_md and "testing:***@" in r2_md

        # --resume elsewhere: the SQLite file is not there; one error line before anything starts.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        rc, out = _run([*args, "--resume"], env, tmp_path / "elsewhere.log", elsewhere, 120)
        assert rc == 2, out[-4000:]
        assert f"there is none in {elsewhere}" in out and f"{storage_path}/adaptive-optuna.db is its copy" in out, out
        assert "search: fold" not in out and not (elsewhere / "adaptive-optuna.db").exists()
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"S3 study, kill, resume and reports: {time.monotonic() - t0:.0f}s")


@pytest.mark.slow
@pytest.mark.ray
def test_grid_on_s3_and_its_report(s3, tmp_path):
    """``grid_baselines.py --storage-path s3://…?endpoint_override=…``: the runs and the report land in
    the bucket (the report also in ./baselines-report), and a second grid of the same name is refused."""
    pytest.importorskip("ray.tune")
    pytest.importorskip("psutil")
    import ray_fixtures as rf

    bucket = _bucket(s3)
    work = tmp_path / "work"
    work.mkdir()
    ray_tmp = rf.short_tmpdir("pds3g")
    try:
        env = rf.ray_env(ray_tmp, **AWS_ENV)
        storage_path = _uri(s3, bucket, "prefix")
        args = [str(STUDIES / "grid_baselines.py"), *SMOKE_ARGS, "--methods", "dice", "--fold-list", "0",
                "--num-cpus", "2", "--storage-path", storage_path]
        rc, out = _run(args, env, tmp_path / "grid.log", work, STUDY_TIMEOUT)
        assert rc == 0, out[-8000:]
        keys = _keys(s3, bucket, "prefix/")
        assert {"prefix/baselines-report/table.md", "prefix/baselines-report/table.csv"} <= set(keys), keys
        assert any(k.startswith("prefix/baselines/dice-fold0-") and k.endswith("/summary.json") for k in keys), keys
        assert "dice" in _get(s3, bucket, "prefix/baselines-report/table.csv").decode()
        assert (work / "baselines-report" / "table.md").read_bytes() == _get(s3, bucket, "prefix/baselines-report/table.md")
        assert f"uploaded to {storage.join(storage_path, 'baselines-report', 'table.md')}" in out
        rc, out = _run(args, env, tmp_path / "again.log", work, 120)
        assert rc == 2 and "a grid named 'baselines' already exists" in out, out[-4000:]
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
