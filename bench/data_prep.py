"""Benchmark of data_prep on one input: Ray pipeline with 1 and 2 workers vs a plain single-process loop.

    python bench/data_prep.py [--input PATH ...] [--tokenizer SPEC] [--seq-len 1024]

Default input: the demo corpus (fetched with npm into the cache). The tokenizer is resolved once
(trained for train:N) and the same tokenizer.json is used by every variant, so tokenizer training
is not timed. One local Ray (started once, not timed) serves both Ray runs; each Ray timing covers
read + clean + tokenize (Ray tasks) + pack + write shards + manifest. The plain loop does read +
clean + batch encode (the tokenizers library's own threads) + the same packer and shard writer in
one process. tokens/s counts tokens written to shards.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.cli import parse_run_args  # noqa: E402
from data_prep.run import run_job, worker_cfg  # noqa: E402
from data_prep.shards import ShardWriter, WrapPacker  # noqa: E402
from data_prep.sources import BadRecords, discover, iter_unit_documents, plan_units  # noqa: E402
from data_prep.worker import encode_texts  # noqa: E402


def plain_loop(cfg, tok_json: str, out: Path) -> int:
    from data_prep.tokenizer import make_encoder

    tok = make_encoder(tok_json)
    info_dtype = "uint16" if tok.get_vocab_size() + 1 <= 65535 else "int32"
    eos = tok.token_to_id("<|endoftext|>")
    eos = 0 if eos is None else eos
    writer = ShardWriter(out, "train", cfg.samples_per_shard or 100_000, with_mask=False)
    packer = WrapPacker(writer, cfg.seq_len, eos, eos, info_dtype)
    bad = BadRecords()
    batch_ids, batch_texts = [], []
    units = plan_units(discover(cfg.input), cfg.task_bytes)
    for unit in units:
        for doc_id, text in iter_unit_documents(unit, worker_cfg(cfg), bad):
            batch_ids.append(doc_id)
            batch_texts.append(text)
            if len(batch_texts) >= 256:
                packer.add_docs(batch_ids, encode_texts(tok, batch_texts))
                batch_ids, batch_texts = [], []
    if batch_texts:
        packer.add_docs(batch_ids, encode_texts(tok, batch_texts))
    writer.close()
    return writer.tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+")
    ap.add_argument("--tokenizer", default="train:8192")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--keep", help="keep the outputs in this folder")
    args = ap.parse_args()
    if not args.input:
        from data_prep.corpus import fetch_demo_corpus

        args.input = [str(fetch_demo_corpus())]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    common = ["--input", *args.input, "--seq-len", str(args.seq_len), "--val-fraction", "0"]

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    try:
        # resolve the tokenizer once (not timed)
        first = work / "ray-1"
        t0 = time.time()
        run_job(parse_run_args(common + ["--out", str(first), "--tokenizer", args.tokenizer, "--num-workers", "2"]))
        tok_path = first / "tokenizer" / "tokenizer.json"
        print(f"(tokenizer resolved and warm-up run in {time.time() - t0:.1f}s)")
        results = {}
        for workers in (1, 2):
            out = work / f"ray-{workers}-timed"
            t0 = time.time()
            man = run_job(parse_run_args(common + ["--out", str(out), "--tokenizer", str(tok_path),
                                                   "--num-workers", str(workers)]))
            dt = time.time() - t0
            results[f"ray, {workers} worker(s)"] = (man["splits"]["train"]["tokens"], dt)
    finally:
        ray.shutdown()
    cfg = parse_run_args(common + ["--out", str(work / "plain"), "--tokenizer", str(tok_path)])
    t0 = time.time()
    tokens = plain_loop(cfg, tok_path.read_text(), work / "plain")
    results["plain loop, 1 process"] = (tokens, time.time() - t0)

    print(f"\ninput: {' '.join(args.input)}  seq_len {args.seq_len}  cpus {os.cpu_count()}")
    rates = {}
    for name, (tok, dt) in results.items():
        rates[name] = tok / dt
        print(f"{name:24s} {tok:>12,d} tokens  {dt:7.2f}s  {tok / dt / 1e3:9.1f}k tokens/s")
    plain = rates["plain loop, 1 process"]
    r1, r2 = rates["ray, 1 worker(s)"], rates["ray, 2 worker(s)"]
    print(f"\nratios: ray-1 / plain = {r1 / plain:.2f}   ray-2 / plain = {r2 / plain:.2f}   "
          f"ray-2 / ray-1 = {r2 / r1:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
