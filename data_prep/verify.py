"""`python -m data_prep verify DIR`: check every shard against the manifest.

Checks: tokenizer file hash; per shard: presence, sha256, readable tar, member names, sample and
token counts; per sample: tokens.npy dtype / shape (seq_len), ids < vocab_size, BOS/EOS framing
(wrap), mask.npy form and padding (pad); keys unique across the dataset; no stray shard files.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from . import manifest as mf
from .shards import SHARD_PATTERN, file_sha256

MAX_PER_SHARD = 5  # problems listed per shard before summarising


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def verify_dir(out_dir: str | Path) -> tuple[list[str], dict]:
    """Return (problems, totals). An empty problem list means the dataset is intact."""
    out = Path(out_dir)
    problems: list[str] = []
    totals = {"shards": 0, "samples": 0, "tokens": 0}
    try:
        man = mf.load_manifest(out)
    except mf.ManifestError as err:
        return [str(err)], totals
    tok = man["tokenizer"]
    for fname, digest in tok.get("files", {}).items():
        p = out / "tokenizer" / fname
        if not p.is_file():
            problems.append(f"tokenizer/{fname}: missing")
        elif file_sha256(p) != digest:
            problems.append(f"tokenizer/{fname}: sha256 mismatch (manifest {digest[:12]}..., file "
                            f"{file_sha256(p)[:12]}...)")
    seq_len, dtype, packing = man["seq_len"], np.dtype(man["dtype"]), man["packing"]
    vocab = tok["vocab_size"]
    bos, eos, pad = tok["bos_id"], tok["eos_id"], tok["pad_id"]
    keys: dict[str, str] = {}
    for split, sp in man["splits"].items():
        listed = set()
        split_samples = split_tokens = 0
        for sh in sp["shards"]:
            name = sh["name"]
            listed.add(Path(name).name)
            path = out / name
            totals["shards"] += 1
            if not path.is_file():
                problems.append(f"{name}: missing")
                continue
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != sh["sha256"]:
                problems.append(f"{name}: sha256 mismatch (manifest {sh['sha256'][:12]}..., file {digest[:12]}..., "
                                f"{len(data)} bytes)")
            errs, n_samples, n_tokens = _check_shard(name, data, seq_len, dtype, packing, vocab, bos, eos, pad, keys)
            problems.extend(errs)
            if n_samples != sh["samples"]:
                problems.append(f"{name}: {n_samples} samples read, manifest says {sh['samples']}")
            if n_tokens != sh["tokens"]:
                problems.append(f"{name}: {n_tokens} tokens read, manifest says {sh['tokens']}")
            split_samples += n_samples
            split_tokens += n_tokens
        if sum(s["samples"] for s in sp["shards"]) != sp["samples"]:
            problems.append(f"{split}: shard sample counts do not add up to the split's {sp['samples']}")
        if sum(s["tokens"] for s in sp["shards"]) != sp["tokens"]:
            problems.append(f"{split}: shard token counts do not add up to the split's {sp['tokens']}")
        totals["samples"] += split_samples
        totals["tokens"] += split_tokens
        split_dir = out / split
        if split_dir.is_dir():
            for p in sorted(split_dir.iterdir()):
                if SHARD_PATTERN.match(p.name) and p.name not in listed:
                    problems.append(f"{split}/{p.name}: shard file not listed in the manifest")
    return problems, totals


def _check_shard(name, data, seq_len, dtype, packing, vocab, bos, eos, pad, keys):
    errs: list[str] = []
    n_samples = n_tokens = 0
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base:
                    errs.append(f"{name}: member '{member.name}' has no extension")
                    continue
                key, ext = base.split(".", 1)
                fh = tf.extractfile(member)
                payload = fh.read() if fh else b""
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                samples[key][ext] = payload
    except (tarfile.TarError, EOFError, OSError) as err:
        errs.append(f"{name}: unreadable tar after {len(order)} samples ({type(err).__name__}: {err}); "
                    "truncated or corrupted")
    expected = {"tokens.npy", "mask.npy"} if packing == "pad" else {"tokens.npy"}
    bad_samples = 0
    for key in order:
        members = samples[key]
        n_samples += 1
        where = f"{name}: sample '{key}'"
        sample_errs: list[str] = []
        if key in keys:
            sample_errs.append(f"{where}: key also used in {keys[key]}")
        keys[key] = name
        if set(members) != expected:
            sample_errs.append(f"{where}: members {sorted(members)}, expected {sorted(expected)}")
        tokens = mask = None
        try:
            if "tokens.npy" in members:
                tokens = _load_npy(members["tokens.npy"])
            if "mask.npy" in members:
                mask = _load_npy(members["mask.npy"])
        except (ValueError, OSError, EOFError) as err:
            sample_errs.append(f"{where}: unreadable .npy ({err})")
        if tokens is not None:
            if tokens.dtype != dtype or tokens.shape != (seq_len,):
                sample_errs.append(f"{where}: tokens {tokens.dtype}{list(tokens.shape)}, expected {dtype}[{seq_len}]")
            elif tokens.size and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab:
                sample_errs.append(f"{where}: token ids {int(tokens.min())}..{int(tokens.max())} outside "
                                   f"0..{vocab - 1} (vocab_size {vocab})")
            elif packing == "wrap":
                if int(tokens[0]) != bos or int(tokens[-1]) != eos:
                    sample_errs.append(f"{where}: does not start with BOS {bos} and end with EOS {eos}")
                n_tokens += seq_len
        if packing == "pad" and mask is not None and tokens is not None and not sample_errs:
            n_real = int(mask.sum())
            if mask.dtype != np.uint8 or mask.shape != (seq_len,):
                sample_errs.append(f"{where}: mask {mask.dtype}{list(mask.shape)}, expected uint8[{seq_len}]")
            elif n_real < 2 or not (mask[:n_real] == 1).all() or mask[n_real:].any():
                sample_errs.append(f"{where}: mask is not 1...1 0...0 with at least BOS and EOS")
            elif int(tokens[0]) != bos or int(tokens[n_real - 1]) != eos or (tokens[n_real:] != pad).any():
                sample_errs.append(f"{where}: not BOS ... EOS followed by PAD {pad}")
            n_tokens += n_real
        if sample_errs:
            bad_samples += 1
            if bad_samples <= MAX_PER_SHARD:
                errs.extend(sample_errs)
    if bad_samples > MAX_PER_SHARD:
        errs.append(f"{name}: {bad_samples - MAX_PER_SHARD} more bad samples not listed")
    return errs, n_samples, n_tokens


def main(out_dir: str) -> int:
    problems, totals = verify_dir(out_dir)
    if problems:
        print(f"verify {out_dir}: FAILED with {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"verify {out_dir}: OK ({totals['shards']} shards, {totals['samples']} samples, "
          f"{totals['tokens']} tokens match the manifest)")
    return 0
