"""Helpers of the cluster tests: paths, free ports, processes started in their own session (one
per simulated node) and stopped exactly, and waiting on files."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
VENV_BIN = Path(sys.executable).parent

# Variables that would make a launched rank take another role than the launcher gives it.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")


def free_ports(n: int = 1) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without launcher/tracking variables, with the venv first on PATH;
    Ray kept on 127.0.0.1 (by default it swaps a loopback address for the machine's own)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "PET_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def start_node(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    """Start one simulated node: the launcher in a session of its own, output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, command line) for every process we can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if stat[0] == "Z":
            continue
        table[int(entry)] = (int(stat[1]), int(stat[3]), cmd)
    return table


def tree(root_pids: list[int], sessions: list[int] = ()) -> list[int]:
    """The given processes, every process in the given sessions, and all their descendants."""
    table = _proc_table()
    found = {p for p in root_pids if p in table} | {p for p, (_, sid, _) in table.items() if sid in sessions}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    found.discard(os.getpid())
    return sorted(found)


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (e.g. a test's private run directory)."""
    return sorted(pid for pid, (_, _, cmd) in _proc_table().items() if text in cmd and pid != os.getpid())


def kill_node(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """A node dies: `sig` to every process of its session and their descendants."""
    for pid in tree([proc.pid], [proc.pid]):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_processes(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, to exactly these processes."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2, procs=()):
    """Poll `predicate` until it returns something truthy; fail early if one of `procs` exited."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process {p.args[:3]}... exited with {p.returncode} while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def latest_step(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    try:
        tag = latest.read_text().strip()
    except OSError:
        return None
    return int(tag.removeprefix("step")) if tag.startswith("step") else None


def tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"<no {path}>"
