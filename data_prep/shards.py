"""Webdataset tar shard writing (atomic, deterministic bytes) and the packers that feed it.

Sample keys are `<doc id, made safe>-<8 hex of sha1(doc id)>-<chunk index>`: the safe part keeps
keys readable, the hash keeps them unique when two doc ids differ only in unsafe characters, the
chunk index counts the samples that start inside that document.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np

from . import manifest as mf

# shard-<group>-<n>.tar (this layout); plain shard-<n>.tar is still recognised as a shard file
SHARD_PATTERN = re.compile(r"^shard-(\d{6,})(?:-(\d{4,}))?\.tar$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
FIXED_MTIME = 0  # tar member times are fixed so that shards are byte-identical across runs


def shard_name(split: str, group: int, index: int) -> str:
    """Shard `index` of work group `group`: deterministic, and unique without coordination."""
    return f"{split}/shard-{group:06d}-{index:04d}.tar"


def key_base(doc_id: str) -> str:
    safe = _UNSAFE.sub("_", doc_id).strip("_")[-60:] or "doc"
    return f"{safe}-{hashlib.sha1(doc_id.encode('utf-8')).hexdigest()[:8]}"


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npy_header(dtype, length: int) -> bytes:
    """The .npy header of a 1-D array (fixed for a dtype and length, so computed once)."""
    arr = np.zeros(length, dtype=dtype)
    return npy_bytes(arr)[: -arr.nbytes or None]


def file_sha256(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(bufsize)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def tar_member(name: str, payload: bytes) -> bytes:
    """One ustar member (header + data + padding) with fixed metadata, as webdataset writes them."""
    ti = tarfile.TarInfo(name)
    ti.size = len(payload)
    ti.mtime = FIXED_MTIME
    ti.mode = 0o444
    ti.uname = ti.gname = "bigdata"
    pad = (-len(payload)) % tarfile.BLOCKSIZE
    return ti.tobuf(format=tarfile.USTAR_FORMAT) + payload + b"\0" * pad


def tar_end(written: int) -> bytes:
    """End-of-archive blocks, padded to a whole tar record like tarfile does."""
    end = written + 2 * tarfile.BLOCKSIZE
    return b"\0" * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE)


class ShardWriter:
    """Collects samples of one split of one work group and writes its numbered shards of
    `samples_per_shard` samples (the last one of the group may be smaller).

    Shards are plain (ustar) tar files in the webdataset layout: members `<key>.tokens.npy`
    (and `<key>.mask.npy`), grouped per sample. A shard is written to a hidden temporary name and
    renamed when complete. When a complete shard with exactly the same bytes already exists (a
    resumed job), it is kept untouched.
    """

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int, with_mask: bool, group: int = 0):
        self.out_dir = Path(out_dir)
        self.split = split
        self.group = group
        self.samples_per_shard = samples_per_shard
        self.with_mask = with_mask
        self.pending_keys: list[str] = []
        self.pending: list[np.ndarray] = []   # 2-D blocks of samples
        self.pending_masks: list[np.ndarray] = []
        self.n_pending = 0
        self.shards: list[dict] = []
        self.samples = 0
        self.tokens = 0
        self.kept_existing = 0
        self.sizes: dict[str, int] = {}  # shard name -> bytes
        (self.out_dir / split).mkdir(parents=True, exist_ok=True)

    def add_many(self, keys: list[str], samples: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Add a block of samples (n, seq_len), with masks (n, seq_len) in pad mode."""
        start = 0
        while start < len(keys):
            take = min(len(keys) - start, self.samples_per_shard - self.n_pending)
            self.pending_keys.extend(keys[start:start + take])
            self.pending.append(samples[start:start + take])
            if masks is not None:
                self.pending_masks.append(masks[start:start + take])
            self.n_pending += take
            start += take
            if self.n_pending >= self.samples_per_shard:
                self._flush()

    def close(self) -> list[dict]:
        if self.n_pending:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        index = len(self.shards)
        name = shard_name(self.split, self.group, index)
        final = self.out_dir / name
        tmp = mf.partial_path(final)
        samples = np.concatenate(self.pending)
        masks = np.concatenate(self.pending_masks) if self.with_mask else None
        tok_head = npy_header(samples.dtype, samples.shape[1])
        mask_head = npy_header(np.uint8, samples.shape[1]) if self.with_mask else b""
        h = hashlib.sha256()
        written = 0
        with open(tmp, "wb") as fh:
            buf: list[bytes] = []
            for i, key in enumerate(self.pending_keys):
                if self.with_mask:
                    buf.append(tar_member(f"{key}.mask.npy", mask_head + masks[i].tobytes()))
                buf.append(tar_member(f"{key}.tokens.npy", tok_head + samples[i].tobytes()))
                if len(buf) >= 1024 or i == len(self.pending_keys) - 1:
                    data = b"".join(buf)
                    buf = []
                    h.update(data)
                    fh.write(data)
                    written += len(data)
            data = tar_end(written)
            h.update(data)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        digest = h.hexdigest()
        if final.is_file() and file_sha256(final) == digest:
            tmp.unlink()
            self.kept_existing += 1
        else:
            os.replace(tmp, final)
        n = len(self.pending_keys)
        n_tokens = int(masks.sum()) if self.with_mask else int(samples.size)
        self.shards.append({"name": name, "samples": n, "tokens": n_tokens, "sha256": digest})
        self.sizes[name] = written + len(data)
        self.samples += n
        self.tokens += n_tokens
        self.pending_keys, self.pending, self.pending_masks, self.n_pending = [], [], [], 0


class WrapPacker:
    """Wrap packing of one split: docs + EOS concatenated, cut into (seq_len - 2)-token chunks,
    each stored as BOS + chunk + EOS. Deterministic over the document order only."""

    def __init__(self, writer: ShardWriter, seq_len: int, bos: int, eos: int, dtype: str):
        self.writer = writer
        self.chunk = seq_len - 2
        self.bos, self.eos = bos, eos
        self.dtype = np.dtype(dtype)
        self.carry = np.zeros(0, dtype=np.int64)
        self.carry_start = 0          # stream position of carry[0]
        self.doc_starts: list[int] = []  # stream positions of documents still in the carry
        self.doc_keys: list[str] = []
        self.last_doc = -1            # index (into the lists) of the doc of the previous chunk
        self.last_count = 0
        self.pos = 0                  # stream length so far
        self.documents = 0

    def add_docs(self, keys: list[str], docs: list[np.ndarray]) -> None:
        if not docs:
            return
        parts = [self.carry]
        for key, toks in zip(keys, docs):
            self.doc_starts.append(self.pos)
            self.doc_keys.append(key)
            parts.append(toks.astype(np.int64, copy=False))
            parts.append(np.array([self.eos], dtype=np.int64))
            self.pos += len(toks) + 1
            self.documents += 1
        stream = np.concatenate(parts)
        n_chunks = len(stream) // self.chunk
        if n_chunks:
            starts = self.carry_start + np.arange(n_chunks, dtype=np.int64) * self.chunk
            doc_of = np.searchsorted(np.asarray(self.doc_starts, dtype=np.int64), starts, side="right") - 1
            keys = []
            for d in doc_of.tolist():
                if d == self.last_doc:
                    self.last_count += 1
                else:
                    self.last_doc, self.last_count = d, 0
                keys.append(f"{self.doc_keys[d]}-{self.last_count}")
            samples = np.empty((n_chunks, self.chunk + 2), dtype=self.dtype)
            samples[:, 0] = self.bos
            samples[:, 1:-1] = stream[:n_chunks * self.chunk].reshape(n_chunks, self.chunk)
            samples[:, -1] = self.eos
            self.writer.add_many(keys, samples)
        used = n_chunks * self.chunk
        self.carry = stream[used:].copy()
        self.carry_start += used
        # forget documents that end before the carry (keep the one the carry starts in)
        first = max(bisect.bisect_right(self.doc_starts, self.carry_start) - 1, 0)
        if first > 0:
            del self.doc_starts[:first]
            del self.doc_keys[:first]
            self.last_doc -= first

    @property
    def dropped_tail(self) -> int:
        return int(len(self.carry))


class PadPacker:
    """Pad packing: one document per sample, BOS + tokens + EOS truncated / padded to seq_len."""

    def __init__(self, writer: ShardWriter, seq_len: int, bos: int, eos: int, pad: int, dtype: str):
        self.writer = writer
        self.seq_len = seq_len
        self.bos, self.eos, self.pad = bos, eos, pad
        self.dtype = np.dtype(dtype)
        self.truncated = 0
        self.documents = 0

    def add_docs(self, keys: list[str], docs: list[np.ndarray]) -> None:
        room = self.seq_len - 2
        if not docs:
            return
        samples = np.full((len(docs), self.seq_len), self.pad, dtype=self.dtype)
        masks = np.zeros((len(docs), self.seq_len), dtype=np.uint8)
        for i, toks in enumerate(docs):
            self.documents += 1
            if len(toks) > room:
                self.truncated += len(toks) - room
                toks = toks[:room]
            n = len(toks) + 2
            samples[i, 0] = self.bos
            samples[i, 1:n - 1] = toks
            samples[i, n - 1] = self.eos
            masks[i, :n] = 1
        self.writer.add_many([f"{k}-0" for k in keys], samples, masks)

    @property
    def dropped_tail(self) -> int:
        return 0
