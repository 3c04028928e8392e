"""A private one-node SLURM cluster on 127.0.0.1 for the tests: MUNGE, slurmctld and slurmd from
Debian's packages (.ci/install-slurm.sh), run in the foreground as root with their own key,
socket, config, ports and spool directories, so nothing of the machine's is used or changed.

Only what differs from a production cluster: one node, no cgroups (proctrack/linuxproc,
task/none, as there is no systemd here), no accounting database, and a requeued job may start
again after 10 s instead of 120 s (AuthInfo cred_expire). Two partitions: jobs submitted to
"urgent" preempt those in "batch" (the default), which are requeued (PreemptMode=REQUEUE,
GraceTime=30), as on clusters with preemptible partitions."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .helpers import REPO, free_ports, stop_processes, tree

DAEMONS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
INSTALL_SCRIPT = REPO / ".ci" / "install-slurm.sh"


def missing_tools() -> list[str]:
    return [t for t in DAEMONS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def ensure_installed() -> str | None:
    """None when SLURM can run here, else why not. Installs Debian's packages with
    .ci/install-slurm.sh when they are missing, we are root, and this is CI (CI=true) or
    MDLM_INSTALL_SLURM=1 asks for it."""
    if not missing_tools():
        return None
    wanted = os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("MDLM_INSTALL_SLURM") == "1"
    if not wanted:
        return (f"SLURM is not installed ({', '.join(missing_tools())} missing): run `bash .ci/install-slurm.sh` "
                "as root, or set MDLM_INSTALL_SLURM=1 to let the tests do it")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "SLURM is not installed and cannot be: installing it needs root and apt-get"
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or missing_tools():
        return f"installing SLURM failed ({proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}"
    print(proc.stdout.strip())
    return None


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    def __init__(self):
        # munged insists that every directory up to its socket is reachable by everyone.
        self.root = Path(tempfile.mkdtemp(prefix="mdlm-slurm-", dir="/tmp"))
        self.root.chmod(0o755)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"
        self.procs: dict[str, subprocess.Popen] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(mode=0o755)
        (self.root / "munge-private").mkdir(mode=0o700)
        key = self.root / "munge-private" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [_tool("munged"), "--foreground", f"--key-file={key}", f"--socket={self.socket}",
                               f"--log-file={self.root / 'log' / 'munged.log'}",
                               f"--pid-file={self.root / 'munge-private' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge-private' / 'munged.seed'}"])
        self._wait(lambda: self.socket.exists(), 20, "munged's socket")
        self.conf.write_text(self._config())
        self._spawn("slurmctld", [_tool("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_tool("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(lambda: self.run(["sinfo", "-h", "-p", "batch", "-o", "%T"], check=False).stdout.strip() == "idle",
                   timeout, "the node to be idle")

    def stop(self) -> None:
        self.run(["scancel", "--full", "--signal=KILL", "--user", "root"], check=False)
        deadline = time.time() + 30
        while time.time() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
            time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                stop_processes(tree([proc.pid]), grace=10)
                proc.wait(timeout=10)
        # job processes that outlived the daemons carry our config in their environment
        strays = [pid for pid in _pids_with_env(f"SLURM_CONF={self.conf}") if pid != os.getpid()]
        if strays:
            stop_processes(strays, grace=5)
        shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, env=self.env())
        log.close()

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{self.logs()}")
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.root / "log").glob("*")) if p.is_file())

    def _config(self) -> str:
        ctld_port, slurmd_port = free_ports(2)
        cpus = os.cpu_count() or 1
        mem_mb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal:"))) // 1024
        return "\n".join([
            "ClusterName=mdlmtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire=10",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'state' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'spool' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=5",  # look at pending jobs every 5 s, not 60
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "KillWait=10",
            "MinJobAge=600",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={int(mem_mb * 0.9)} State=UNKNOWN",
            # jobs in "urgent" preempt those in "batch": SIGTERM to their steps, requeued after GraceTime
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            ("PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
             "PreemptMode=REQUEUE GraceTime=30"),
            "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF",
            "",
        ])

    # ---- client commands -------------------------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, cmd: list[str], check: bool = True, env: dict[str, str] | None = None, **kw):
        proc = subprocess.run([_tool(cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=60,
                              env=self.env(env), **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], env: dict[str, str], cwd: Path = REPO) -> str:
        return self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        fields = {}
        for word in out.split():
            key, sep, value = word.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}\n{self.logs()}")


def _pids_with_env(entry: str) -> list[int]:
    needle = entry.encode() + b"\0"
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
        except OSError:
            continue
    return found
