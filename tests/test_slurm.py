"""``cluster/slurm.sbatch`` run for real, on a one-node SLURM on loopback.

The test starts munged, slurmctld and slurmd from the distribution's packages (installed with
apt-get where missing, else the test is skipped), with a ``slurm.conf`` it writes into a temporary
folder, and submits the script as a user on a CPU partition would: ``sbatch --nodes=1
--gpus-per-node=0 --cpus-per-task=N cluster/slurm.sbatch --smoke ...``. It waits for the job, then
checks that the study finished and wrote its results, and that while the job ran every Ray port of
the job listened on loopback only (a one-node job needs nothing else): the listening sockets of
the job's processes are sampled every 0.3 s.

Every process the test starts (the three daemons, and through them the job's Ray processes)
carries a marker in its environment; the teardown kills each of them by pid, also when the test
fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

import ray_fixtures as rf  # noqa: E402

pytestmark = pytest.mark.slow

REPO = rf.REPO
SBATCH = REPO / "cluster" / "slurm.sbatch"
PROGRAMS = {"sbatch": "slurm-wlm", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "munged": "munge"}
MARKER = "POLYDICE_SLURM_TEST"
STUDY = "slurm-smoke"
# A small study: one search trial on the first of two folds, then that fold's final run.
STUDY_FLAGS = ["--smoke", "--num-samples", "1", "--folds", "2", "--search-fold", "0", "--seeds", "1"]
JOB_TIMEOUT = 300
# Job steps' own launchers: they are SLURM's, not Ray's, and bind whatever the host name resolves to.
SLURM_PROCESSES = {"srun", "slurmstepd", "sbatch"}


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def ensure_slurm() -> None:
    """Install slurm-wlm and munge with apt-get where a program is missing; skip if that fails."""
    missing = sorted({pkg for prog, pkg in PROGRAMS.items() if not _which(prog)})
    if not missing:
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"{', '.join(missing)} not installed, and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
            if out.returncode:
                pytest.skip(f"could not install {', '.join(missing)}: `{' '.join(cmd)}` failed: "
                            f"{(out.stderr or out.stdout).strip()[-500:]}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not install {', '.join(missing)}: {exc}")
    still = [prog for prog in PROGRAMS if not _which(prog)]
    if still:
        pytest.skip(f"installed {', '.join(missing)}, but {', '.join(still)} is still missing")


def marked_pids(token: str, **env) -> list[int]:
    """Live processes whose environment holds ``MARKER=token`` (and every ``env`` item)."""
    want = {MARKER: token, **env}
    pids = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            environ = proc.environ()
        except psutil.Error:
            continue
        if all(environ.get(k) == v for k, v in want.items()):
            pids.append(proc.pid)
    return pids


def kill_marked(token: str, grace: float = 5.0, timeout: float = 30.0) -> list[int]:
    """SIGTERM every marked process, SIGKILL those left after ``grace`` s; returns survivors."""
    deadline = time.monotonic() + timeout
    for sig, until in ((signal.SIGTERM, time.monotonic() + grace), (signal.SIGKILL, deadline)):
        for pid in marked_pids(token):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        while (left := marked_pids(token)) and time.monotonic() < until:
            time.sleep(0.2)
            if sig == signal.SIGKILL:  # children forked in the meantime
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
        if not left:
            return []
    return left


class OneNodeSlurm:
    """munged + slurmctld + slurmd in ``root``, talking over 127.0.0.1; one CPU partition, this node.

    munged wants its socket's folders searchable by everyone and the key readable by its owner
    only, hence a folder of its own under /tmp (0711) rather than pytest's private tmp_path.
    """

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="pdslurm", dir="/tmp"))
        self.root.chmod(0o711)
        self.token = uuid.uuid4().hex
        self.logs = self.root / "log"
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.procs: list[subprocess.Popen] = []
        self.node, self.cpus = "", 0

    def env(self, **extra: str) -> dict:
        env = dict(os.environ, SLURM_CONF=str(self.conf), **{MARKER: self.token})
        env.update(extra)
        return env

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.logs / f"{name}.out", "wb")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=self.env(), cwd=self.root, start_new_session=True))
        log.close()

    def start(self) -> None:
        for sub in ("log", "munge", "state", "spool"):
            (self.root / sub).mkdir()
        (self.root / "munge").chmod(0o755)
        key = self.root / "state" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._start("munged", [_which("munged"), "--foreground", f"--socket={self.socket}", f"--key-file={key}",
                               f"--pid-file={self.root / 'state' / 'munged.pid'}",
                               f"--log-file={self.logs / 'munged.log'}",
                               f"--seed-file={self.root / 'state' / 'munged.seed'}"])
        self._wait(lambda: self.socket.exists(), 30, "munged did not create its socket")

        # This node as slurmd sees it (its name, CPUs, sockets, memory), reached at 127.0.0.1.
        hardware = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=60).stdout
        node_line = next(line for line in hardware.splitlines() if line.startswith("NodeName="))
        self.node = node_line.split()[0].split("=", 1)[1]
        self.cpus = int(re.search(r"\bCPUs=(\d+)", node_line).group(1))
        ctld_port, node_port = rf.free_port(), rf.free_port()
        # With these, slurmctld, slurmd, slurmstepd and the client commands bind the address the host
        # name resolves to instead of every interface; only right where that address is loopback
        # (else slurmctld could not reach slurmd at 127.0.0.1, and the daemons listen on all
        # interfaces, on random ports, munge authenticating every request).
        try:
            host_ip = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)[0][4][0]
        except OSError:
            host_ip = ""
        bind = "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny" if host_ip.startswith("127.") else ""
        self.conf.write_text(f"""\
ClusterName=polydice-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_port}
{bind}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self.root / "state" / "slurmctld.pid"}
SlurmdPidFile={self.root / "state" / "slurmd.pid"}
SlurmctldLogFile={self.logs / "slurmctld.log"}
SlurmdLogFile={self.logs / "slurmd.log"}
# No cgroups: the test may run in a container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        self._start("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._start("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle", 60,
                   "the node did not come up idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"{what} (exited: {dead})\n{self.log_tail()}")
            time.sleep(0.5)

    def run(self, *cmd: str, check: bool = True, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
        out = subprocess.run([_which(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=timeout,
                             env=env or self.env(), cwd=cwd or self.root)
        if check and out.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}{out.stdout}")
        return out

    def job_state(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, ...); empty once SLURM forgot the job."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f) if out.returncode == 0 else {}

    def log_tail(self, n: int = 15) -> str:
        parts = []
        for log in sorted(self.logs.glob("*")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> list[int]:
        """Cancel every job, stop every marked process; returns survivors (should be none)."""
        with contextlib.suppress(Exception):
            self.run("scancel", "--full", "--user", str(os.getuid()), check=False, timeout=10)
        left = kill_marked(self.token)
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
        return left


class ListenerLog:
    """Samples the listening TCP sockets of a job's processes (all but SLURM's own) every 0.3 s."""

    def __init__(self, token: str):
        self.token, self.job_id = token, None
        self.seen: dict[tuple[str, int], str] = {}  # (address, port) -> process name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(0.3):
            if self.job_id is None:
                continue
            pids = {}
            for pid in marked_pids(self.token, SLURM_JOB_ID=self.job_id):
                with contextlib.suppress(psutil.Error):
                    pids[pid] = psutil.Process(pid).name()
            for conn in psutil.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and conn.pid in pids and pids[conn.pid] not in SLURM_PROCESSES:
                    self.seen[(conn.laddr.ip, conn.laddr.port)] = pids[conn.pid]


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@pytest.fixture
def slurm():
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start job steps")
    ensure_slurm()
    if not (Path(sys.prefix) / "bin" / "activate").exists():
        pytest.skip(f"the job activates a virtualenv; {sys.prefix} is none")
    cluster = OneNodeSlurm()
    try:
        cluster.start()
        yield cluster
    finally:
        left = cluster.stop()
        assert not left, f"processes survived the teardown: {left}"


def test_sbatch_runs_a_smoke_study_on_a_cpu_partition(slurm, tmp_path):
    shared, home = tmp_path / "shared", tmp_path / "home"
    shared.mkdir()
    home.mkdir()
    ray_tmp = rf.short_tmpdir("pdsray")
    gcs_port, client_port = rf.free_port(), rf.free_port()
    env = slurm.env(
        PROJECT_DIR=str(REPO), VENV=sys.prefix, SHARED_DIR=str(shared), HOME=str(home),
        DATASET="synthetic", STUDY_NAME=STUDY, RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
        RAY_PORT=str(gcs_port), RAY_START_ARGS=f"--ray-client-server-port={client_port}",
    )
    for var in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GPUS_PER_NODE", "HEAD_IP", "OPTUNA_STORAGE"):
        env.pop(var, None)
    out_file = tmp_path / "job.out"
    start = time.monotonic()
    try:
        with ListenerLog(slurm.token) as listeners:
            submitted = slurm.run(
                "sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={slurm.cpus}", "--time=10",
                f"--output={out_file}", str(SBATCH), *STUDY_FLAGS, env=env, cwd=tmp_path)
            job_id = submitted.stdout.strip().split(";")[0]
            listeners.job_id = job_id
            submit = time.monotonic()
            while (state := slurm.job_state(job_id)).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING",
                                                                          "COMPLETING"):
                waited = time.monotonic() - submit
                # The node is idle: a job still pending after a minute never starts.
                if waited > JOB_TIMEOUT or (state["JobState"] == "PENDING" and waited > 60):
                    slurm.run("scancel", job_id, check=False)
                    raise AssertionError(f"job {job_id} still {state['JobState']} ({state.get('Reason')}) after "
                                         f"{waited:.0f}s\n{_tail(out_file)}\n{slurm.log_tail()}")
                time.sleep(1)
        elapsed = time.monotonic() - start
        log = _tail(out_file, 400)
        assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", \
            f"job {job_id}: {state.get('JobState')} {state.get('ExitCode')}\n{_tail(out_file)}\n{slurm.log_tail()}"

        # The script ran the study on CPUs, on a Ray head bound to loopback.
        assert f"head {slurm.node} (127.0.0.1:{gcs_port}), 1 node(s) x {slurm.cpus} CPU(s), 0 GPU(s)" in log, log
        assert "0 GPUs for the study" in log, log

        # The study's results: the search trial scored on validation Dice, the final run tested, the report.
        results = shared / "results"
        search = [row for path in results.glob(f"{STUDY}*/*/result.json")
                  if not path.parent.parent.name.endswith("-final") for row in _rows(path)]
        final = [row for path in results.glob(f"{STUDY}-final/*/result.json") for row in _rows(path)]
        assert search and all(0.0 <= r["best_val_dice"] <= 1.0 for r in search), log
        assert max(r["epoch"] for r in search) == 3, search  # --smoke: 3 epochs
        assert any(r.get("done_testing") and 0.0 <= r["test_dice"] <= 1.0 for r in final), final
        report = results / f"{STUDY}-report"
        assert json.loads((report / "best_config.json").read_text()) and (report / "table.md").exists(), log
        # The job removed its Ray token file.
        assert not list((home / ".ray").glob(f"polydice-{job_id}.token"))

        # Ray's ports: the GCS among them (so the sampling saw Ray), and every one on loopback.
        assert any(port == gcs_port for _, port in listeners.seen), (listeners.seen, log)
        assert {name for name in listeners.seen.values()} >= {"gcs_server", "raylet"}, listeners.seen
        exposed = {k: v for k, v in listeners.seen.items() if not _is_loopback(k[0])}
        assert not exposed, f"Ray listened beyond loopback: {exposed}"
        print(f"slurm job {job_id}: {elapsed:.0f}s, {len(listeners.seen)} Ray listeners, all on loopback")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _rows(result_json: Path) -> list[dict]:
    return [json.loads(line) for line in result_json.read_text().splitlines() if line.strip()]


def _tail(path: Path, n: int = 60) -> str:
    if not path.exists():
        return f"({path} not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
