import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.mdlm_vs_ar import main
from tests.synthetic import write_markov_shards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-markov")
    write_markov_shards(out, vocab=8, seq_len=16, train_samples=128, val_samples=48, samples_per_shard=32)
    return out


def test_bench_trains_both_on_the_same_tokens_and_prints_the_ratio(shards, tmp_path, capsys):
    out_json = tmp_path / "result.json"
    result = main(["--data", str(shards), "--steps", "4", "--batch-size", "8", "--time-samples", "2",
                   "--eval-sequences", "32", "--eval-batch-size", "16", "--output", str(out_json)])
    text = capsys.readouterr().out
    m, a = result["mdlm"], result["ar"]
    assert m["batches_sha256"] == a["batches_sha256"]  # same tokens, same order
    assert m["train_tokens"] == a["train_tokens"] == 4 * 8 * 16
    assert m["eval_sequences"] == a["eval_sequences"] == 32
    assert m["eval_tokens"] == a["eval_tokens"] == 32 * 15  # one denominator: positions 1..L-1
    assert m["params"] > a["params"]  # adaLN is the only difference
    for r in (m, a):
        assert math.isfinite(r["ppl"]) and 1.0 < r["ppl"] < 9 * 1.5  # barely trained: near uniform over 8 + mask
    assert result["ratio"] == pytest.approx(m["ppl"] / a["ppl"])
    assert json.loads(out_json.read_text())["ratio"] == pytest.approx(result["ratio"])
    assert "MDLM  perplexity bound <=" in text and "ratio MDLM / AR" in text and "entropy rate" in text


def test_bench_runs_as_a_script_and_rejects_bad_flags(shards, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(shards), "--steps", "0"])
    assert exit_info.value.code == 2 and "--steps" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "bench/mdlm_vs_ar.py", "--data", str(shards / "nope"), "--steps", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "manifest.json not found" in proc.stderr
