from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.config import RunConfig, load_run_config
from pipeline.configtools import ConfigError, flatten, to_dict

from .conftest import ROOT


def test_yaml_plus_dotted_overrides(markov_data):
    cfg = load_run_config(str(ROOT / "configs/train/tiny-test.yaml"),
                          [f"data.path={markov_data}", "train.max_steps=7", "optim.betas=[0.8, 0.95]",
                           "model.preset=mdlm-small"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.max_steps == 7
    assert cfg.optim.betas == (0.8, 0.95)
    # the preset fills the shape; keys given explicitly in the YAML (dropout) still win
    assert (cfg.model.n_layers, cfg.model.d_model, cfg.model.n_heads) == (12, 768, 12)
    assert cfg.model.dropout == 0.0
    assert flatten(to_dict(cfg))["train.max_steps"] == 7


@pytest.mark.parametrize("override, message", [
    ("train.max_step=5", "unknown config key 'train.max_step'; nearest valid keys: train.max_steps"),
    ("optimm.lr=1", "unknown config key 'optimm'; nearest valid keys: optim"),
    ("train.max_steps=many", "train.max_steps: expected an integer, got 'many'"),
    ("train.precision=fp16", "train.precision: 'fp16' is not one of 'bf16', 'bf16-mixed', 'fp32'"),
    ("model.preset=mdlm-huge", "model.preset 'mdlm-huge' is unknown"),
    ("train.zero_stage=4", "train.zero_stage=4 must be 0, 1, 2 or 3"),
    ("eval.time_samples=1", "eval.time_samples=1: the bound's standard error needs at least 2"),
    # the final samples' settings are checked at start, not after the whole run
    ("sample.steps=0", "sample.steps=0: the reverse process needs at least 1 step"),
    ("sample.top_p=1.5", "sample.top_p=1.5: must be in (0, 1]"),
    ("sample.temperature=0", "sample.temperature=0.0: must be > 0"),
    ("sample.num_samples=-1", "sample.num_samples=-1: use 0 (no samples) or more"),
    ("train.grad_precision=fp16", "train.grad_precision: 'fp16' is not one of 'fp32', 'bf16'"),
    ("train.precision=fp8 fp8.backend=te train.activation_checkpointing=true",
     "train.activation_checkpointing with fp8.backend=te is not supported"),
    ("train.precision=fp8 fp8.backend=te fp8.keep_first_last_block_bf16=true parallel.tensor=2",
     "fp8.keep_first_last_block_bf16 applies with parallel.tensor=1 only"),
])
def test_bad_keys_and_types_fail_naming_the_key(markov_data, override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(str(ROOT / "configs/train/tiny-test.yaml"), [f"data.path={markov_data}", *override.split()])
    assert message in str(err.value)


def test_missing_data_dir_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="has no manifest.json"):
        load_run_config(None, [f"data.path={tmp_path}"])


def test_eval_split_without_shards_is_refused_before_any_work(markov_data, tmp_path):
    import json
    import shutil

    with pytest.raises(ConfigError, match=r"has no shards in split 'valid' \(splits with shards: train, val\): "
                                          r"set data.eval_split to one of \['train', 'val'\]"):
        load_run_config(None, [f"data.path={markov_data}", "data.eval_split=valid"])
    empty = tmp_path / "no-val"
    shutil.copytree(markov_data, empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"] = []  # data_prep with --val-fraction 0
    (empty / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="has no shards in split 'val'.*--val-fraction > 0"):
        load_run_config(None, [f"data.path={empty}"])


def test_train_cli_rejects_unknown_key_before_any_work(markov_data, tmp_path):
    proc = subprocess.run([sys.executable, "pipeline/train.py", "--config", "configs/train/tiny-test.yaml",
                           f"data.path={markov_data}", f"run_dir={tmp_path}", "train.max_stepz=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'train.max_stepz'; nearest valid keys: train.max_steps" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_every_shipped_yaml_config_is_valid(markov_data):
    for path in sorted((ROOT / "configs/train").glob("*.yaml")):
        cfg = load_run_config(str(path), [f"data.path={markov_data}"])
        assert cfg.train.max_steps >= 1, path


@pytest.mark.parametrize("zero_section,stage,message", [
    ({"stage": 3}, 2, "sets zero_optimization.stage=3 but train.zero_stage=2: pass train.zero_stage=3"),
    ({"offload_param": {"device": "cpu"}}, 2, "offload_param), which needs ZeRO-3"),
    ({"offload_optimizer": {"device": "cpu"}}, 0, "offload_optimizer), which needs ZeRO 1-3"),
])
def test_deepspeed_json_that_contradicts_the_run_is_refused(markov_data, tmp_path, zero_section, stage, message):
    import json
    import re

    from pipeline.trainer import build_deepspeed_config, offload_device

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": zero_section}))
    cfg = load_run_config(str(ROOT / "configs/train/tiny-test.yaml"), [f"data.path={markov_data}", f"train.zero_stage={stage}",
                                                           f"train.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_deepspeed_config(cfg, 1)
    shipped = load_run_config(str(ROOT / "configs/train/tiny-test.yaml"), [
        f"data.path={markov_data}", "train.zero_stage=3", f"train.deepspeed_config={ROOT / 'configs/deepspeed/zero3_offload.json'}"])
    zero = build_deepspeed_config(shipped, 1)["zero_optimization"]
    assert offload_device(zero, "offload_optimizer") == offload_device(zero, "offload_param") == "cpu"
    assert offload_device({"offload_optimizer": {"device": "none"}}, "offload_optimizer") is None


def test_train_cli_takes_overrides_on_both_sides_of_its_options():
    from pipeline.train import parse_args

    args = parse_args(["--config", "c.yaml", "train.max_steps=9", "--resume", "auto", "eval.seed=1"])
    assert (args.config, args.resume, args.overrides) == ("c.yaml", "auto", ["train.max_steps=9", "eval.seed=1"])


def test_extra_evaluation_corpora_are_checked_before_any_work(markov_data, tmp_path):
    from pipeline.config import corpus_split
    from tests.synthetic import write_markov_shards

    write_markov_shards(tmp_path / "eval-only", vocab=16, seq_len=32, seed=3, train_samples=32, val_samples=0)
    write_markov_shards(tmp_path / "vocab12", vocab=12, seq_len=32, train_samples=32, val_samples=8)
    write_markov_shards(tmp_path / "len64", vocab=16, seq_len=64, train_samples=32, val_samples=8)
    base = [f"data.path={markov_data}"]
    cfg = load_run_config(None, [*base, f"eval.corpora.wt2={tmp_path / 'eval-only'}"])
    assert cfg.eval.corpora == {"wt2": str(tmp_path / "eval-only")}
    assert corpus_split(json.loads((tmp_path / "eval-only" / "manifest.json").read_text())) == "train"
    for override, message in (
            (f"eval.corpora.a/b={markov_data}", r"the name 'a/b' becomes MLflow metrics eval/a/b/\.\.\."),
            (f"eval.corpora.gone={tmp_path / 'missing'}", r"eval\.corpora\.gone \(.*missing\): no readable manifest"),
            (f"eval.corpora.v12={tmp_path / 'vocab12'}", r"eval\.corpora\.v12 .* was tokenized with .*prepare it "
                                                          r"with the training data's tokenizer"),
            (f"eval.corpora.l64={tmp_path / 'len64'}", r"has seq_len 64, the training data 32: prepare it with "
                                                       r"--seq-len 32")):
        with pytest.raises(ConfigError, match=message):
            load_run_config(None, [*base, override])


@pytest.mark.parametrize("override,message", [
    ("train.log_every=0", "train.log_every=0 and train.max_bad_steps=5 must be >= 1"),
    ("train.max_bad_steps=0", "train.log_every=10 and train.max_bad_steps=0 must be >= 1"),
    ("train.keep_last=-1", "train.keep_last=-1 must be >= 0 (0: keep every checkpoint)"),
    ("train.checkpoint_every=-5", "train.checkpoint_every=-5 must be >= 0 (0: only at the end)"),
])
def test_train_cadences_out_of_range_are_refused(markov_data, override, message):
    import re

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(None, [f"data.path={markov_data}", override])


def test_bf16_tensor_parallel_at_zero0_is_refused(markov_data):
    import re

    message = "train.precision=bf16 with parallel.tensor > 1 needs train.zero_stage >= 1"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(None, [f"data.path={markov_data}", "parallel.tensor=2", "train.zero_stage=0",
                               "train.precision=bf16"])
    for ok in (["train.zero_stage=1", "train.precision=bf16"], ["train.zero_stage=0", "train.precision=fp32"]):
        assert load_run_config(None, [f"data.path={markov_data}", "parallel.tensor=2", *ok]).parallel.tensor == 2
