"""The work of one group, done entirely by one Ray task: read -> clean -> (dedup) -> split ->
batch tokenize -> pack -> write the group's own shards -> a small done-record.

Each group packs its documents on its own (its wrap tails are dropped and counted), and writes
`<split>/shard-<group>-<n>.tar`, so the output depends only on the group plan (inputs + config),
never on the number of workers or on the order in which workers finish. The driver only plans,
collects the records returned here and writes the manifest.

Resume: after its shards, a group writes `_work/groups/<group>.json` (atomically). A rerun that
finds that record with the same fingerprint (group, job config, tokenizer, input file stats,
duplicates) and all its shard files at their recorded sizes returns it without redoing the work.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .sources import BadRecords, iter_unit_documents

ENCODE_BATCH = 256          # documents per encode_batch call
ENCODE_CHARS = 4_000_000    # ... or fewer when they are long
SPLITS = ("train", "val")


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_val(chash: bytes, salt: str, val_fraction: float) -> bool:
    """Stable per-document split decision from the content hash (never from position)."""
    if val_fraction <= 0.0:
        return False
    h = hashlib.blake2b(chash, digest_size=8, key=salt.encode("utf-8")[:64]).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64 < val_fraction


def encode_texts(tok, texts: list[str]) -> list[np.ndarray]:
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out: list[np.ndarray] = []
    for i in range(0, len(texts), ENCODE_BATCH):
        for enc in encode(texts[i:i + ENCODE_BATCH], add_special_tokens=False):
            out.append(np.asarray(enc.ids, dtype=np.int32))
    return out


def record_path(out: Path, group: int) -> Path:
    return Path(out) / "_work" / "groups" / f"{group:06d}.json"


def _load_done(out: Path, group: dict) -> dict | None:
    """The done-record of a group finished by an earlier run of the same job, if still valid."""
    path = record_path(out, group["index"])
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if rec.get("fingerprint") != group["fingerprint"]:
        return None
    for name, size in rec.get("bytes", {}).items():
        try:
            if os.path.getsize(Path(out) / name) != size:
                return None
        except OSError:
            return None
    return rec


def hash_group(group: dict, wcfg: dict) -> bytes:
    """Content hashes (16 bytes each) of a group's documents in order: the input of global dedup."""
    bad = BadRecords(max_examples=0)
    return b"".join(content_hash(text) for _, text in iter_unit_documents(group, wcfg, bad))


def process_group(group: dict, ctx: dict, tok) -> dict:
    """Do all the work of one group; returns its record (also written as the done-record)."""
    from .shards import PadPacker, ShardWriter, WrapPacker, key_base

    out = Path(ctx["out"])
    done = _load_done(out, group)
    if done is not None:
        done["reused"] = True
        return done
    gi = group["index"]
    bad = BadRecords(max_examples=ctx["max_error_examples"])
    writers = {s: ShardWriter(out, s, ctx["samples_per_shard"], with_mask=ctx["packing"] == "pad", group=gi)
               for s in SPLITS}
    if ctx["packing"] == "wrap":
        packers = {s: WrapPacker(writers[s], ctx["seq_len"], ctx["bos_id"], ctx["eos_id"], ctx["dtype"])
                   for s in SPLITS}
    else:
        packers = {s: PadPacker(writers[s], ctx["seq_len"], ctx["bos_id"], ctx["eos_id"], ctx["pad_id"],
                                ctx["dtype"]) for s in SPLITS}
    duplicates = set(group.get("duplicates", ()))
    stats = {"documents": 0, "tokens_in": 0, "chars": 0}
    batch_ids: list[str] = []
    batch_texts: list[str] = []
    batch_val: list[bool] = []
    batch_chars = 0

    def flush():
        arrays = encode_texts(tok, batch_texts)
        per = {s: ([], []) for s in SPLITS}
        for doc_id, val, arr in zip(batch_ids, batch_val, arrays):
            keys, docs = per["val" if val else "train"]
            keys.append(key_base(doc_id))
            docs.append(arr)
            stats["tokens_in"] += len(arr)
        for s, (keys, docs) in per.items():
            packers[s].add_docs(keys, docs)
        batch_ids.clear()
        batch_texts.clear()
        batch_val.clear()

    for j, (doc_id, text) in enumerate(iter_unit_documents(group, ctx, bad)):
        if j in duplicates:
            bad.add("duplicate", doc_id, "same text as an earlier document")
            continue
        stats["documents"] += 1
        stats["chars"] += len(text)
        batch_ids.append(doc_id)
        batch_texts.append(text)
        batch_val.append(is_val(content_hash(text), ctx["split_salt"], ctx["val_fraction"]))
        batch_chars += len(text)
        if len(batch_texts) >= ENCODE_BATCH or batch_chars >= ENCODE_CHARS:
            flush()
            batch_chars = 0
    if batch_texts:
        flush()
    for w in writers.values():
        w.close()
    rec = {
        "group": gi,
        "fingerprint": group["fingerprint"],
        "splits": {s: {"shards": writers[s].shards, "documents": packers[s].documents,
                       "samples": writers[s].samples, "tokens": writers[s].tokens} for s in SPLITS},
        "dropped_tail_tokens": sum(p.dropped_tail for p in packers.values()),
        "truncated_tokens": sum(getattr(p, "truncated", 0) for p in packers.values()),
        "bad": bad.to_dict(),
        "tokens_in": stats["tokens_in"],
        "chars": stats["chars"],
        "bytes": {name: size for w in writers.values() for name, size in w.sizes.items()},
    }
    from .manifest import atomic_write_text

    atomic_write_text(record_path(out, gi), json.dumps(rec))  # key order kept: the manifest copies it
    rec["kept_shards"] = sum(w.kept_existing for w in writers.values())
    return rec


_TOKENIZERS: dict[str, object] = {}


def worker_tokenizer(tok_sha: str, tok_ref):
    """The tokenizer, loaded once per worker process (Ray reuses its worker processes between
    tasks, so each process fetches and parses the tokenizer JSON the first time only)."""
    tok = _TOKENIZERS.get(tok_sha)
    if tok is None:
        # one tokenizer thread per worker: each worker holds one CPU of Ray's accounting. Read by
        # the tokenizers thread pool on its first use in the process.
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
        import ray

        from .tokenizer import make_encoder

        tok_json = tok_ref if isinstance(tok_ref, str) else ray.get(tok_ref)
        tok = _TOKENIZERS[tok_sha] = make_encoder(tok_json)
    return tok


def group_task(group: dict, ctx: dict, tok_sha: str, tok_box: list) -> dict:
    """Ray task: all the work of one group -> its record. `tok_box` holds the tokenizer's
    ObjectRef inside a list, so that Ray does not fetch it for every task (only on a cache miss)."""
    return process_group(group, ctx, worker_tokenizer(tok_sha, tok_box[0]))


def hash_task(group: dict, wcfg: dict) -> bytes:
    """Ray task of the dedup pass."""
    return hash_group(group, wcfg)
