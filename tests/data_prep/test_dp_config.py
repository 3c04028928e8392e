"""DataPrepConfig through pipeline.configtools and the CLI: errors before any work."""
from __future__ import annotations

import subprocess
import sys

import pytest

from data_prep.cli import build_run_parser, parse_run_args
from data_prep.config import DataPrepConfig
from dp_helpers import REPO
from pipeline.configtools import ConfigError


def test_flags_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("seq_len: 256\nval_fraction: 0.1\npacking: pad\n")
    cfg = parse_run_args(["--input", "a", "b", "--out", "o", "--config", str(y), "--seq-len", "512",
                          "max_doc_chars=1000", "--dedup"])
    assert isinstance(cfg, DataPrepConfig)
    assert cfg.input == ["a", "b"] and cfg.seq_len == 512 and cfg.val_fraction == 0.1
    assert cfg.packing == "pad" and cfg.max_doc_chars == 1000 and cfg.dedup is True
    assert cfg.tokenizer == "train" and cfg.train_vocab_size() == 8192
    assert "out" not in cfg.job_dict() and "num_workers" not in cfg.job_dict()


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'seq_lne'.*seq_len"):
        parse_run_args(["--input", "a", "--out", "o", "seq_lne=64"])


def test_unknown_yaml_key_and_wrong_type(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("val_fracton: 0.1\n")
    with pytest.raises(ConfigError, match="val_fraction"):
        parse_run_args(["--input", "a", "--out", "o", "--config", str(y)])
    with pytest.raises(ConfigError, match="seq_len: expected an integer"):
        parse_run_args(["--input", "a", "--out", "o", "seq_len=long"])
    with pytest.raises(ConfigError, match="packing"):
        parse_run_args(["--input", "a", "--out", "o", "packing=zigzag"])


def test_validation_errors():
    with pytest.raises(ConfigError, match="disagree"):
        parse_run_args(["--input", "a", "--out", "o", "--tokenizer", "train:500", "--vocab-size", "600"])
    with pytest.raises(ConfigError, match="val_fraction"):
        parse_run_args(["--input", "a", "--out", "o", "--val-fraction", "1.5"])
    with pytest.raises(ConfigError, match="--input"):
        parse_run_args(["--out", "o"])


def test_cli_reports_config_errors_before_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_prep", "--input", str(tmp_path), "--out",
                           str(tmp_path / "o"), "tokenzier=gpt2"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown config key 'tokenzier'" in proc.stderr and "tokenizer" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "data_prep", "--input", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_parser_help_lists_flags():
    text = build_run_parser().format_help()
    for flag in ("--input", "--out", "--tokenizer", "--vocab-size", "--seq-len", "--packing",
                 "--samples-per-shard", "--val-fraction", "--text-field", "--num-workers", "--dedup",
                 "--max-bad-fraction", "--config"):
        assert flag in text


def test_shipped_data_configs_parse():
    configs = sorted((REPO / "configs" / "data").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = parse_run_args(["--config", str(path), "--input", "x", "--out", "o"])
        assert cfg.seq_len >= 3, path
