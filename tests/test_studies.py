"""The distributed studies: Ray Tune resources, a two-node cluster, loopback binding, kill/resume,
Optuna on PostgreSQL and SQLite, no test-fold reads in the search, and the final report.

Everything runs on CPUs with tiny settings (``--smoke``, 32 px, 4 base channels). Ray runs for real:
logical GPUs stand in for GPUs, ``ray.cluster_utils.Cluster`` for a two-node cluster on loopback.
Each Ray instance a test starts gets its own Ray temp dir and is shut down (or its process session
killed) in the teardown, also when the test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

# Before Ray is imported: Ray reads this once, at import, to decide which interfaces to bind.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("ray.tune")
pytest.importorskip("optuna")
psutil = pytest.importorskip("psutil")

import optuna  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402

import ray_fixtures as rf  # noqa: E402
from polydice.config import TrainConfig  # noqa: E402
from polydice.data import SegmentationData  # noqa: E402
from polydice.dataset import make_folds  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = rf.REPO
STUDIES = REPO / "studies"
SMOKE_ARGS = ["--smoke", "--epochs", "3", "--image-size", "32", "--base-channels", "4"]
STUDY_TIMEOUT = 300
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

if str(STUDIES) not in sys.path:
    sys.path.insert(0, str(STUDIES))


def _tiny_config(**extra) -> TrainConfig:
    values = dict(dataset="synthetic", image_size=32, base_channels=4, n_synthetic=40, mc_samples=2,
                  batch_size=8, epochs=2, e0=1, tau=1, method="adaptive", log_maps=0, tensorboard=False)
    values.update(extra)
    return TrainConfig(**values)


def _optuna_counts(url: str, name: str) -> dict:
    study = optuna.load_study(study_name=name, storage=url)
    counts: dict = {}
    for t in study.trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def _result_rows(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.iterdir() if p.is_dir() and (p / "params.json").exists())


@pytest.fixture
def ray_tmpdir():
    path = rf.short_tmpdir("pdray")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def local_ray(ray_tmpdir, monkeypatch):
    """Run Ray in this process in a private temp dir; always shut down, probe always removed."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", ray_tmpdir)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        yield ray_tmpdir
    finally:
        ray.shutdown()
        rf.uninstall_probe()


# ============================================================================ 1. resources


def test_max_concurrent_from_gpu_shares():
    """The study scripts' own arithmetic: 4 GPUs at 0.5 per trial → 8 at once, capped by --max-concurrent."""
    import study_cli
    from tune_adaptive import build_parser

    args = build_parser().parse_args(["--num-gpus", "4", "--gpus-per-trial", "0.5", "--num-cpus", "16"])
    assert study_cli.resources(args) == (1, 0.5)
    assert study_cli.max_concurrent(args, 0.5) == 8
    args = build_parser().parse_args(["--num-gpus", "4", "--gpus-per-trial", "0.5", "--max-concurrent", "3"])
    assert study_cli.max_concurrent(args, 0.5) == 3
    args = build_parser().parse_args(["--num-gpus", "0"])
    assert study_cli.resources(args) == (1, 0.0)
    with pytest.raises(SystemExit):
        study_cli.resources(build_parser().parse_args(["--num-gpus", "1", "--gpus-per-trial", "2"]))


def test_fractional_gpus_pack_eight_trials_on_four_logical_gpus(local_ray, tmp_path):
    """4 logical GPUs, 0.5 GPU and 1 CPU per trial, 16 CPUs: Ray runs at most 8 trials at once (the
    GPUs bind, not the CPUs), each trial is told it holds 0.5 GPU and one GPU id, two trials share a
    GPU id, and torch still trains on the CPU. No concurrency cap is set: only Ray's accounting limits."""
    from polydice.train import load_data
    from polydice.tune import init_ray, make_trainable, run_config

    assert init_ray(num_cpus=16, num_gpus=4) == "local"
    assert ray.cluster_resources().get("GPU") == 4
    rf.install_probe()
    base = _tiny_config()
    data = load_data(base)
    trainable = make_trainable(base, data, cpus_per_trial=1, gpus_per_trial=0.5, evaluate_test=False)
    probe_dir = tmp_path / "probe"
    n_trials = 9
    tuner = tune.Tuner(
        trainable,
        # Each trial waits (at most 60 s) until 8 trials have started, so that the 8 Ray admits
        # surely overlap; a 9th and 10th admitted at once (a wrong GPU accounting) would overlap too.
        param_space={"seed": tune.grid_search(list(range(n_trials))), "_probe_dir": str(probe_dir),
                     "_probe_wait_for": 8, "_probe_wait_s": 60},
        tune_config=tune.TuneConfig(metric="best_val_dice", mode="max"),
        run_config=run_config("resources", str(tmp_path / "results"), max_failures=0, verbose=0),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    probes = rf.read_probes(tmp_path / "results" / "resources")
    assert len(probes) == n_trials
    for p in probes:
        assert p["resources"].get("GPU") == 0.5 and p["resources"].get("CPU") == 1, p
        assert len(p["gpu_ids"]) == 1 and p["gpu_ids"][0] in {"0", "1", "2", "3"}, p
        assert p["cuda_visible_devices"] == p["gpu_ids"][0], p
        assert p["torch_threads"] == 1, p  # one CPU per trial: one torch thread
    overlap = rf.max_overlap([(p["start"], p["end"]) for p in probes])
    assert overlap == 8, f"{overlap} trials ran at once; 4 GPUs / 0.5 per trial admit exactly 8"
    # No GPU id is shared by more than two trials at once (0.5 each).
    for gpu in {p["gpu_ids"][0] for p in probes}:
        same = [(p["start"], p["end"]) for p in probes if p["gpu_ids"][0] == gpu]
        assert rf.max_overlap(same) <= 2, f"GPU {gpu} over-committed"
    for trial_dir in _trial_dirs(tmp_path / "results" / "resources"):
        summary = json.loads((trial_dir / "summary.json").read_text())
        assert summary["device"] == "cpu"


# ============================================================================ 2. two-node cluster


@pytest.fixture(scope="class")
def two_node_cluster():
    """A head (1 CPU) and a worker node (1 CPU) on 127.0.0.1, in a private Ray temp dir.

    The probe settings travel as environment variables: the nodes' workers inherit this process's
    environment, not the driver's.
    """
    from ray.cluster_utils import Cluster

    tmp = rf.short_tmpdir("pdclu")
    probe_dir = Path(tmp) / "probe"
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS", "POLYDICE_PROBE_DIR", "POLYDICE_PROBE_WAIT_FOR")}
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(RAY_TMPDIR=tmp, POLYDICE_PROBE_DIR=str(probe_dir), POLYDICE_PROBE_WAIT_FOR="2")
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "node_ip_address": "127.0.0.1", "resources": {"head_node": 1}})
        worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"worker_node": 1})
        cluster.wait_for_nodes()
        yield {"cluster": cluster, "tmp": tmp, "probe_dir": probe_dir,
               "nodes": {cluster.head_node.node_id: "head", worker.node_id: "worker"}}
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


class TestTwoNodeCluster:
    def test_study_runs_on_both_nodes(self, two_node_cluster, tmp_path):
        """``--address`` of a running cluster: the driver joins it (RAY_ADDRESS unset) and the two
        concurrent search trials land one on each node (each has 1 CPU)."""
        c = two_node_cluster
        storage = tmp_path / "results"
        env = rf.ray_env(c["tmp"])
        rc, out = rf.run_study(
            ["tests/ray_fixtures.py", "tune_adaptive", "--address", c["cluster"].address, *SMOKE_ARGS,
             "--num-samples", "2", "--search-fold", "0", "--final-top", "0", "--storage-path", str(storage)],
            env, tmp_path / "study.log", STUDY_TIMEOUT)
        assert rc == 0, out[-8000:]
        assert "ray: cluster" in out, out[-8000:]
        counts = _optuna_counts(f"sqlite:///{storage / 'adaptive-optuna.db'}", "adaptive-fold0")
        assert counts.get("COMPLETE") == 2, counts
        probes = rf.read_probes(storage / "adaptive-fold0")
        assert len(probes) == 2
        nodes = {p["node_id"] for p in probes}
        assert nodes <= set(c["nodes"]), (nodes, c["nodes"])
        assert nodes == set(c["nodes"]), f"trials ran only on {[c['nodes'][n] for n in nodes]}"

    def test_local_mode_does_not_join_a_running_cluster(self, two_node_cluster, tmp_path):
        """``init_ray()`` without an address must start its own loopback instance even when a cluster
        started on this machine has left its address in Ray's temp dir (as ``ray start`` does)."""
        c = two_node_cluster
        address_file = Path(c["tmp"]) / "ray" / "ray_current_cluster"
        assert address_file.exists()  # what ray.init() without an address would join
        code = ("import ray, json; from polydice.tune import init_ray; mode = init_ray(num_cpus=1); "
                "print('RESULT', json.dumps({'mode': mode, 'gcs': ray.get_runtime_context().gcs_address}))")
        rc, out = rf.run_study(["-c", code], rf.ray_env(c["tmp"]), tmp_path / "init.log", 120)
        assert rc == 0, out[-8000:]
        result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).split(" ", 1)[1])
        assert result["mode"] == "local"
        assert result["gcs"] != c["cluster"].address, "a local study joined the cluster running on the machine"


# ============================================================================ 3. loopback


LISTENER = r"""
import os, sys, time
from pathlib import Path
from polydice.tune import init_ray
import ray
print("MODE", init_ray(num_cpus=1), flush=True)

@ray.remote
def pid():
    return os.getpid()

print("WORKER", ray.get(pid.remote()), flush=True)
print("UP", flush=True)
stop = Path(sys.argv[1])
deadline = time.time() + 120
while not stop.exists() and time.time() < deadline:
    time.sleep(0.1)
ray.shutdown()
"""


@pytest.mark.parametrize("env_var", ["0", None], ids=["env-0", "env-unset"])
def test_local_ray_listens_on_loopback_only(env_var, ray_tmpdir, tmp_path):
    """Every listening socket of a local Ray (driver, GCS, raylet, agents, a worker) is on loopback.

    ``env-unset`` is a laptop run without ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``: ``init_ray``
    must still bind loopback only (DESIGN: never expose the Ray ports)."""
    env = rf.ray_env(ray_tmpdir)
    if env_var is None:
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    stop = tmp_path / "stop"
    proc = rf.StudyProcess(["-c", LISTENER, str(stop)], env, tmp_path / "listener.log")
    try:
        deadline = time.monotonic() + 120
        while "UP" not in proc.log_path.read_text() and time.monotonic() < deadline:
            assert proc.proc.poll() is None, proc.tail()
            time.sleep(0.2)
        assert "UP" in proc.log_path.read_text(), proc.tail()
        time.sleep(1.0)  # agents finish binding
        pids = set(rf.session_pids(proc.sid)) | set(rf.descendants(proc.proc.pid))
        worker = int(next(line.split()[1] for line in proc.log_path.read_text().splitlines() if line.startswith("WORKER")))
        assert worker in pids
        listening = [(c.pid, psutil.Process(c.pid).name(), c.laddr.ip, c.laddr.port)
                     for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        names = {name for _, name, _, _ in listening}
        assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), listening
        exposed = [x for x in listening if x[2] not in LOOPBACK and not ipaddress.ip_address(x[2]).is_loopback]
        assert not exposed, f"Ray listens beyond loopback: {exposed}"
        stop.write_text("stop")
        proc.wait(60)
    finally:
        left = proc.close()
    assert not left, f"Ray processes survived: {left}"


# ============================================================================ 4. kill and resume


def _sqlite_complete(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _best_folds(storage: Path) -> dict:
    try:
        return json.loads((storage / "adaptive-report" / "best_config.json").read_text())["folds"]
    except (OSError, ValueError, KeyError):
        return {}


def test_killed_study_resumes_without_retraining_finished_trials(ray_tmpdir, tmp_path):
    """SIGKILL the driver (and its whole local Ray) while fold 1's search runs, after fold 0's
    search and one of fold 1's trials finished; then ``--resume``: fold 0 is not searched again,
    fold 1's study ends with exactly its trials, no finished trial is trained again, and the
    resumed run exits 0."""
    storage = tmp_path / "results"
    db = storage / "adaptive-optuna.db"
    num_samples, epochs = 3, 3
    args = ["studies/tune_adaptive.py", *SMOKE_ARGS, "--folds", "2", "--num-samples", str(num_samples),
            "--max-concurrent", "1", "--final-top", "0", "--storage-path", str(storage)]
    env = rf.ray_env(ray_tmpdir)
    first = rf.StudyProcess(args, env, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + STUDY_TIMEOUT
        while not ("0" in _best_folds(storage) and _sqlite_complete(db) >= num_samples + 1) \
                and time.monotonic() < deadline:
            assert first.proc.poll() is None, f"the study ended before it was killed:\n{first.tail()}"
            first.remember_children()
            time.sleep(0.2)
        assert "0" in _best_folds(storage) and _sqlite_complete(db) >= num_samples + 1, first.tail()
    finally:
        left = first.close()  # SIGKILL: the driver and every process of its session
    assert not left, f"processes survived the kill: {left}"
    done_fold1 = _optuna_counts(f"sqlite:///{db}", "adaptive-fold1").get("COMPLETE", 0)
    assert 1 <= done_fold1 < num_samples, "fold 1's search finished before the kill: nothing to resume"
    fold0 = {d.name: (d / "result.json").read_bytes() for d in _trial_dirs(storage / "adaptive-fold0")}
    finished = {d.name: (d / "result.json").read_bytes() for d in _trial_dirs(storage / "adaptive-fold1")
                if any(r.get("epoch") == epochs for r in _result_rows(d))}
    assert len(fold0) == num_samples and len(finished) >= 1, "Tune had not written the finished trials' results"

    rc, out = rf.run_study([*args, "--resume"], env, tmp_path / "resume.log", STUDY_TIMEOUT)
    assert rc == 0, out[-8000:]
    assert "search: fold 0 finished earlier" in out, out[-8000:]
    assert f"continuing study 'adaptive-fold1' with {done_fold1} finished trials" in out, out[-8000:]
    assert _optuna_counts(f"sqlite:///{db}", "adaptive-fold0") == {"COMPLETE": num_samples}
    counts = _optuna_counts(f"sqlite:///{db}", "adaptive-fold1")
    assert counts.get("COMPLETE") == num_samples, counts
    # The trial suggested just before the kill, after Tune's last snapshot, is failed, not left running.
    assert counts.get("RUNNING", 0) == 0 and counts.get("FAIL", 0) <= 1, counts
    assert sorted(_best_folds(storage)) == ["0", "1"]
    for name, before in fold0.items():
        assert (storage / "adaptive-fold0" / name / "result.json").read_bytes() == before, f"fold 0 trial {name} ran again"
    dirs = _trial_dirs(storage / "adaptive-fold1")
    complete = [d for d in dirs if sorted({r["epoch"] for r in _result_rows(d)}) == list(range(1, epochs + 1))]
    assert len(complete) == num_samples, [(d.name, [r["epoch"] for r in _result_rows(d)]) for d in dirs]
    # At most one more folder: a trial started just before the kill, after Tune's last snapshot.
    assert len(dirs) <= num_samples + 1, [d.name for d in dirs]
    for name, before in finished.items():
        after = (storage / "adaptive-fold1" / name / "result.json").read_bytes()
        assert after == before, f"trial {name} finished before the kill but was trained again"
    # Only the trial interrupted by the kill may have run epoch 1 twice (no checkpoint yet).
    epoch1 = sum(r.get("epoch") == 1 for d in dirs for r in _result_rows(d))
    assert num_samples <= epoch1 <= num_samples + 1, epoch1


def test_worker_killed_mid_training_restarts_from_checkpoint_with_same_epsilon(local_ray, tmp_path):
    """A trial whose worker process is SIGKILLed after the first ε refresh (epoch 2, checkpointed)
    restarts on a new worker from that checkpoint (FailureConfig) and ends with exactly the ε table,
    history and validation Dice of the same trial run without interruption."""
    from polydice.train import load_data
    from polydice.tune import init_ray, make_trainable, run_config

    init_ray(num_cpus=2)
    rf.install_probe()
    base = _tiny_config(epochs=4, e0=2, tau=2, seed=3)
    data = load_data(base)
    probe_dir = tmp_path / "probe"
    trainable = make_trainable(base, data, cpus_per_trial=1, evaluate_test=False)
    tuner = tune.Tuner(
        trainable,
        param_space={"_probe_dir": str(probe_dir), "_probe_kill_at": tune.grid_search([3, 0])},
        run_config=run_config("killed", str(tmp_path / "results"), max_failures=1, verbose=0),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    by_kill = {r.config["_probe_kill_at"]: Path(r.path) for r in results}
    killed, clean = by_kill[3], by_kill[0]

    markers = list(probe_dir.glob("killed-*"))
    assert len(markers) == 1, "the worker was not killed"
    killed_pid = json.loads(markers[0].read_text())["pid"]
    rows = _result_rows(killed)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4], "the restarted trial did not continue after epoch 2"
    assert {r["pid"] for r in rows if r["epoch"] <= 2} == {killed_pid}, "epochs 1-2 ran again after the restart"
    assert killed_pid not in {r["pid"] for r in rows if r["epoch"] >= 3}, "epochs 3-4 ran in the killed process"
    assert len(list(killed.glob("probe-*.json"))) == 1  # only the restart returned normally

    eps_k, eps_c = pd.read_csv(killed / "epsilon.csv"), pd.read_csv(clean / "epsilon.csv")
    assert sorted(eps_c["epoch"].unique()) == [2, 4]
    pd.testing.assert_frame_equal(eps_k, eps_c, check_exact=True)
    assert eps_c.loc[eps_c["epoch"] == 2, "epsilon"].std() > 0  # a real per-image table
    hist_k = pd.read_csv(killed / "history.csv").drop(columns="epoch_seconds")
    hist_c = pd.read_csv(clean / "history.csv").drop(columns="epoch_seconds")
    pd.testing.assert_frame_equal(hist_k, hist_c, check_exact=True)
    sum_k, sum_c = (json.loads((d / "summary.json").read_text()) for d in (killed, clean))
    assert (sum_k["val_dice"], sum_k["best_epoch"]) == (sum_c["val_dice"], sum_c["best_epoch"])


# ============================================================================ replicates


def test_grid_trains_every_method_per_seed_and_one_selection_run_per_fold(ray_tmpdir, tmp_path):
    """``--seeds 2`` on one fold and two methods: two replicates of each method with the seeds
    --seed + 0 and + 1 in their summary.json (and folder names), and one dice-select run, method
    dice with seed --seed + 10000. ``--resume`` of the finished grid restores it and trains nothing."""
    from polydice.config import SELECTION_SEED_OFFSET, SELECTION_TAG

    storage, seed = tmp_path / "results", 3
    args = ["studies/grid_baselines.py", *SMOKE_ARGS, "--folds", "2", "--fold-list", "0", "--seeds", "2",
            "--seed", str(seed), "--methods", "dice", "polydice-eps+0.0", "--no-report", "--storage-path", str(storage)]
    env = rf.ray_env(ray_tmpdir)
    rc, out = rf.run_study(args, env, tmp_path / "grid.log", STUDY_TIMEOUT)
    assert rc == 0, out[-8000:]
    assert "grid: 5 runs, 0 errors" in out, out[-8000:]
    assert f"fold 0 seed {seed + 1} dice:" in out, out[-8000:]
    dirs = _trial_dirs(storage / "baselines")
    runs = {}
    for d in dirs:
        config = json.loads((d / "summary.json").read_text())["config"]
        assert config["fold"] == 0 and d.name.startswith(f"{config['tag']}-fold0-seed{config['seed']}-"), d
        runs.setdefault(config["tag"], []).append((config["method"], config["seed"]))
    assert {tag: sorted(v) for tag, v in runs.items()} == {
        "dice": [("dice", seed), ("dice", seed + 1)],
        "polydice-eps+0.0": [("polydice", seed), ("polydice", seed + 1)],
        SELECTION_TAG: [("dice", seed + SELECTION_SEED_OFFSET)],
    }
    before = {d.name: (d / "result.json").read_bytes() for d in dirs}

    rc, out = rf.run_study([*args, "--resume"], env, tmp_path / "resume.log", STUDY_TIMEOUT)
    assert rc == 0, out[-8000:]
    assert "grid: 5 runs, 0 errors" in out, out[-8000:]
    assert {d.name: (d / "result.json").read_bytes() for d in _trial_dirs(storage / "baselines")} == before


# ============================================================================ shared finished study


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A small baseline grid and an adaptive study compared against it (default SQLite storage)."""
    tmp = tmp_path_factory.mktemp("finished")
    storage = tmp / "results"
    ray_tmp = rf.short_tmpdir("pdfin")
    try:
        env = rf.ray_env(ray_tmp)
        common = [*SMOKE_ARGS, "--folds", "2", "--storage-path", str(storage)]
        rc, out = rf.run_study(
            ["studies/grid_baselines.py", *common, "--seeds", "1", "--methods", "dice", "polydice-eps+0.0",
             "polydice-eps+0.2", "adaptive-thesis", "--no-report"], env, tmp / "grid.log", STUDY_TIMEOUT)
        assert rc == 0, out[-8000:]
        # Two seeds of each fold's final run (the search is the same with any --seeds).
        rc, out = rf.run_study(
            ["studies/tune_adaptive.py", *common, "--num-samples", "2", "--seeds", "2",
             "--compare", str(storage / "baselines")], env, tmp / "tune.log", STUDY_TIMEOUT)
        assert rc == 0, out[-8000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"storage": storage, "num_samples": 2, "folds": 2, "final_seeds": [0, 1],
            "url": f"sqlite:///{storage / 'adaptive-optuna.db'}", "studies": ["adaptive-fold0", "adaptive-fold1"]}


# ============================================================================ 5. Optuna storages


@pytest.fixture(scope="module")
def postgres_url():
    with rf.postgres_server() as server:
        yield server.url


@pytest.fixture(scope="module")
def postgres_study(postgres_url, tmp_path_factory):
    # The URL as the docs write it (cluster/README.md): SQLAlchemy must find a driver for it.
    try:
        optuna.storages.RDBStorage(postgres_url)
    except ImportError as exc:
        import sqlalchemy

        pytest.fail(f"{postgres_url.split('@')[0]}@...: no database driver: SQLAlchemy {sqlalchemy.__version__} "
                    f"maps postgresql:// to {sqlalchemy.engine.make_url(postgres_url).get_dialect().driver!r} "
                    f"({exc.__cause__ or exc}); the studies extra must install that driver")
    tmp = tmp_path_factory.mktemp("pgstudy")
    storage = tmp / "results"
    ray_tmp = rf.short_tmpdir("pdpgs")
    try:
        rc, out = rf.run_study(
            ["studies/tune_adaptive.py", *SMOKE_ARGS, "--num-samples", "2", "--search-fold", "0", "--final-top", "0",
             "--optuna-storage", postgres_url, "--storage-path", str(storage)],
            rf.ray_env(ray_tmp), tmp / "tune.log", STUDY_TIMEOUT)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rc == 0, out[-8000:]
    return {"storage": storage, "num_samples": 2, "url": postgres_url, "studies": ["adaptive-fold0"]}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_optuna_study_is_persisted(backend, request):
    """Each outer fold's search is its own Optuna study ``adaptive-fold<f>`` in the storage it was
    given (nested: every fold; ``--search-fold 0``: fold 0 only), with the requested trials, each
    with a validation-Dice value and the controller's parameters."""
    study = request.getfixturevalue("finished_study" if backend == "sqlite" else "postgres_study")
    assert study["url"].startswith(backend)
    names = {s.study_name for s in optuna.get_all_study_summaries(study["url"])}
    assert names == set(study["studies"]), names
    best = json.loads((study["storage"] / "adaptive-report" / "best_config.json").read_text())
    assert best["protocol"] == ("nested" if len(study["studies"]) > 1 else "single-fold")
    assert sorted(best["folds"]) == [name.removeprefix("adaptive-fold") for name in sorted(study["studies"])]
    for name in study["studies"]:
        loaded = optuna.load_study(study_name=name, storage=study["url"])
        complete = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(loaded.trials) == len(complete) == study["num_samples"]
        assert loaded.direction == optuna.study.StudyDirection.MAXIMIZE
        for t in complete:
            assert 0.0 <= t.value <= 1.0
            assert set(t.params) == {"k", "q", "e0", "tau", "eps_min", "eps_max"}
            assert t.params["eps_min"] < t.params["eps_max"]
        # The thesis configuration is evaluated first.
        assert complete[0].params["k"] == 2.0 and complete[0].params["q"] == 25.0
        entry = best["folds"][name.removeprefix("adaptive-fold")]
        assert entry["study_name"] == name and entry["n_trials"] == study["num_samples"]
        top = max(complete, key=lambda t: t.value)
        assert (entry["value"], entry["params"]) == (top.value, top.params)
    if backend == "postgresql":
        assert not (study["storage"] / "adaptive-optuna.db").exists(), "a SQLite study was made as well"


# ============================================================================ 6. no test-fold reads


class _Recording(np.ndarray):
    """An ndarray that records every first-axis index read through ``[]``."""

    def __getitem__(self, key):
        self.log.update(_indices(key, len(self)))
        return np.ndarray.__getitem__(self.view(np.ndarray), key)


def _indices(key, n: int) -> set[int]:
    first = key[0] if isinstance(key, tuple) else key
    if isinstance(first, slice):
        return set(range(n)[first])
    if first is Ellipsis:
        return set(range(n))
    arr = np.asarray(first)
    if arr.dtype == bool:
        return set(np.flatnonzero(arr).tolist())
    return set(np.atleast_1d(arr).astype(np.int64).tolist())


def _instrumented(data: SegmentationData) -> tuple[SegmentationData, dict]:
    images = data.images.view(_Recording)
    masks = data.masks.view(_Recording)
    images.log, masks.log = set(), set()
    return SegmentationData(data.name, images, masks, data.groups, list(data.names)), {"images": images.log, "masks": masks.log}


@pytest.mark.parametrize("fold", range(5))
def test_search_never_reads_the_test_fold(fold, monkeypatch, tmp_path):
    """For every outer fold f, ``train(evaluate_test=False)`` on fold f (what each trial of f's
    search runs) reads f's training and validation images only; with ``evaluate_test=True`` the
    same instrument sees the test images. (That fold f's search trials run on fold f is checked on
    a real study in test_nested_search_and_final_runs_stay_in_their_fold.)"""
    import polydice.evaluate as ev
    import polydice.train as pt

    cfg = _tiny_config(epochs=2, e0=1, tau=1, fold=fold)
    data = pt.load_data(cfg)
    train_idx, val_idx, test_idx = make_folds(data.groups, cfg.folds, seed=cfg.split_seed,
                                              val_fraction=cfg.val_fraction)[cfg.fold]
    test = set(test_idx.tolist())
    estimated: list[int] = []
    original = ev.estimate_uncertainty

    def recording_estimate(model, images, masks, indices=None, **kwargs):
        # Reads the arrays whole (torch.as_tensor), then only the rows in ``indices``.
        estimated.extend(range(len(images)) if indices is None else np.asarray(indices).tolist())
        return original(model, images, masks, indices, **kwargs)

    monkeypatch.setattr(ev, "estimate_uncertainty", recording_estimate)

    search_data, log = _instrumented(data)
    result = pt.train(cfg, data=search_data, out_dir=tmp_path / "search", evaluate_test=False)
    read = log["images"] | log["masks"] | set(estimated)
    assert set(train_idx.tolist()) <= read and set(val_idx.tolist()) <= read  # the instrument sees reads
    assert not read & test, f"the search read test images {sorted(read & test)}"
    assert not any(k.startswith("test_") for k in result.summary)
    assert not (tmp_path / "search" / "per_image.csv").exists()

    estimated.clear()
    final_data, log = _instrumented(data)
    pt.train(cfg, data=final_data, out_dir=tmp_path / "final", evaluate_test=True)
    read = log["images"] | log["masks"] | set(estimated)
    assert test <= read, "the instrument does not see the test reads of a tested run"


def test_nested_search_and_final_runs_stay_in_their_fold(finished_study):
    """Nested cross-validation on a real study: every search trial of ``adaptive-fold<f>`` trained
    on outer fold f (so, by test_search_never_reads_the_test_fold, never read f's test images) with
    --seed, and fold f's final runs, one per seed of --seeds, used fold f's own best parameters and
    were tested on fold f only."""
    storage = finished_study["storage"]
    best = json.loads((storage / "adaptive-report" / "best_config.json").read_text())
    for fold in range(finished_study["folds"]):
        trials = _trial_dirs(storage / f"adaptive-fold{fold}")
        assert len(trials) == finished_study["num_samples"]
        for d in trials:
            config = json.loads((d / "summary.json").read_text())["config"]
            assert (config["fold"], config["seed"]) == (fold, 0), d
            assert d.name.startswith(f"search-fold{fold}-"), d
    finals: dict = {}
    for d in _trial_dirs(storage / "adaptive-final"):
        summary = json.loads((d / "summary.json").read_text())
        config = summary["config"]
        assert d.name.startswith(f"adaptive-tuned-fold{config['fold']}-seed{config['seed']}-"), d
        finals.setdefault(config["fold"], []).append(summary)
    assert sorted(finals) == list(range(finished_study["folds"]))
    for fold, summaries in finals.items():
        assert sorted(s["config"]["seed"] for s in summaries) == finished_study["final_seeds"], fold
        params = best["folds"][str(fold)]["params"]
        for summary in summaries:
            assert {k: summary["config"][k] for k in params} == params, (fold, params)
            assert summary["config"]["tag"] == "adaptive-tuned"


def test_search_trials_of_the_study_are_untested(finished_study):
    """The search trials that ``tune_adaptive.py`` ran (through ``polydice.tune.training_function``)
    report and write no test metric and no per-image test file; the final runs do."""
    search = [d for f in range(finished_study["folds"]) for d in _trial_dirs(finished_study["storage"] / f"adaptive-fold{f}")]
    assert len(search) == finished_study["num_samples"] * finished_study["folds"]
    for d in search:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["config"]["tag"] == "adaptive-search"
        assert not [k for k in summary if k.startswith("test_")], d
        assert not list(d.rglob("per_image.csv")), d
        assert not [k for r in _result_rows(d) for k in r if k.startswith("test_")], d
    final = _trial_dirs(finished_study["storage"] / "adaptive-final")
    assert len(final) == finished_study["folds"] * len(finished_study["final_seeds"])
    for d in final:
        assert "test_dice" in json.loads((d / "summary.json").read_text())
        assert (d / "per_image.csv").exists()


# ============================================================================ 7. report


def test_report_of_a_finished_study(finished_study):
    """The report of the adaptive study with ``--compare`` the grid: every method row, the fixed-ε
    oracle flagged as an oracle (a copy of the best fixed-ε row on test Dice), and the plots."""
    report = finished_study["storage"] / "adaptive-report"
    table = pd.read_csv(report / "table.csv")
    labels = set(table["label"])
    for label in ("dice", "polydice-eps+0.0", "polydice-eps+0.2", "adaptive-thesis", "adaptive-tuned"):
        assert label in labels, labels
    assert (table.loc[~table["oracle"], "folds"] == finished_study["folds"]).all(), table[["label", "folds"]]
    oracle = table[table["oracle"]]
    assert len(oracle) == 1, table[["label", "oracle"]]
    fixed = table[(~table["oracle"]) & table["label"].isin(["polydice-eps+0.0", "polydice-eps+0.2"])]
    best = fixed.loc[fixed["dice_mean"].idxmax()]
    assert oracle.iloc[0]["label"] == f"polydice-oracle (eps={best['eps']:+.1f})"
    assert oracle.iloc[0]["dice_mean"] == best["dice_mean"]
    assert not table.loc[~table["label"].str.contains("oracle"), "oracle"].any()
    md = (report / "table.md").read_text()
    assert "oracle, not a method" in md
    # The thesis's hard cases (the Dice-loss baseline's worst quarter) and the paired statistics.
    assert table["dice_loss_hard_dice"].notna().all(), table[["label", "dice_loss_hard_dice"]]
    others = table[~table["oracle"] & (table["label"] != "adaptive-tuned")]
    assert others["wilcoxon_p_holm"].notna().all() and (others["wilcoxon_p_holm"] >= others["wilcoxon_p"]).all()
    assert (others["dice_diff_ci_low"] <= others["dice_diff_ci_high"]).all()
    assert set(table["pair_unit"].dropna()) == {"image"}  # synthetic images are independent
    assert "Best configuration per fold" in md
    assert len(pd.read_csv(report / "best_config_per_fold.csv")) == finished_study["folds"]
    for png in ("dice_per_method.png", "eps_vs_difficulty.png", "search_history_adaptive-fold0.png",
                "search_history_adaptive-fold1.png"):
        path = report / png
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in md
