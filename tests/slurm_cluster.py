"""A real single-node Slurm cluster for tests: munged, slurmctld and slurmd (Debian's slurmctld, slurmd, slurm-client
and munge packages) started under a temporary folder, with their own ports, key, sockets, state and logs.

`slurm_cluster` (a session fixture) skips with the reason when the binaries are missing or the tests do not run as
root (slurmd starts job steps as the submitting user and needs root for it). Client commands get SLURM_CONF from
`LocalSlurm.env`. Settings that matter for speed: the scheduler runs every second, and munge credentials live 10 s
(Slurm's default 120 s delays the start of a requeued job by as long). Start-up takes about a second.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
INSTALL = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
CRED_EXPIRE = 5  # seconds; a requeued job may start this long after it was requeued
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}

CONF = """\
ClusterName=vlmotest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=600
FirstJobId={first_job}
{node} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def missing() -> str | None:
    """Why no local cluster can start here, or None."""
    absent = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None
              and not Path("/usr/sbin", name).exists()]
    if absent:
        return f"Slurm/munge binaries missing ({', '.join(absent)}); Debian: {INSTALL}"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd starts job steps as the submitting user)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class LocalSlurm:
    root: Path
    env: dict[str, str]
    """os.environ plus SLURM_CONF: the environment for client commands and for the jobs they submit."""
    node: str

    def run(self, *command: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=env or self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> int:
        """Submit; the job id."""
        done = self.run("sbatch", "--parsable", *args, env=env)
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """scontrol's fields of a job (JobState, Restarts, ExitCode, ...); {} once Slurm forgot it."""
        done = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}

    def wait(self, job_id: int, until: set[str] | None = None, timeout: float = 240) -> dict[str, str]:
        """Poll until the job's state is one of `until` (default: ended); its fields. TimeoutError with the logs."""
        until = until or ENDED
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not in {sorted(until)} after {timeout} s: {self.job(job_id)}\n"
                           f"{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in (self.root / "slurmctld.log", self.root / "slurmd.log") if p.exists())

    def stop(self) -> None:
        """Cancel every job, then end the daemons by the PIDs in their pid files."""
        self.run("scancel", "--user", "root", check=False)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.25)
        pids = [_pid(path) for path in (self.root / "slurmd.pid", self.root / "slurmctld.pid",
                                        self.root / "munge" / "munged.pid")]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_signal(pid, 0) for pid in pids):
            time.sleep(0.1)


def _pid(pid_file: Path) -> int | None:
    return int(pid_file.read_text().split()[0]) if pid_file.is_file() else None


def _signal(pid: int | None, sig: int) -> bool:
    """Send `sig` (0: only look); whether the process was there."""
    if pid is None:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def start(root: Path) -> LocalSlurm:
    """Start munged, slurmctld and slurmd under `root`; wait until the node is idle."""
    munge = root / "munge"
    munge.mkdir(parents=True)
    munge.chmod(0o755)
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    subprocess.run([_binary("munged"), "--force", f"--key-file={key}", f"--socket={munge}/munge.socket.2",
                    f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                    f"--seed-file={munge}/munged.seed"], check=True, capture_output=True)
    node_line = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True,
                               check=True).stdout.splitlines()[0]
    node = node_line.split()[0].split("=", 1)[1]
    (root / "spool" / f"slurmd-{node}").mkdir()
    conf = root / "slurm.conf"
    # A random first job id: vlmo_ds derives MASTER_PORT from the job id, and two test clusters on one machine
    # would otherwise both start at job 1.
    conf.write_text(CONF.format(root=root, host=node, node=node_line, ctld_port=_free_port(),
                                slurmd_port=_free_port(), cred_expire=CRED_EXPIRE,
                                first_job=random.randrange(1000, 1_000_000)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = LocalSlurm(root, env, node)
    try:
        subprocess.run([_binary("slurmctld"), "-c"], env=env, check=True, capture_output=True, timeout=30)
        subprocess.run([_binary("slurmd")], env=env, check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 30
        while cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip() != "idle":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local Slurm node did not become idle:\n{cluster.log_tail()}")
            time.sleep(0.2)
    except (subprocess.SubprocessError, RuntimeError):
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running single-node Slurm cluster (skipped with the reason where none can start)."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    cluster = start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()
