"""Deterministic, resumable streaming of webdataset shards for each data-parallel rank.

Per epoch the shard order is a seeded permutation; rank r reads shards r, r+W, ... (or, with
fewer shards than ranks or split_by="sample", every W-th sample of every shard: the global
order is then the same for every world size, at W times the reading). Inside a shard the samples are
visited in a seeded permutation. The position (epoch, shard cursor, sample cursor) is therefore
enough to resume exactly at the next unseen sample, skipping finished shards without reading them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

log = logging.getLogger(__name__)


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: point data.path at a `python -m data_prep` output")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != 1:
        raise ValueError(f"{path}: unsupported format_version {manifest.get('format_version')!r}")
    return manifest


def _no_split(src):
    yield from src


class ShardChecksumError(ValueError):
    pass


class _HashingReader(io.RawIOBase):
    """A file read through once, sha256 updated with every byte that passes."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        if n:
            self.sha256.update(memoryview(buffer)[:n])
        return n


def read_shard(url: str, sha256: str | None = None) -> list[dict]:
    """All samples of one shard, in file order, as numpy arrays. With `sha256` (the manifest's),
    the bytes are hashed as they are parsed and checked before any sample is returned: damage
    that keeps the tar and the token ids valid (a bit flipped in a copy) would otherwise train
    unnoticed."""
    if sha256 is None:
        return _samples(wds.WebDataset(url, shardshuffle=False, nodesplitter=_no_split, workersplitter=_no_split,
                                       empty_check=False))
    with open(url, "rb") as f:
        reader = _HashingReader(f)
        samples = _samples(wds.tariterators.group_by_keys(
            wds.tariterators.tar_file_expander([{"stream": io.BufferedReader(reader, 1 << 20), "url": url}])))
        while reader.read(1 << 20):  # the tar's end padding
            pass
    digest = reader.sha256.hexdigest()
    if digest != sha256:
        raise ShardChecksumError(f"sha256 of {url} is {digest}, the manifest says {sha256}")
    return samples


def _samples(ds) -> list[dict]:
    out = []
    for sample in ds:
        item = {"key": sample["__key__"], "tokens": np.load(io.BytesIO(sample["tokens.npy"]))}
        if "mask.npy" in sample:
            item["mask"] = np.load(io.BytesIO(sample["mask.npy"]))
        out.append(item)
    return out


class ShardRead:
    """read(*args) in a daemon thread: a process that is done (a finished run, a checkpoint
    after SIGTERM, an evaluation that stops early) exits without waiting for it."""

    def __init__(self, read, *args):
        self._samples: list[dict] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, args=(read, *args), name="shard-prefetch", daemon=True)
        self._thread.start()

    def _read(self, read, *args) -> None:
        try:
            self._samples = read(*args)
        except BaseException as err:  # raised where the samples are needed, in the training thread
            self._error = err

    def result(self) -> list[dict]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._samples


@dataclass
class StreamPosition:
    epoch: int = 0
    shard_cursor: int = 0      # index into this rank's shard list for the epoch
    sample_cursor: int = 0     # samples of the current shard already yielded
    samples_seen: int = 0      # total over the run


class ShardStream:
    """An endless (or single-pass) stream of samples for one data-parallel rank."""

    read_tries = 3          # a shard read that fails (a network file system's hiccup) is retried
    read_retry_wait_s = 2.0

    def __init__(self, data_dir: str | Path, split: str, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, loop: bool = True, split_by: str = "shard",
                 check_sha256: bool = True):
        self.data_dir = Path(data_dir)
        self.check_sha256 = check_sha256
        self.manifest = load_manifest(self.data_dir)
        if split not in self.manifest["splits"]:
            raise ValueError(f"split '{split}' not in {self.data_dir}/manifest.json "
                             f"(has {', '.join(self.manifest['splits'])})")
        self.shards = self.manifest["splits"][split]["shards"]
        if not self.shards:
            raise ValueError(f"split '{split}' of {self.data_dir} has no shards")
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.loop = seed, shuffle, loop
        if split_by not in ("shard", "sample"):
            raise ValueError(f"split_by must be 'shard' or 'sample', got {split_by!r}")
        self.split_by = split_by
        self.position = StreamPosition()

    def _epoch_plan(self, epoch: int) -> tuple[list[int], bool]:
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        if self.split_by == "shard" and len(order) >= self.world_size:
            return [int(i) for i in order[self.rank::self.world_size]], False
        return [int(i) for i in order], True

    def _sample_order(self, epoch: int, shard_index: int, count: int, interleaved: bool) -> np.ndarray:
        order = np.arange(count)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, shard_index]).permutation(order)
        if interleaved:
            order = order[self.rank::self.world_size]
        return order

    def _upcoming(self, epoch: int, plan: list[int], cursor: int) -> int | None:
        """The shard this rank reads after plan[cursor] (the next epoch's first when looping)."""
        if cursor + 1 < len(plan):
            return plan[cursor + 1]
        if self.loop:
            return self._epoch_plan(epoch + 1)[0][0]
        return None

    def __iter__(self):
        # the next shard is read and decoded in a background thread while this one is consumed:
        # the training loop never waits on storage at a shard boundary (the order is unchanged)
        pending: tuple[int, ShardRead] | None = None
        pos = self.position
        while True:
            plan, interleaved = self._epoch_plan(pos.epoch)
            while pos.shard_cursor < len(plan):
                shard_index = plan[pos.shard_cursor]
                shard = self.shards[shard_index]
                if pending is not None and pending[0] == shard_index:
                    samples = pending[1].result()
                else:
                    samples = self._read(shard)
                upcoming = self._upcoming(pos.epoch, plan, pos.shard_cursor)
                pending = None
                if upcoming is not None and upcoming != shard_index:
                    pending = (upcoming, ShardRead(self._read, self.shards[upcoming]))
                yield from self._shard_samples(pos, shard, shard_index, samples, interleaved)
                pos.shard_cursor += 1
                pos.sample_cursor = 0
            if not self.loop:
                return
            pos.epoch += 1
            pos.shard_cursor = 0

    def _read(self, shard: dict) -> list[dict]:
        """The shard's samples, read with retries, checked against the manifest: count, length,
        token ids inside the tokenizer's vocabulary (a bad id would otherwise surface as an
        opaque device-side assert in the embedding)."""
        url = str(self.data_dir / shard["name"])
        verify = f"run `python -m data_prep verify {self.data_dir}`"
        for attempt in range(1, self.read_tries + 1):
            try:
                samples = read_shard(url, shard.get("sha256") if self.check_sha256 else None)
                break
            except Exception as err:
                reason = f"{type(err).__name__}: {err}"
                if attempt == self.read_tries:
                    raise OSError(f"{url} could not be read ({reason}), {self.read_tries} tries; if the storage "
                                  f"is reachable the shard is damaged: {verify}") from err
                log.warning("reading %s failed (%s); retrying", url, reason)
                time.sleep(self.read_retry_wait_s * attempt)
        if len(samples) != shard["samples"]:
            raise ValueError(f"{shard['name']}: {len(samples)} samples but the manifest says "
                             f"{shard['samples']}; {verify}")
        seq_len, vocab = int(self.manifest["seq_len"]), int(self.manifest["tokenizer"]["vocab_size"])
        for sample in samples:
            tokens = sample["tokens"]
            if tokens.shape != (seq_len,) or (tokens.size and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab):
                ids = f"ids {int(tokens.min())}..{int(tokens.max())}" if tokens.size else "no ids"
                raise ValueError(f"{shard['name']}: sample {sample['key']} has shape {tokens.shape} and token "
                                 f"{ids}, but the manifest says {seq_len} tokens with ids in 0..{vocab - 1}; {verify}")
        return samples

    def _shard_samples(self, pos: StreamPosition, shard: dict, shard_index: int, samples: list[dict],
                       interleaved: bool):
        order = self._sample_order(pos.epoch, shard_index, len(samples), interleaved)
        while pos.sample_cursor < len(order):
            sample = samples[order[pos.sample_cursor]]
            pos.sample_cursor += 1
            pos.samples_seen += 1
            yield sample

    def state_dict(self) -> dict:
        return {**asdict(self.position), "world_size": self.world_size, "rank": self.rank, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size") != self.world_size or state.get("seed") != self.seed:
            warnings.warn(f"data position was saved with world_size={state.get('world_size')} "
                          f"seed={state.get('seed')}, resuming with world_size={self.world_size} "
                          f"seed={self.seed}: restarting epoch {state.get('epoch', 0)} from its start")
            self.position = StreamPosition(epoch=state.get("epoch", 0),
                                           samples_seen=state.get("samples_seen", 0))
            return
        self.position = StreamPosition(**{k: state[k] for k in asdict(StreamPosition())})


def batches(stream, batch_size: int, drop_last: bool = True):
    """Group samples into (tokens LongTensor (B, L), valid mask FloatTensor or None, keys)."""
    buf = []
    for sample in stream:
        buf.append(sample)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf and not drop_last:
        yield collate(buf)


def collate(samples: list[dict]):
    tokens = torch.from_numpy(np.stack([s["tokens"].astype(np.int64) for s in samples]))
    valid = None
    if "mask" in samples[0]:
        valid = torch.from_numpy(np.stack([s["mask"].astype(np.float32) for s in samples]))
    return tokens, valid, [s["key"] for s in samples]
