"""train.precision=bf16-mixed: fp32 weights in the DeepSpeed engine, forward under torch.autocast
(DeepSpeed's torch_autocast), the recipe of the MDLM reference; compared with an fp32 run."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import RunConfig
from pipeline.trainer import build_deepspeed_config

from .conftest import launch_train, run_single

COMMON = ("train.max_steps=10", "train.log_every=1", "tracking.enabled=false", "eval.max_batches=1",
          "sample.num_samples=1", "sample.steps=4")


def _series(run_dir, key):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def _module_dtypes(run_dir):
    path = run_dir / "checkpoints" / "step00000010" / "mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)["module"]
    return {t.dtype for t in state.values() if torch.is_tensor(t)}


@pytest.fixture(scope="module")
def fp32_run(markov_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fp32")
    run_single(run_dir, markov_data, *COMMON, "train.precision=fp32")
    return run_dir


def test_bf16_mixed_keeps_fp32_weights_and_tracks_the_fp32_run(markov_data, tmp_path, fp32_run):
    run_single(tmp_path / "mixed", markov_data, *COMMON, "train.precision=bf16-mixed")
    assert _module_dtypes(tmp_path / "mixed") == {torch.float32}
    fp32_loss, mixed_loss = _series(fp32_run, "train/loss"), _series(tmp_path / "mixed", "train/loss")
    assert sorted(mixed_loss) == list(range(1, 11))
    assert max(abs(mixed_loss[s] - fp32_loss[s]) for s in fp32_loss) < 0.05
    # autocast really ran: bf16 matmuls change the gradients slightly
    fp32_grad, mixed_grad = _series(fp32_run, "train/grad_norm"), _series(tmp_path / "mixed", "train/grad_norm")
    assert any(abs(mixed_grad[s] - fp32_grad[s]) > 1e-5 for s in fp32_grad)
    assert mixed_loss[10] < mixed_loss[1]


@pytest.mark.parametrize("precision", ["bf16", "bf16-mixed"])
def test_tensor_parallel_layers_train_in_lower_precision(markov_data, tmp_path, fp32_run, precision):
    """megatron-core's layers inside DeepSpeed's bf16 engine (bf16 weights) or under its autocast
    (fp32 weights): TP=2 tracks the fp32 single-process run. Their backward replays autocast for
    CUDA only, so on a CPU bf16-mixed with TP is refused before any work, and says why."""
    # bf16 at ZeRO-1 with the default fp32 gradients: DeepSpeed's BF16_Optimizer under TP groups
    stage = "train.zero_stage=1" if precision == "bf16" else "train.zero_stage=2"
    out = launch_train(tmp_path, markov_data, *COMMON, f"train.precision={precision}", "parallel.tensor=2",
                       stage, check=False)
    if precision == "bf16-mixed" and not torch.cuda.is_available():
        assert out.returncode != 0
        assert "bf16-mixed with parallel.tensor > 1 needs a GPU" in out.stdout + out.stderr
        assert not (tmp_path / "checkpoints").exists()
        return
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    dtypes = _module_dtypes(tmp_path)
    assert dtypes == ({torch.bfloat16} if precision == "bf16" else {torch.float32})
    fp32_loss, loss = _series(fp32_run, "train/loss"), _series(tmp_path, "train/loss")
    assert sorted(loss) == list(range(1, 11))
    assert max(abs(loss[s] - fp32_loss[s]) for s in fp32_loss) < 0.05
    assert loss[10] < loss[1]


def test_bf16_mixed_communicates_in_fp32_unless_the_json_says_otherwise(tmp_path):
    cfg = RunConfig()
    cfg.train.precision = "bf16-mixed"
    ds = build_deepspeed_config(cfg, 1)
    assert ds["bf16"]["enabled"] is False
    assert ds["torch_autocast"] == {"lower_precision_safe_modules": [], "enabled": True, "dtype": "bfloat16"}
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"torch_autocast": {"lower_precision_safe_modules": ["torch.nn.Linear"]}}))
    cfg.train.deepspeed_config = str(custom)
    assert build_deepspeed_config(cfg, 1)["torch_autocast"]["lower_precision_safe_modules"] == ["torch.nn.Linear"]
    cfg.train.precision = "bf16"
    assert build_deepspeed_config(cfg, 1)["torch_autocast"]["enabled"] is False


def test_bf16_weights_accumulate_and_reduce_gradients_in_fp32_by_default(tmp_path):
    cfg = RunConfig()
    cfg.train.precision = "bf16"
    ds = build_deepspeed_config(cfg, 1)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    cfg.train.zero_stage = 0  # DeepSpeed accumulates in the weights' dtype there: reduction only
    ds = build_deepspeed_config(cfg, 1)
    assert "data_types" not in ds and ds["communication_data_type"] == "fp32"
    cfg.train.zero_stage, cfg.train.grad_precision = 2, "bf16"
    ds = build_deepspeed_config(cfg, 1)
    assert "data_types" not in ds and "communication_data_type" not in ds
    custom = tmp_path / "ds.json"  # the JSON's own choice wins
    custom.write_text(json.dumps({"communication_data_type": "bf16", "data_types": {"grad_accum_dtype": "bf16"}}))
    cfg.train.grad_precision, cfg.train.deepspeed_config = "fp32", str(custom)
    ds = build_deepspeed_config(cfg, 1)
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"} and ds["communication_data_type"] == "bf16"
    cfg = RunConfig()
    cfg.train.precision = "fp32"
    ds = build_deepspeed_config(cfg, 1)
    assert "data_types" not in ds and "communication_data_type" not in ds


def test_zero1_fp32_gradients_accumulate_each_micro_batch_once(markov_data, tmp_path):
    """bf16 weights at ZeRO-1 with fp32 gradients (DeepSpeed's BF16_Optimizer) against ZeRO-2,
    two micro-batches per step: the same gradient norms and losses. When the model's output hid
    its tensors from DeepSpeed, ZeRO-1 re-added the first micro-batch's gradient (norm 2x)."""
    norms = {}
    for stage in (1, 2):
        run_single(tmp_path / f"zero{stage}", markov_data, "train.max_steps=3", "train.log_every=1",
                   "tracking.enabled=false", "eval.max_batches=1", "sample.num_samples=0",
                   "train.precision=bf16", f"train.zero_stage={stage}", "data.micro_batch_size=8",
                   "train.global_batch_size=16", "train.checkpoint_every=0")
        norms[stage] = _series(tmp_path / f"zero{stage}", "train/grad_norm")
        losses = _series(tmp_path / f"zero{stage}", "train/loss")
        norms[stage] = {s: (norms[stage][s], losses[s]) for s in norms[stage]}
    assert sorted(norms[1]) == [1, 2, 3]
    for step in (1, 2, 3):
        (g1, l1), (g2, l2) = norms[1][step], norms[2][step]
        assert abs(g1 - g2) / g2 < 1e-3 and abs(l1 - l2) < 1e-3, (step, norms)

