"""A real single-node SLURM cluster on 127.0.0.1 for tests, as a session-scoped pytest fixture.

Register it once with `pytest_plugins = ["slurm_cluster"]` in tests/conftest.py and request
`slurm_cluster` in a test. The fixture

1. installs the Debian packages slurmd, slurmctld, slurm-client and munge when `slurmctld` is
   missing (apt-get, as root);
2. writes a slurm.conf under a temporary folder (one node `localhost` with this machine's CPUs,
   partition `debug`, no accounting, free TCP ports) and sets SLURM_CONF for the test process and
   its children (sbatch, squeue, submitit);
3. starts munged (unless a running one accepts requests), slurmctld and slurmd in the foreground as child
   processes, waits until the node is idle, and yields a `SlurmCluster`;
4. cancels the jobs left in the cluster and stops exactly the daemons it started, by PID.

A cluster that cannot start fails the test with the daemons' logs; it never skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ["slurmd", "slurmctld", "slurm-client", "munge"]
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


@dataclass
class SlurmCluster:
    conf: Path
    folder: Path
    partition: str = "debug"
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster and return its stdout."""
        result = subprocess.run(list(command), capture_output=True, text=True, env=self.env(), timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def logs(self) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.folder / name
            if path.is_file():
                parts.append(f"--- {name}\n" + path.read_text()[-3000:])
        return "\n".join(parts)


def _install_packages() -> None:
    command = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, capture_output=True, env=environment).returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, env=environment, check=False)
        result = subprocess.run(command, capture_output=True, text=True, env=environment)
        if result.returncode != 0:
            pytest.fail(f"could not install {' '.join(PACKAGES)} with apt-get (run as root with the Debian "
                        f"repositories reachable):\n{result.stderr[-2000:]}")


def _free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        handle = socket.socket()
        handle.bind(("127.0.0.1", 0))
        sockets.append(handle)
    ports = [handle.getsockname()[1] for handle in sockets]
    for handle in sockets:
        handle.close()
    return ports


def _munge_answers() -> bool:
    if not MUNGE_SOCKET.exists() or shutil.which("munge") is None:
        return False
    return subprocess.run(["munge", "-n"], capture_output=True).returncode == 0


def _write_conf(folder: Path) -> Path:
    controller_port, node_port = _free_ports(2)
    cpus = os.cpu_count() or 1
    lines = [
        "ClusterName=trimkvtest",
        "SlurmctldHost=localhost",
        f"SlurmctldPort={controller_port}",
        f"SlurmdPort={node_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CryptoType=crypto/munge",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"SlurmctldLogFile={folder / 'slurmctld.log'}",
        f"SlurmdLogFile={folder / 'slurmd.log'}",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=8000 State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
    ]
    for name in ("state", "spool"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _start_munged(cluster: SlurmCluster) -> None:
    for path in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
        path.mkdir(parents=True, exist_ok=True)
        shutil.chown(path, "munge", "munge")
    log_path = cluster.folder / "munged.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(["/usr/sbin/munged", "--foreground"], user="munge", stdout=subprocess.DEVNULL,
                                   stderr=log_file)
    cluster.processes["munged"] = process
    deadline = time.monotonic() + 15
    while not _munge_answers():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"munged did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.1)


def _wait_for_idle_node(cluster: SlurmCluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                pytest.fail(f"{name} exited with status {process.returncode}\n{cluster.logs()}")
        try:
            state = cluster.run("sinfo", "-h", "-o", "%T").strip()
        except (RuntimeError, subprocess.TimeoutExpired):
            state = ""
        if state == "idle":
            return
        time.sleep(0.2)
    pytest.fail(f"the SLURM node is not idle after {timeout:.0f} s (state {state!r})\n{cluster.logs()}")


def _stop(cluster: SlurmCluster) -> None:
    try:
        cluster.run("scancel", "--full", "--quiet", "--user", "root", timeout=10)
    except (RuntimeError, subprocess.TimeoutExpired):
        pass
    for name in ("slurmd", "slurmctld", "munged"):
        process = cluster.processes.get(name)
        if process is None or process.poll() is not None:
            continue
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the SLURM test cluster needs root (it installs packages and runs slurmd as root)")
    if shutil.which("slurmctld") is None or not Path("/usr/sbin/munged").exists():
        _install_packages()
    folder = tmp_path_factory.mktemp("slurm")
    cluster = SlurmCluster(conf=_write_conf(folder), folder=folder)
    previous_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        if not _munge_answers():
            _start_munged(cluster)
        cluster.processes["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(cluster.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cluster.processes["slurmd"] = subprocess.Popen(
            ["slurmd", "-D", "-N", "localhost", "-f", str(cluster.conf)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        _wait_for_idle_node(cluster)
        yield cluster
    finally:
        _stop(cluster)
        if previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous_conf
