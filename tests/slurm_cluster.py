"""A throwaway one-node Slurm cluster for tests: munged, slurmctld and slurmd (Debian's `munge` and
`slurm-wlm`) started as root in a temp dir, with their own munge socket, ports, state and logs, so nothing
of the machine's own Slurm or munge setup is read or touched.

    from tests.slurm_cluster import slurm_cluster  # the session-scoped fixture

    def test_x(slurm_cluster):
        subprocess.run(["sbatch", "--wait", ...], env=slurm_cluster.env())

The fixture installs slurm-wlm and munge with apt-get when they are missing; it skips (with the reason,
shown by pytest's -rs) only where we are not root or there is no apt-get. Teardown cancels every job,
stops the daemons and removes the dir, also when a test fails.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.launching import free_port

# Daemons live in sbin, which a non-login root shell may not have on PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "sinfo", "squeue", "scancel", "scontrol")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


APT_PACKAGES = ("slurm-wlm", "munge")


def _missing_binaries() -> list[str]:
    return [name for name in DAEMONS + CLIENTS + ("munge",) if not shutil.which(name, path=SEARCH_PATH)]


def missing_reason() -> str | None:
    """Why a cluster cannot be started here, or None. Installs Debian's slurm-wlm and munge when they are
    missing and we are root with apt-get; a failed install is an error, not a reason to skip."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a throwaway Slurm cluster needs root (slurmd starts jobs as their submitting user)"
    missing = _missing_binaries()
    if not missing:
        return None
    apt = shutil.which("apt-get", path=SEARCH_PATH)
    if apt is None:
        return f"Slurm/munge not installed (missing {', '.join(missing)}) and no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # The lock timeout: another apt run on the machine (a second test session) finishes first.
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    for cmd in ([apt, *lock, "update", "-qq"],
                [apt, *lock, "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    still = _missing_binaries()
    if still:
        raise RuntimeError(f"{' '.join(APT_PACKAGES)} installed, but {', '.join(still)} still missing")
    return None



def _node_name() -> str:
    """The short host name, as slurmd names itself, when it resolves (jobs use it as MASTER_ADDR)."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        return "localhost"


@dataclass
class SlurmCluster:
    root: Path
    node: str = field(default_factory=_node_name)
    partition: str = "debug"
    cpus: int = field(default_factory=lambda: max(2, os.cpu_count() or 1))
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "run" / "munge.socket"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for Slurm clients (sbatch, srun, ...) talking to this cluster. Slurm variables
        of any enclosing allocation are dropped, so they cannot leak into the jobs submitted here."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env.update(PATH=SEARCH_PATH, SLURM_CONF=str(self.conf), **extra)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, check=check, timeout=timeout)

    def logs(self, tail: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"== {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # --- start ---------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        for sub, mode in (("run", 0o755), ("munge", 0o700), ("state", 0o700), ("spool", 0o755), ("log", 0o755)):
            (self.root / sub).mkdir(mode=mode)
            os.chmod(self.root / sub, mode)  # mkdir's mode is masked by the umask
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=wandisttest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",  # our munged, not the system's
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.log",
            # No cgroups: plain /proc process tracking, no task binding, no accounting.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",  # CPUs are the only consumable: one task per CPU
            # The CPU count below wins over what slurmd detects, so two tasks fit on a one-core machine too.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=4",
            # Random job ids: the sbatch script derives MASTER_PORT from the id, so two test sessions on one
            # machine do not rendezvous on the same port.
            f"FirstJobId={random.randint(1000, 1_000_000)}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _spawn(self, name: str, *args: str) -> None:
        binary = shutil.which(name, path=SEARCH_PATH)
        with open(self.root / "log" / f"{name}.out", "wb") as log:
            # Its own session, so a Ctrl-C of pytest does not hit the daemons before teardown does.
            self._procs[name] = subprocess.Popen([binary, *args], stdout=log, stderr=subprocess.STDOUT,
                                                 env=self.env(), start_new_session=True)

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")

    def start(self) -> None:
        self._write_config()
        m = self.root / "munge"
        self._spawn("munged", "--foreground", f"--socket={self.munge_socket}", f"--key-file={m}/munge.key",
                    f"--pid-file={self.root}/run/munged.pid", f"--seed-file={m}/munged.seed")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"munged did not create its socket\n{self.logs()}")
            time.sleep(0.05)
        # -D: in the foreground, so these are our children and stop with us.
        self._spawn("slurmctld", "-D", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.node)
        self.wait_idle(deadline)

    def node_state(self) -> str:
        result = self.run("sinfo", "--noheader", "--nodes", self.node, "--format=%T", check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    def wait_idle(self, deadline: float) -> None:
        while (state := self.node_state()) != "idle":
            self._check_alive()
            if time.monotonic() > deadline:
                reason = self.run("scontrol", "show", "node", self.node, check=False).stdout
                raise TimeoutError(f"node {self.node} not idle (state {state!r})\n{reason}\n{self.logs()}")
            time.sleep(0.2)

    # --- stop ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job (their processes go with them), then stop slurmd, slurmctld, munged."""
        try:
            if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
                self.run("scancel", "--full", f"--partition={self.partition}", check=False)
                deadline = time.monotonic() + STOP_TIMEOUT_S
                while time.monotonic() < deadline:
                    queue = self.run("squeue", "--noheader", "--format=%i", check=False)
                    if queue.returncode != 0 or not queue.stdout.strip():
                        break
                    time.sleep(0.2)
        except subprocess.TimeoutExpired:
            pass  # a hung client must not keep the daemons alive
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def running_cluster() -> Iterator[SlurmCluster]:
    # Not under pytest's tmp dir: munged wants its socket dir reachable (o+x) by everyone.
    root = Path(tempfile.mkdtemp(prefix="wan_dist_slurm_"))
    root.chmod(0o755)
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    start = time.monotonic()
    with running_cluster() as cluster:
        print(f"\nslurm cluster up in {time.monotonic() - start:.1f} s: SLURM_CONF={cluster.conf}")
        yield cluster
