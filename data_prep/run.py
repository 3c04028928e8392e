"""The data preparation job: plan -> (train) tokenizer -> Ray tasks -> ordered pack -> shards -> manifest.

Determinism: Ray tasks read and tokenize units in parallel, but the driver consumes their results
strictly in input order and does the packing over that single ordered document stream. Shards,
keys and the manifest therefore depend only on the inputs and the job config, not on the number
of workers or on how the inputs were cut into tasks. Only one tail (< seq_len - 2 tokens) per
split is dropped in wrap mode.

Resuming: a rerun with the same job config redoes the (deterministic) work, keeps every complete
shard whose bytes are already right and replaces any other. The output folder remembers its job
in _work/job.json while running and in manifest.json when done; a different job is refused
unless --overwrite is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from pipeline.configtools import ConfigError

from . import manifest as mf
from .config import DataPrepConfig
from .shards import SHARD_PATTERN, PadPacker, ShardWriter, WrapPacker, key_base
from .sources import BadRecords, discover, iter_unit_documents, plan_units
from .tokenizer import TokenizerInfo, is_train_spec, load_tokenizer
from .worker import content_hash, is_val, tokenize_unit

SHARD_TARGET_BYTES = 256 << 20
MIN_SHARDS = 16
NOT_BAD = ("duplicate",)  # skipped on purpose, not bad input


class JobFailed(RuntimeError):
    """The job stopped on purpose (too much bad input, conflicting output folder)."""


def log(msg: str) -> None:
    print(f"[data_prep] {msg}", file=sys.stderr, flush=True)


def worker_cfg(cfg: DataPrepConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("text_field", "max_doc_chars", "val_fraction",
                                          "split_salt", "max_error_examples")}


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000.0
    return f"{n:.1f}T"


def prepare_out_dir(cfg: DataPrepConfig, out: Path) -> None:
    job = cfg.job_dict()
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    man_path = out / mf.MANIFEST_NAME
    job_path = out / "_work" / "job.json"
    if man_path.is_file():
        try:
            previous = json.loads(man_path.read_text()).get("job")
        except ValueError:
            previous = "unreadable"
    elif job_path.is_file():
        try:
            previous = json.loads(job_path.read_text())
        except ValueError:
            previous = "unreadable"
    elif any((out / s).is_dir() and any((out / s).iterdir()) for s in mf.SPLITS) and not cfg.overwrite:
        raise JobFailed(f"output folder '{out}' already holds train/ or val/ data of unknown origin; "
                        "choose another --out or pass --overwrite")
    if previous is not None and previous != job:
        if not cfg.overwrite:
            diff = sorted(k for k in set(job) | set(previous if isinstance(previous, dict) else {})
                          if not isinstance(previous, dict) or previous.get(k) != job.get(k))
            raise JobFailed(f"output folder '{out}' holds a different job (differs in: {', '.join(diff)}); "
                            "choose another --out or pass --overwrite to replace it")
    if cfg.overwrite and previous != job:
        for name in ("train", "val", "tokenizer", "_work"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (mf.MANIFEST_NAME, "errors.jsonl"):
            (out / name).unlink(missing_ok=True)
    mf.atomic_write_text(job_path, json.dumps(job, indent=2, sort_keys=True))


def _training_texts(cfg: DataPrepConfig, units: list[dict], bad: BadRecords, counter: dict):
    """Cleaned train-split documents in input order, up to train_tokenizer_max_chars."""
    wcfg = worker_cfg(cfg)
    seen: set[bytes] = set()
    total = 0
    for unit in units:
        for _doc_id, text in iter_unit_documents(unit, wcfg, bad):
            counter["docs"] += 1
            h = content_hash(text)
            if cfg.dedup:
                if h in seen:
                    continue
                seen.add(h)
            if is_val(h, cfg.split_salt, cfg.val_fraction):
                continue
            if total >= cfg.train_tokenizer_max_chars:
                continue  # keep reading: the bad-record counts cover the whole input
            total += len(text)
            yield text


def write_errors(out: Path, bad: BadRecords) -> None:
    """DIR/errors.jsonl: a few examples per reason ({reason, where: file:line, detail})."""
    examples = sorted(bad.examples, key=lambda e: e["reason"])  # stable: input order within a reason
    mf.atomic_write_text(out / "errors.jsonl",
                         "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))


def check_bad_fraction(cfg: DataPrepConfig, counts: dict[str, int], good_docs: int, stage: str) -> None:
    bad = sum(n for r, n in counts.items() if r not in NOT_BAD)
    seen = bad + good_docs
    if seen and bad / seen > cfg.max_bad_fraction:
        worst = ", ".join(f"{r}={n}" for r, n in sorted(counts.items(), key=lambda t: -t[1]) if r not in NOT_BAD)
        hint = ""
        if counts.get("missing_field", 0) > bad / 2:
            hint = f" Most records lack the field '{cfg.text_field}': is --text-field right?"
        raise JobFailed(f"{bad} of {seen} input records are bad ({bad / seen:.1%} > max_bad_fraction="
                        f"{cfg.max_bad_fraction}) [{stage}]: {worst}.{hint} See errors.jsonl for examples; "
                        "no manifest was written.")


def inputs_signature(files) -> str:
    """Identity of the input files as they are now (ids, sizes, modification times)."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f.path)
        h.update(f"{f.file_id}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8"))
    return h.hexdigest()


def get_tokenizer(cfg: DataPrepConfig, out: Path, units: list[dict], signature: str) -> TokenizerInfo:
    tok_path = out / "tokenizer" / "tokenizer.json"
    sig_path = out / "_work" / "tokenizer-inputs.sha256"
    if is_train_spec(cfg.tokenizer):
        if tok_path.is_file() and sig_path.is_file() and sig_path.read_text().strip() == signature:
            # resumed job on unchanged inputs: reuse the tokenizer trained by the interrupted run
            # (training is deterministic, this only saves the time)
            from tokenizers import Tokenizer

            from .tokenizer import describe

            info = describe(Tokenizer.from_file(str(tok_path)), f"bpe-bytelevel-{cfg.train_vocab_size()}",
                            cfg, cfg.tokenizer)
            info.json = tok_path.read_text(encoding="utf-8")
            log(f"reusing tokenizer {tok_path}")
            return info
        t0 = time.time()
        bad = BadRecords(cfg.max_error_examples)
        counter = {"docs": 0}
        info = load_tokenizer(cfg.tokenizer, cfg, _training_texts(cfg, units, bad, counter))
        log(f"trained byte-level BPE, vocab {info.vocab_size}, in {time.time() - t0:.1f}s")
        write_errors(out, bad)
        check_bad_fraction(cfg, bad.counts, counter["docs"], "while reading for tokenizer training")
        mf.atomic_write_text(tok_path, info.json)
        mf.atomic_write_text(sig_path, signature + "\n")
        return info
    info = load_tokenizer(cfg.tokenizer, cfg)
    mf.atomic_write_text(tok_path, info.json)
    return info


def _connect_ray(cfg: DataPrepConfig):
    import ray

    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            log(f"connecting to the Ray cluster at {os.environ['RAY_ADDRESS']}")
            ray.init(log_to_driver=True)
        else:
            n = cfg.num_workers or os.cpu_count() or 1
            pkg_root = str(Path(__file__).resolve().parents[1])
            pypath = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)
            ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": {"PYTHONPATH": pypath}})
        started = True
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = max(1, min(cfg.num_workers or cpus, cpus))
    return ray, started, workers


def auto_samples_per_shard(input_bytes: int, seq_len: int, dtype: str) -> int:
    """About 256 MiB of tokens per shard, but at least ~MIN_SHARDS train shards for small inputs
    (estimated from the input size, ~4 bytes of text per token), so that every loader worker and
    rank gets shards. A multiple of 64; depends only on the inputs and the config."""
    by_size = SHARD_TARGET_BYTES // (seq_len * np.dtype(dtype).itemsize)
    est_samples = input_bytes / 4 / seq_len
    by_count = int(est_samples / MIN_SHARDS)
    return max(64, min(by_size, by_count) // 64 * 64)


def run_job(cfg: DataPrepConfig) -> dict:
    """Run a data preparation job; returns the manifest. Raises ConfigError / JobFailed."""
    t_start = time.time()
    out = Path(cfg.out).expanduser()
    files = discover(cfg.input)
    units = plan_units(files, cfg.task_bytes)
    total_bytes = sum(f.size for f in files)
    log(f"{len(files)} input files ({total_bytes / 1e6:.1f} MB) in {len(units)} tasks -> {out}")
    prepare_out_dir(cfg, out)
    info = get_tokenizer(cfg, out, units, inputs_signature(files))
    spp = cfg.samples_per_shard or auto_samples_per_shard(total_bytes, cfg.seq_len, info.dtype)

    writers = {s: ShardWriter(out, s, spp, with_mask=cfg.packing == "pad") for s in mf.SPLITS}
    if cfg.packing == "wrap":
        packers = {s: WrapPacker(writers[s], cfg.seq_len, info.bos_id, info.eos_id, info.dtype) for s in mf.SPLITS}
    else:
        packers = {s: PadPacker(writers[s], cfg.seq_len, info.bos_id, info.eos_id, info.pad_id, info.dtype)
                   for s in mf.SPLITS}

    ray, started, workers = _connect_ray(cfg)
    bad = BadRecords(cfg.max_error_examples)
    seen: set[bytes] = set()
    stats = {"docs_in": 0, "chars": 0, "tokens_in": 0}
    t_work = time.time()
    try:
        remote = ray.remote(num_cpus=1)(tokenize_unit)
        tok_ref = ray.put(info.json)
        wcfg = worker_cfg(cfg)
        inflight: dict[int, object] = {}
        ready: dict[int, object] = {}
        next_submit = next_consume = 0
        max_ahead = 4 * workers
        last_log = time.time()
        while next_consume < len(units):
            while (len(inflight) < workers and next_submit < len(units)
                   and next_submit - next_consume < max_ahead):
                inflight[next_submit] = remote.remote(units[next_submit], wcfg, tok_ref, 1)
                next_submit += 1
            done, _ = ray.wait(list(inflight.values()), num_returns=1)
            for i in [i for i, r in inflight.items() if r in done]:
                ready[i] = inflight.pop(i)
            while next_consume in ready:
                res = ray.get(ready.pop(next_consume))
                _consume(res, cfg, packers, bad, seen, stats)
                next_consume += 1
            if next_consume and (time.time() - last_log >= cfg.progress_interval_s or next_consume == len(units)):
                last_log = time.time()
                el = time.time() - t_work
                log(f"tasks {next_consume}/{len(units)}  documents {stats['docs_in']}  "
                    f"tokens {_human(stats['tokens_in'])}  ({_human(stats['tokens_in'] / max(el, 1e-9))} tokens/s)")
    finally:
        if started:
            ray.shutdown()

    for s in mf.SPLITS:
        writers[s].close()
    good = sum(p.documents for p in packers.values())
    write_errors(out, bad)
    check_bad_fraction(cfg, bad.counts, good + bad.counts.get("duplicate", 0), "after processing")

    splits = {}
    for s in mf.SPLITS:
        w = writers[s]
        splits[s] = {"shards": w.shards, "documents": packers[s].documents, "samples": w.samples, "tokens": w.tokens}
        _remove_stale_shards(out / s, len(w.shards))
    manifest = {
        "format_version": mf.FORMAT_VERSION,
        "tokenizer": {"name": info.name, "vocab_size": info.vocab_size, "bos_id": info.bos_id,
                      "eos_id": info.eos_id, "pad_id": info.pad_id, "mask_id": info.mask_id,
                      "files": {"tokenizer.json": info.sha256()}},
        "model_vocab_size": info.model_vocab_size,
        "mask_token_id": info.mask_token_id,
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "dtype": info.dtype,
        "samples_per_shard": spp,
        "splits": splits,
        "dropped_tail_tokens": sum(p.dropped_tail for p in packers.values()),
        "truncated_tokens": sum(getattr(p, "truncated", 0) for p in packers.values()),
        "skipped": {r: bad.counts[r] for r in sorted(bad.counts)},
        "job": cfg.job_dict(),
    }
    mf.write_manifest(out, manifest)
    shutil.rmtree(out / "_work", ignore_errors=True)

    elapsed = time.time() - t_start
    kept = sum(w.kept_existing for w in writers.values())
    tokens = sum(splits[s]["tokens"] for s in mf.SPLITS)
    lines = [f"done in {elapsed:.1f}s with {workers} worker(s): {out}"]
    for s in mf.SPLITS:
        sp = splits[s]
        lines.append(f"  {s:5s}: {sp['documents']} documents, {sp['samples']} samples, {sp['tokens']} tokens, "
                     f"{len(sp['shards'])} shards")
    lines.append(f"  tokens/s: {_human(tokens / max(elapsed, 1e-9))} overall, "
                 f"{_human(stats['tokens_in'] / max(time.time() - t_work, 1e-9))} in the Ray stage")
    lines.append(f"  dropped tail tokens: {manifest['dropped_tail_tokens']}"
                 + (f", truncated tokens: {manifest['truncated_tokens']}" if cfg.packing == "pad" else ""))
    skipped = ", ".join(f"{r}={n}" for r, n in manifest["skipped"].items()) or "none"
    lines.append(f"  skipped: {skipped}" + (" (examples in errors.jsonl)" if bad.examples else ""))
    if kept:
        lines.append(f"  kept {kept} complete shard(s) from an earlier run")
    for line in lines:
        log(line)
    return manifest


def _consume(res: dict, cfg: DataPrepConfig, packers: dict, bad: BadRecords, seen: set, stats: dict) -> None:
    bad.merge(res["bad"])
    lengths = res["lengths"]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = res["tokens"]
    hashes = res["hashes"]
    per_split: dict[str, tuple[list, list]] = {s: ([], []) for s in mf.SPLITS}
    for j, doc_id in enumerate(res["doc_ids"]):
        if cfg.dedup:
            h = hashes[16 * j:16 * (j + 1)]
            if h in seen:
                bad.add("duplicate", doc_id, "same text as an earlier document")
                continue
            seen.add(h)
        s = "val" if res["split"][j] else "train"
        per_split[s][0].append(key_base(doc_id))
        per_split[s][1].append(tokens[offsets[j]:offsets[j + 1]])
        stats["docs_in"] += 1
        stats["tokens_in"] += int(lengths[j])
    stats["chars"] += res["chars"]
    for s, (keys, docs) in per_split.items():
        packers[s].add_docs(keys, docs)


def _remove_stale_shards(split_dir: Path, n_shards: int) -> None:
    """Remove shard files numbered beyond this job's (left by an earlier, different job)."""
    if not split_dir.is_dir():
        return
    for p in split_dir.iterdir():
        m = SHARD_PATTERN.match(p.name)
        if m and int(m.group(1)) >= n_shards:
            p.unlink()
        elif p.name.startswith(".shard-") and ".partial-" in p.name:
            p.unlink()
