"""Helpers of the distributed-study tests (``tests/test_studies.py``).

- Environments and process control for study subprocesses: every subprocess gets its own Ray temp
  dir (so that it neither joins nor disturbs another Ray instance on the machine), runs in a new
  session, and is torn down by killing that whole session (driver, GCS, raylet, workers).
- A *probe* around :func:`polydice.tune.training_function`: it records, from inside each trial,
  the resources Ray gave it, its GPU ids, its node, its pid and start/end times, and can kill its
  own worker once at a given epoch. ``python tests/ray_fixtures.py <study script> ARGS`` runs a
  study script's ``main(ARGS)`` with the probe in place of the trainable's function.
- A throw-away PostgreSQL server on 127.0.0.1.

Nothing here mocks Ray: the probe only wraps the trainable's function, inside real Ray workers.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STUDIES = REPO / "studies"
PYTHON = sys.executable
PROBE_FILE = "probe.json"


# ----------------------------------------------------------------------------- processes


def short_tmpdir(prefix: str) -> str:
    """A short folder under /tmp: Ray puts Unix sockets below its temp dir (107-byte path limit)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def ray_env(ray_tmpdir: str, **extra: str) -> dict:
    """Environment of a study subprocess: loopback Ray, a private Ray temp dir, no RAY_ADDRESS."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_TMPDIR"] = ray_tmpdir
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (a process started with ``start_new_session=True``)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                pids.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return pids


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def kill_session(sid: int, extra_pids=(), timeout: float = 30.0) -> list[int]:
    """SIGKILL every process of session ``sid`` (and ``extra_pids``) until none is left.

    Returns the pids still alive after ``timeout`` (empty when all are gone).
    """
    import psutil

    deadline = time.monotonic() + timeout
    left = []
    while time.monotonic() < deadline:
        left = sorted(set(session_pids(sid)) | {p for p in extra_pids if psutil.pid_exists(p) and _alive(p)})
        if not left:
            return []
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return left


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class StudyProcess:
    """A study script run as a subprocess in its own session, its output in a log file."""

    def __init__(self, args: list[str], env: dict, log: Path, cwd: Path = REPO):
        self.log_path = log
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [PYTHON, *args], cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.sid = self.proc.pid
        self._seen: set[int] = set()

    def remember_children(self) -> None:
        self._seen.update(descendants(self.proc.pid))

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"study did not finish in {timeout:.0f}s\n{self.tail()}") from None

    def kill(self) -> list[int]:
        """SIGKILL the driver and every process of its session; returns survivors (should be none)."""
        self.remember_children()
        left = kill_session(self.sid, self._seen)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        return left

    def tail(self, n: int = 60) -> str:
        if not self._log.closed:
            self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def close(self) -> list[int]:
        left = self.kill() if self.proc.poll() is None or session_pids(self.sid) else []
        self._log.close()
        return left


def run_cli_killed_in_epoch(monkeypatch, argv: list[str], epoch: int, error: type[Exception]) -> None:
    """``polydice.train.main(argv)`` interrupted (``error`` raised) as epoch ``epoch`` starts, as a
    killed process would stop; the training code is whole again afterwards."""
    import pytest

    import polydice.train as pt

    real = pt.train_epoch

    def killed(run, at, *args, **kwargs):
        if at == epoch:
            raise error
        return real(run, at, *args, **kwargs)

    monkeypatch.setattr(pt, "train_epoch", killed)
    with pytest.raises(error):
        pt.main(argv)
    monkeypatch.setattr(pt, "train_epoch", real)


@contextlib.contextmanager
def local_ray(prefix: str, num_cpus: int, by_value: str | None = None, **init_kwargs):
    """One local Ray instance on 127.0.0.1 in a private temp dir, shut down and removed on exit.

    ``by_value`` names a test module whose functions Ray workers get by value (they cannot
    import a test module)."""
    import ray

    from polydice.tune import init_ray

    if by_value is not None:
        ray.cloudpickle.register_pickle_by_value(sys.modules[by_value])
    tmp = short_tmpdir(prefix)
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TMPDIR"] = tmp
    try:
        init_ray(num_cpus=num_cpus, **init_kwargs)
        yield tmp
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        shutil.rmtree(tmp, ignore_errors=True)


def run_study(args: list[str], env: dict, log: Path, timeout: float, cwd: Path = REPO) -> tuple[int, str]:
    """Run a study subprocess (in ``cwd``) to the end; returns (exit code, whole output). Cleans up
    its session."""
    study = StudyProcess(args, env, log, cwd=cwd)
    try:
        rc = study.wait(timeout)
    finally:
        left = study.close()
    assert not left, f"processes of the study survived its end: {left}"
    return rc, log.read_text(errors="replace")


# ----------------------------------------------------------------------------- the trial probe


def _original_training_function():
    import polydice.tune

    return getattr(polydice.tune, "_probe_original_training_function", polydice.tune.training_function)


class _KillingTune:
    """Stands in for the ``ray.tune`` module inside ``polydice.tune`` for one trial: forwards
    everything, except that ``report`` of epoch ``kill_at`` kills the worker process (once)."""

    def __init__(self, tune_module, kill_at: int, marker: Path):
        self._tune, self._kill_at, self._marker = tune_module, kill_at, marker

    def __getattr__(self, name):
        return getattr(self._tune, name)

    def report(self, metrics, *args, **kwargs):
        if metrics.get("epoch") == self._kill_at and not self._marker.exists():
            self._marker.write_text(json.dumps({"pid": os.getpid(), "epoch": self._kill_at, "time": time.time()}))
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-training, before this report
            time.sleep(60)
        return self._tune.report(metrics, *args, **kwargs)


def probe_training_function(config: dict, **kwargs) -> None:
    """``polydice.tune.training_function`` with a record of the trial written beside its outputs.

    Keys of ``config`` starting with ``_probe`` are the probe's own and are removed before the
    call: ``_probe_dir`` (shared folder for start marks and kill markers), ``_probe_wait_for``
    (wait, at most ``_probe_wait_s`` seconds, until this many trials have started, so that the
    test sees how many Ray lets run at once), ``_probe_kill_at`` (SIGKILL the worker when it
    reports this epoch, once per trial).
    """
    import ray
    import torch
    from ray import tune

    import polydice.tune as pt

    config = dict(config)
    # The keys, else environment variables (a study script's search space has no probe keys).
    probe_dir = config.pop("_probe_dir", None) or os.environ.get("POLYDICE_PROBE_DIR")
    wait_for = int(config.pop("_probe_wait_for", 0) or os.environ.get("POLYDICE_PROBE_WAIT_FOR", 0))
    wait_s = float(config.pop("_probe_wait_s", 0) or os.environ.get("POLYDICE_PROBE_WAIT_S", 60))
    kill_at = int(config.pop("_probe_kill_at", 0))

    if probe_dir:
        Path(probe_dir).mkdir(parents=True, exist_ok=True)
    ctx = tune.get_context()
    trial_dir = Path(ctx.get_trial_dir())
    trial_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "trial_id": ctx.get_trial_id(),
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "resources": dict(ctx.get_trial_resources().required_resources),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch_cuda_available": torch.cuda.is_available(),
        "start": time.time(),
    }
    if probe_dir and wait_for:
        start_dir = Path(probe_dir) / "started"
        start_dir.mkdir(parents=True, exist_ok=True)
        (start_dir / record["trial_id"]).write_text(str(record["start"]))
        deadline = time.monotonic() + wait_s
        while len(list(start_dir.iterdir())) < wait_for and time.monotonic() < deadline:
            time.sleep(0.1)
        record["waited_s"] = time.time() - record["start"]

    saved = pt.tune
    if kill_at:
        marker = Path(probe_dir or trial_dir) / f"killed-{record['trial_id']}"
        pt.tune = _KillingTune(saved, kill_at, marker)
    try:
        _original_training_function()(config, **kwargs)
    finally:
        pt.tune = saved  # a reused worker must not keep the stand-in
    record["torch_threads"] = torch.get_num_threads()
    record["end"] = time.time()
    # One file per run of the function: a restarted trial leaves the record of each attempt.
    (trial_dir / f"probe-{os.getpid()}.json").write_text(json.dumps(record, indent=1))
    (trial_dir / PROBE_FILE).write_text(json.dumps(record, indent=1))


def install_probe() -> None:
    """Make :func:`polydice.tune.make_trainable` wrap the probe (in this process only)."""
    import ray.cloudpickle

    import polydice.tune as pt

    if not hasattr(pt, "_probe_original_training_function"):
        pt._probe_original_training_function = pt.training_function
    pt.training_function = probe_training_function
    # Ray workers cannot import this test helper: ship the probe by value.
    module = sys.modules[probe_training_function.__module__]
    if module.__name__ != "__main__":
        ray.cloudpickle.register_pickle_by_value(module)


def uninstall_probe() -> None:
    import polydice.tune as pt

    if hasattr(pt, "_probe_original_training_function"):
        pt.training_function = pt._probe_original_training_function
        del pt._probe_original_training_function


def read_probes(experiment: Path) -> list[dict]:
    """The probe records of every trial below a Tune experiment folder (last attempt each)."""
    return [json.loads(p.read_text()) for p in sorted(Path(experiment).glob(f"*/{PROBE_FILE}"))]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Largest number of intervals ``[start, end]`` open at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    best = now = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


# ----------------------------------------------------------------------------- PostgreSQL


def find_postgres_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (newest version), or None."""
    found = shutil.which("initdb")
    if found and (Path(found).resolve().parent / "pg_ctl").exists():
        return Path(found).resolve().parent  # /usr/local/bin/initdb may be a lone symlink
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb") + glob.glob("/usr/local/pgsql/bin/initdb")
                        + glob.glob("/opt/homebrew/bin/initdb") + glob.glob("/usr/pgsql-*/bin/initdb"),
                        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])
    for path in reversed(candidates):
        if (Path(path).parent / "pg_ctl").exists():
            return Path(path).parent
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A PostgreSQL server in a temporary folder, listening on 127.0.0.1 only: trust auth, or with
    ``password`` that password for ``user`` over TCP (scram-sha-256; the socket stays trust)."""

    def __init__(self, bindir: Path, db: str = "polydice", user: str = "polydice", password: str | None = None):
        self.bindir, self.db, self.user, self.password = bindir, db, user, password
        self.root = Path(tempfile.mkdtemp(prefix="pdpg", dir="/tmp"))
        self.data, self.sockets, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self.port = free_port()
        self.os_user = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            for name in ("postgres", "nobody"):
                try:
                    pwd.getpwnam(name)
                    self.os_user = name
                    break
                except KeyError:
                    continue
            if self.os_user is None:
                raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")
            entry = pwd.getpwnam(self.os_user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.sockets.mkdir()
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(self.sockets, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        kwargs = {}
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            kwargs = dict(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.root)}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=self.root, **kwargs)
        if out.returncode:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n{log}")
        return out

    def start(self) -> str:
        auth = ["--auth=trust"]
        if self.password is not None:
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self.os_user:
                entry = pwd.getpwnam(self.os_user)
                os.chown(pwfile, entry.pw_uid, entry.pw_gid)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self._run("initdb", "-D", str(self.data), "-U", self.user, *auth, "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off", "start")
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                             dbname="postgres", autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{self.db}"')
        return self.url

    @property
    def url(self) -> str:
        login = self.user if self.password is None else f"{self.user}:{self.password}"
        return f"postgresql://{login}@127.0.0.1:{self.port}/{self.db}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str]) -> int:
    """``python tests/ray_fixtures.py tune_adaptive|grid_baselines ARGS``: the study with the probe."""
    script, args = argv[0], argv[1:]
    sys.path.insert(0, str(STUDIES))
    sys.path.insert(0, str(REPO))
    install_probe()
    module = __import__(script)
    return module.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


@contextlib.contextmanager
def postgres_server(password: str | None = None):
    """A PostgreSQL server on 127.0.0.1 for one test module, stopped afterwards (with ``password``,
    TCP logins need it: see :class:`PostgresServer`); the test is skipped when the server binaries
    or the psycopg driver are missing."""
    import pytest

    bindir = find_postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found on PATH or under /usr/lib/postgresql/*/bin")
    pytest.importorskip("psycopg")
    server = PostgresServer(bindir, password=password)
    try:
        server.start()
        yield server
    finally:
        server.stop()
