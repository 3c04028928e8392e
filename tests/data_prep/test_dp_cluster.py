"""A real local Ray cluster (`ray start --head`), the job submitted with `ray job submit`, checked
with `verify`; plus the cluster YAML files parse and their entrypoints parse with the real CLI."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from data_prep.cli import parse_run_args
from data_prep.manifest import load_manifest
from dp_helpers import REPO, make_docs, write_txt_corpus

RAY_BIN = Path(sys.executable).parent / "ray"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _pids_of_cluster(markers: list[str]) -> list[int]:
    """Processes whose command line names our private temp dir or GCS address, and their descendants."""
    procs: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(entry)] = (ppid, cmd)
    found = {pid for pid, (_, cmd) in procs.items() if any(m in cmd for m in markers)}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in procs.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    found.discard(os.getpid())
    return sorted(found)


def _stop_cluster(markers: list[str]) -> None:
    """Stop exactly the cluster this test started (`ray stop` would stop every Ray on the machine)."""
    pids = _pids_of_cluster(markers)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 5
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def ray_cluster():
    if not RAY_BIN.exists() or shutil.which("python") is None:
        pytest.skip("the ray CLI is not installed")
    # Ray's socket paths (<temp_dir>/session_<date>_<pid>/sockets/plasma_store) must stay under
    # the 107 bytes of AF_UNIX: pytest's per-worker tmp paths are too deep for them
    temp_dir = tempfile.mkdtemp(prefix="rayc-", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, metrics, rt_env = _free_ports(7)
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{RAY_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    cmd = [str(RAY_BIN), "start", "--head", "--port", str(gcs), "--node-ip-address", "127.0.0.1",
           "--num-cpus", "2", "--include-dashboard=true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_env),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        try:
            _stop_cluster([temp_dir, f"127.0.0.1:{gcs}"])
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_end_to_end(ray_cluster, tmp_path):
    corpus = write_txt_corpus(tmp_path / "corpus", make_docs(40, seed=11))
    out = tmp_path / "out"
    cmd = [str(RAY_BIN), "job", "submit", "--address", ray_cluster["address"], "--working-dir", str(REPO),
           "--", "python", "-m", "data_prep", "--input", str(corpus), "--out", str(out),
           "--tokenizer", "train:300", "--seq-len", "64", "--val-fraction", "0.1", "--samples-per-shard", "40"]
    proc = subprocess.run(cmd, env=ray_cluster["env"], capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "succeeded" in log and "[data_prep] done" in log
    check = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out)], cwd=REPO,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    man = load_manifest(out)
    assert man["splits"]["train"]["samples"] > 0 and len(man["splits"]["train"]["shards"]) >= 2
    # a relative --out would land in the job's temporary copy of the working dir: refused up front
    rel = [str(RAY_BIN), "job", "submit", "--address", ray_cluster["address"], "--working-dir", str(REPO),
           "--", "python", "-m", "data_prep", "--input", str(corpus), "--out", "relative-out",
           "--tokenizer", "train:300", "--seq-len", "64"]
    proc = subprocess.run(rel, env=ray_cluster["env"], capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "--out relative-out: a relative path under `ray job submit" in log, log[-3000:]


def test_shards_the_driver_cannot_see_fail_before_the_manifest(tmp_path):
    """Workers on other nodes write shards into their own --out when it is not shared storage: the
    driver finds them missing (or cut short) and refuses to write a manifest naming them."""
    from data_prep.run import JobFailed, check_shards_present

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-a.tar").write_bytes(b"x" * 10)
    check_shards_present(tmp_path, {0: {"bytes": {"train/shard-a.tar": 10}}})
    for records in ({0: {"bytes": {"train/shard-a.tar": 10}}, 1: {"bytes": {"train/shard-b.tar": 10}}},
                    {0: {"bytes": {"train/shard-a.tar": 12}}}):
        with pytest.raises(JobFailed, match="storage that every node of the Ray cluster mounts"):
            check_shards_present(tmp_path, records)


def _entrypoint_args(entrypoint: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "data_prep"], entrypoint
    return words[3:]


def test_kuberay_rayjob_yaml():
    doc = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert doc["apiVersion"].startswith("ray.io/") and doc["kind"] == "RayJob"
    spec = doc["spec"]
    cfg = parse_run_args(_entrypoint_args(spec["entrypoint"]))
    assert cfg.seq_len == 1024 and cfg.packing == "wrap" and cfg.out.startswith("/data/")
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.")
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for group in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["image"] for c in containers)
        assert any(m["mountPath"] == "/data" for c in containers for m in c.get("volumeMounts", []))


def test_ray_cluster_launcher_yaml():
    doc = yaml.safe_load((REPO / "cluster" / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "auth", "head_start_ray_commands", "worker_start_ray_commands",
                "setup_commands"):
        assert key in doc, key
    head = " ".join(doc["head_start_ray_commands"])
    assert "ray start --head" in head and "--include-dashboard=true" in head
    assert any("$RAY_HEAD_IP" in c for c in doc["worker_start_ray_commands"])
    setup = " ".join(doc["setup_commands"])
    for pkg in ("ray[default]", "tokenizers", "pyarrow", "zstandard"):
        assert pkg in setup
    # a virtualenv (PEP 668 systems refuse a system pip install), and Ray started from it, so the
    # job's `python` entrypoint is that virtualenv's
    assert "python3 -m venv --clear ~/mdlm-venv" in setup and "~/mdlm-venv/bin/python -m pip install" in setup
    for cmd in doc["head_start_ray_commands"] + doc["worker_start_ray_commands"]:
        assert cmd.startswith("source ~/mdlm-venv/bin/activate && "), cmd
    commands = [c for k in ("initialization_commands", "setup_commands", "head_start_ray_commands",
                            "worker_start_ray_commands") for c in doc[k]]
    for cmd in commands:
        assert subprocess.run(["bash", "-n", "-c", cmd]).returncode == 0, cmd
    # /shared must be a mount on every node: on a machine where it is not, setup stops and says so
    [check] = doc["initialization_commands"]
    if not os.path.ismount("/shared"):
        proc = subprocess.run(["bash", "-c", check], capture_output=True, text=True)
        assert proc.returncode == 1 and "/shared is not a mounted shared filesystem" in proc.stderr
    # the example submission in the header comment parses with the real CLI
    comment = [line[1:].strip() for line in (REPO / "cluster" / "ray-cluster.yaml").read_text().splitlines()
               if line.startswith("#")]
    start = next(i for i, line in enumerate(comment) if line.startswith("ray job submit"))
    cmdline = (comment[start].rstrip("\\") + " " + comment[start + 1]).split(" -- ", 1)[1]
    cfg = parse_run_args(_entrypoint_args(cmdline))
    assert cfg.tokenizer == "/shared/tokenizers/gpt2"
