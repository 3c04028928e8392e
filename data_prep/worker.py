"""The per-unit work done in Ray tasks: read -> clean -> split decision -> batch tokenize.

Returns compact numpy arrays (one flat token array + per-document lengths) so that results move
through the object store as a few buffers, not millions of small objects.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from .sources import BadRecords, iter_unit_documents

_TOKENIZERS: dict[str, object] = {}
ENCODE_BATCH = 256


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_val(chash: bytes, salt: str, val_fraction: float) -> bool:
    """Stable per-document split decision from the content hash (never from position)."""
    if val_fraction <= 0.0:
        return False
    h = hashlib.blake2b(chash, digest_size=8, key=salt.encode("utf-8")[:64]).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64 < val_fraction


def _encoder(tok_json: str):
    key = hashlib.sha256(tok_json.encode("utf-8")).hexdigest()
    tok = _TOKENIZERS.get(key)
    if tok is None:
        from .tokenizer import make_encoder

        tok = _TOKENIZERS[key] = make_encoder(tok_json)
    return tok


def encode_texts(tok, texts: list[str]) -> list[np.ndarray]:
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    out: list[np.ndarray] = []
    for i in range(0, len(texts), ENCODE_BATCH):
        for enc in encode(texts[i:i + ENCODE_BATCH], add_special_tokens=False):
            out.append(np.asarray(enc.ids, dtype=np.int32))
    return out


def tokenize_unit(unit: dict, cfg: dict, tok_json: str, threads: int | None = None) -> dict:
    if threads:
        # the tokenizers thread pool reads this on first use in the process
        os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    bad = BadRecords(max_examples=cfg["max_error_examples"])
    doc_ids: list[str] = []
    texts: list[str] = []
    chars = 0
    for doc_id, text in iter_unit_documents(unit, cfg, bad):
        doc_ids.append(doc_id)
        texts.append(text)
        chars += len(text)
    hashes = [content_hash(t) for t in texts]
    split = np.array([is_val(h, cfg["split_salt"], cfg["val_fraction"]) for h in hashes], dtype=np.uint8)
    arrays = encode_texts(_encoder(tok_json), texts) if texts else []
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
    if tokens.size and int(tokens.max()) <= np.iinfo(np.uint16).max:
        tokens = tokens.astype(np.uint16)  # half the bytes through the object store
    return {
        "index": unit["index"],
        "doc_ids": doc_ids,
        "hashes": b"".join(hashes),
        "split": split,
        "lengths": lengths,
        "tokens": tokens,
        "chars": chars,
        "bad": bad.to_dict(),
    }
