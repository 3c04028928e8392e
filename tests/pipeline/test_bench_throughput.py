"""The GPU throughput benchmark runs end to end on CPU with a tiny preset (its figures are only
meaningful on a GPU; this keeps the one command that measures them working)."""
from __future__ import annotations

import json
import subprocess
import sys

from .conftest import ROOT


def test_throughput_bench_prints_and_writes_every_mode(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--preset", "mdlm-tiny", "--vocab-size", "257",
         "--device", "cpu", "--micro-batch", "2", "--seq-len", "32", "--steps", "2", "--warmup", "1",
         "--precision", "bf16", "--modes", "plain,deepspeed,deepspeed-mixed,plain-fp8", "--output", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    modes = [r["mode"] for r in result["results"]]
    assert modes == ["plain", "deepspeed", "deepspeed-mixed", "plain-fp8"]
    for r in result["results"]:
        assert r["tokens_per_s"] > 0 and r["mfu"] is None  # no peak FLOPs known for a CPU
        assert r["ratio_to_plain"] > 0
    # same initial weights and data: the first losses agree across modes (fp8 within its precision)
    # (deepspeed-mixed is the plain recipe inside DeepSpeed: fp32 weights under bf16 autocast)
    plain, ds, mixed, fp8 = (r["last_loss"] for r in result["results"])
    assert abs(plain - mixed) < 1e-5 and abs(plain - ds) < 1e-3 and abs(plain - fp8) / plain < 0.05
    assert "tokens/s" in proc.stdout and "ratio" in proc.stdout
