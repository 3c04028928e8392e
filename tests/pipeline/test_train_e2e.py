"""End to end with the real components: the deepspeed launcher, 2 processes over gloo with ZeRO-2,
webdataset shards, checkpoints and resume, and an MLflow sqlite store read back with the client."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.synthetic import write_markov_shards

from .conftest import ROOT, free_port, launch_train, run_single


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def runs(markov_data, tmp_path_factory):
    """One interrupted run (30 steps, then resumed to 40) and one straight 40-step run."""
    base = tmp_path_factory.mktemp("runs")
    resumed, straight = base / "resumed", base / "straight"
    launch_train(resumed, markov_data, "train.max_steps=30", "train.log_every=1")
    first_ckpts = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    launch_train(resumed, markov_data, "train.max_steps=40", "train.log_every=1", resume="auto")
    launch_train(straight, markov_data, "train.max_steps=40", "train.log_every=1")
    return {"resumed": resumed, "straight": straight, "first_ckpts": first_ckpts}


def client_for(run_dir: Path) -> tuple[MlflowClient, str]:
    summary = json.loads((run_dir / "final_eval.json").read_text())
    return MlflowClient(tracking_uri=summary["tracking_uri"]), summary["mlflow_run_id"]


def test_loss_decreases_and_checkpoints_are_complete(runs):
    client, run_id = client_for(runs["straight"])
    loss = history(client, run_id, "train/loss")
    steps = sorted(loss)
    assert steps == list(range(1, 41))
    # zero-initialised head: the first steps sit at log(16) = 2.77 nats; the chain's entropy
    # rate is ~1.97, so a model that learns the transitions must drop well below the start
    first = sum(loss[s] for s in steps[:5]) / 5
    last = sum(loss[s] for s in steps[-10:]) / 10
    assert last < first - 0.2, loss
    ckpts = runs["straight"] / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000040"
    # keep_last=3 with checkpoints every 10 steps
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000020", "step00000030", "step00000040"]
    for tag in ckpts.glob("step*"):
        assert (tag / "COMPLETE").is_file()
        assert (tag / "mp_rank_00_model_states.pt").is_file()
        assert len(list(tag.glob("zero_pp_rank_*_optim_states.pt"))) == 2  # ZeRO-2 over 2 ranks


def test_resume_continues_exactly_and_in_the_same_mlflow_run(runs):
    assert "step00000030" in runs["first_ckpts"]
    c_res, id_res = client_for(runs["resumed"])
    c_str, id_str = client_for(runs["straight"])
    resumed, straight = history(c_res, id_res, "train/loss"), history(c_str, id_str, "train/loss")
    assert sorted(resumed) == sorted(straight)  # one run, steps 5..40, continued after the restart
    for step in range(31, 41):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])
    run = c_res.get_run(id_res)
    assert run.info.status == "FINISHED"
    # the first start's params stay (MLflow cannot change them); the resume's config and changes
    # are beside them
    assert run.data.params["train.max_steps"] == "30" and run.data.tags["mdlm.resumed_at_step"] == "30"
    assert "train.max_steps: 30 -> 40" in run.data.tags["mdlm.resume.step00000030.changed"]
    [artifact] = c_res.list_artifacts(id_res, "resumes/step00000030")
    assert artifact.path == "resumes/step00000030/config.yaml"
    assert "mdlm.resumed_at_step" not in c_str.get_run(id_str).data.tags


def test_mlflow_run_holds_config_metrics_and_artifacts(runs):
    client, run_id = client_for(runs["straight"])
    run = client.get_run(run_id)
    params = run.data.params
    assert params["model.preset"] == "mdlm-tiny"
    assert params["train.zero_stage"] == "2"
    assert params["data.micro_batch_size"] == "4"
    assert params["derived.world_size"] == "2"
    assert int(params["model.vocab_size"]) == 17  # 16 tokens + [MASK], taken from the manifest
    metrics = run.data.metrics
    for key in ("eval/ppl_bound", "eval/nelbo", "eval/unigram_ppl", "train/lr", "train/grad_norm",
                "perf/tokens_per_s"):
        assert key in metrics, key
    assert metrics["train/epoch"] == pytest.approx(40 * 4 / 256)  # 4 samples a step of a rank's 256
    # the logged bound is the one in final_eval.json (40 steps on 4 val batches: noisy, so no
    # learning claim here; test_loss_decreases... makes it)
    summary = json.loads((runs["straight"] / "final_eval.json").read_text())
    assert metrics["eval/ppl_bound"] == pytest.approx(summary["eval"]["ppl_bound"])
    assert 1.0 < metrics["eval/ppl_bound"] < 64.0
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "manifest.json", "final_eval.json", "samples"} <= top
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert samples == ["samples/samples.txt"]
    local = client.download_artifacts(run_id, "samples/samples.txt")
    text = Path(local).read_text()
    assert text.count("=====") == 1 and "t" in text  # 2 samples of WordLevel tokens


def run_cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_evaluate_cli_reports_bound_with_error_and_conventions(runs, tmp_path):
    out = tmp_path / "eval.json"
    run_cli("-m", "pipeline.evaluate", "--checkpoint", str(runs["straight"] / "checkpoints"),
            "--time-samples", "4", "--max-batches", "2", "--batch-size", "8", "--output", str(out))
    result = json.loads(out.read_text())
    assert result["checkpoint"].endswith("step00000040") and (result["step"], result["weights"]) == (40, "ema")
    assert result["tokens"] == 2 * 8 * 32 and result["time_samples"] == 4
    assert 0 < result["nelbo_se"] < 0.5
    lo, hi = result["ppl_bound_ci95"]
    assert lo < result["ppl_bound"] < hi
    assert result["conventions"]["eos_between_documents"] is True
    assert result["unigram_ppl"] > 1.0
    again = tmp_path / "again.json"
    run_cli("-m", "pipeline.evaluate", "--checkpoint", str(runs["straight"] / "checkpoints"),
            "--time-samples", "4", "--max-batches", "2", "--batch-size", "8", "--output", str(again))
    assert json.loads(again.read_text())["nelbo"] == result["nelbo"]  # deterministic for a seed
    # two ranks score every other sequence of the same first 16: the same bound and interval
    ranks2 = tmp_path / "ranks2.json"
    run_cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "pipeline.evaluate", "--checkpoint", str(runs["straight"] / "checkpoints"),
            "--time-samples", "4", "--max-batches", "1", "--batch-size", "8", "--output", str(ranks2))
    split = json.loads(ranks2.read_text())
    assert split["ranks"] == 2 and split["tokens"] == result["tokens"] and split["sequences"] == 16
    assert math.isclose(split["nelbo"], result["nelbo"], rel_tol=1e-6)
    assert math.isclose(split["nelbo_se"], result["nelbo_se"], rel_tol=1e-6)
    assert split["unigram_tokens"] == result["unigram_tokens"]
    discrete = tmp_path / "discrete.json"
    run_cli("-m", "pipeline.evaluate", "--checkpoint", str(runs["straight"]), "--discrete-steps", "10",
            "--time-samples", "4", "--max-batches", "2", "--batch-size", "8", "--output", str(discrete))
    assert json.loads(discrete.read_text())["estimator"] == "discrete"
    assert result["precision"] == "fp32"  # auto on a CPU
    bf16 = tmp_path / "bf16.json"
    run_cli("-m", "pipeline.evaluate", "--checkpoint", str(runs["straight"] / "checkpoints"), "--precision", "bf16",
            "--time-samples", "4", "--max-batches", "2", "--batch-size", "8", "--output", str(bf16))
    autocast = json.loads(bf16.read_text())
    assert autocast["precision"] == "bf16" and autocast["nelbo"] != result["nelbo"]
    assert math.isclose(autocast["nelbo"], result["nelbo"], rel_tol=0.02)


def test_evaluate_cli_refuses_bad_input_before_loading(runs, tmp_path, capsys):
    from pipeline.evaluate import main

    ckpt = str(runs["straight"] / "checkpoints")
    for args, message in ((["--batch-size", "0"], "need a batch size >= 1"),
                          (["--split", "test"], "split 'test' not in"),
                          (["--output", str(tmp_path / "no" / "such" / "x.json")], "its folder does not exist"),
                          (["--device", "xla"], "--device xla: use auto, cpu, cuda or cuda:N"),
                          (["--device", "cpu", "--precision", "tf32"], "--precision tf32 needs a CUDA GPU")):
        with pytest.raises(SystemExit) as info:
            main(["--checkpoint", ckpt, *args])
        assert info.value.code == 2 and message in capsys.readouterr().err, args


def test_zero3_activation_checkpointed_raw_weights_evaluate_and_the_result_says_which(markov_data, tmp_path, capsys):
    """ZeRO-3 consolidates raw weights under the checkpoint wrapper's names; with train.ema=0 the
    default (EMA) evaluation falls back to them and says so. A split without shards is refused
    before loading, and a baseline that cannot be computed costs the bound nothing."""
    from pipeline.evaluate import main

    run_single(tmp_path / "run", markov_data, "train.max_steps=2", "train.zero_stage=3", "train.ema=0",
               "train.activation_checkpointing=true", "tracking.enabled=false", "eval.max_batches=1",
               "sample.num_samples=0")
    ckpt = str(tmp_path / "run" / "checkpoints")
    out = tmp_path / "eval.json"
    assert main(["--checkpoint", ckpt, "--max-batches", "1", "--time-samples", "2", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["weights"], result["step"]) == ("raw", 2) and math.isfinite(result["nelbo"])
    assert any("holds no EMA weights (train.ema=0): evaluated its raw weights" in w for w in result["warnings"])
    assert main(["--checkpoint", ckpt, "--max-batches", "1", "--time-samples", "2", "--no-ema"]) == 0
    # a copy of the val split alone: no train split for the unigram baseline
    val_only = tmp_path / "val-only"
    shutil.copytree(markov_data / "val", val_only / "val")
    shutil.copy(markov_data / "manifest.json", val_only / "manifest.json")
    capsys.readouterr()
    assert main(["--checkpoint", ckpt, "--max-batches", "1", "--time-samples", "2", "--data", str(val_only),
                 "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert math.isfinite(result["nelbo"]) and "unigram_ppl" not in result and "unigram_error" in result
    no_val = tmp_path / "no-val"
    write_markov_shards(no_val, vocab=16, seq_len=32, train_samples=32, val_samples=0)
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", ckpt, "--data", str(no_val)])
    assert info.value.code == 2 and "split 'val' of" in capsys.readouterr().err


def test_evaluate_cli_exits_1_with_the_error_when_the_evaluation_fails(runs, capsys, monkeypatch):
    from pipeline import evaluate

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(evaluate, "mdlm_nelbo", out_of_memory)
    assert evaluate.main(["--checkpoint", str(runs["straight"] / "checkpoints"), "--max-batches", "1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in out_of_memory" in err  # where it was raised
    assert "error: evaluating split 'val' of " in err and ("failed on 1 of 1 rank(s); here: OutOfMemoryError: CUDA "
                                                            "out of memory") in err


def test_sample_cli_writes_texts_and_stats(runs, tmp_path):
    prefix = tmp_path / "gen"
    run_cli("-m", "pipeline.sample", "--checkpoint", str(runs["straight"] / "checkpoints"),
            "--steps", "64", "--num-samples", "1", "--length", "16", "--output", str(prefix))
    stats = json.loads(prefix.with_suffix(".json").read_text())
    assert stats["weights"] == "ema" and stats["length"] == 16 and stats["num_samples"] == 1
    assert 1 <= stats["network_calls"] <= min(64, 16) + 1  # cached: steps that change nothing reuse the output
    texts = prefix.with_suffix(".txt").read_text().strip().split("\n\n=====\n\n")
    assert len(texts) == 1 and len(texts[0].split()) == 16
    bad = subprocess.run([sys.executable, "-m", "pipeline.sample", "--checkpoint", str(runs["straight"]),
                          "--steps", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr


def test_checkpoints_carry_their_data_identity(runs, tmp_path):
    """A checkpoint holds its run config, the data's manifest and the tokenizer: sampling works
    after the data has moved, and evaluating on data with another tokenizer is refused up front."""
    from tests.synthetic import write_markov_shards

    src = runs["straight"] / "checkpoints" / "step00000040"
    assert {"run_config.json", "data_manifest.json", "tokenizer"} <= {p.name for p in src.iterdir()}
    moved = tmp_path / "moved" / src.name
    shutil.copytree(src, moved)
    config = json.loads((moved / "run_config.json").read_text())
    config["data"]["path"] = str(tmp_path / "gone")
    (moved / "run_config.json").write_text(json.dumps(config))
    prefix = tmp_path / "gen"
    run_cli("-m", "pipeline.sample", "--checkpoint", str(moved), "--steps", "8", "--num-samples", "1",
            "--length", "16", "--output", str(prefix))
    assert len(prefix.with_suffix(".txt").read_text().split()) == 16

    other = tmp_path / "vocab24"
    write_markov_shards(other, vocab=24, seq_len=32, train_samples=64, val_samples=16, samples_per_shard=64)
    bad = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--checkpoint", str(moved), "--data", str(other)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "was tokenized with synthetic-markov (vocab 24" in bad.stderr and "trained on synthetic-markov (vocab 16" in bad.stderr
    longer = tmp_path / "seq64"
    write_markov_shards(longer, vocab=16, seq_len=64, train_samples=64, val_samples=16, samples_per_shard=64)
    out = tmp_path / "eval64.json"
    proc = run_cli("-m", "pipeline.evaluate", "--checkpoint", str(moved), "--data", str(longer), "--max-batches", "1",
                   "--batch-size", "4", "--time-samples", "2", "--output", str(out))
    assert "holds sequences of 64 tokens" in proc.stderr
    assert json.loads(out.read_text())["warnings"] == [
        f"data '{longer}' holds sequences of 64 tokens; {moved} was trained on 32"]
