"""Deterministic, resumable streaming of webdataset shards for each data-parallel rank.

An epoch is one pass over the split as a sequence: the shards in a seeded permutation, grouped
into windows of `shuffle_window` consecutive shards, each window's samples in one seeded
permutation (a block shuffle: a batch mixes the window's shards, not one shard's stretch of the
corpus; samples do not mix across windows). split_by="shard" gives rank r the r-th of W equal, contiguous
ranges of that sequence, so a rank reads about 1/W of the shards plus the windows its part
touches (a window whose samples are split between ranks is read by each of them); a looping stream drops the last (total mod W) < W samples of each epoch,
so every rank's epoch has the same length, epochs change at the same step on every rank and no
sample is seen twice within one. split_by="sample" gives rank r the positions p = r mod W of the
endless sequence of epochs: the global order is the same for every world size and nothing is
dropped, at W times the reading. A single pass (loop=False) covers every sample. The position
(epoch, segment cursor, sample cursor) is enough to resume exactly at the next unseen sample,
skipping finished windows without reading them.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
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


class ShardDataError(ValueError):
    """A shard that reads but disagrees with its manifest (sample count, length, token ids)."""


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


# what storage or a damaged shard raises while it is read: I/O, a cut or garbled tar, a bad .npy, a
# sample without its tokens, a checksum mismatch (ShardChecksumError is a ValueError)
SHARD_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, tarfile.TarError)


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


PLAN_VERSION = 2  # how an epoch is split between ranks; a saved position is only valid in its own


@dataclass(frozen=True)
class Segment:
    shards: tuple[int, ...]  # a window: indices into the split's shards, in the epoch's order
    window: int  # the window's index in the epoch
    start: int   # start:stop:step of the window's sample order for this epoch
    stop: int
    step: int


@dataclass
class StreamPosition:
    epoch: int = 0
    segment_cursor: int = 0      # index into this rank's segments for the epoch
    sample_cursor: int = 0     # samples of the current segment already yielded
    samples_seen: int = 0      # total over the run


class ShardStream:
    """An endless (or single-pass) stream of samples for one data-parallel rank."""

    read_tries = 3          # a shard read that fails (a network file system's hiccup) is retried
    read_retry_wait_s = 2.0

    def __init__(self, data_dir: str | Path, split: str, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, loop: bool = True, split_by: str = "shard",
                 check_sha256: bool = True, shuffle_window: int = 1):
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
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1 shard, got {shuffle_window}")
        # unshuffled, a window's order is its shards' in turn: the same sequence, read a shard at a time
        self.shuffle_window = shuffle_window if shuffle else 1
        self.counts = np.array([int(shard["samples"]) for shard in self.shards], dtype=np.int64)
        if loop and int(self.counts.sum()) < world_size:
            raise ValueError(f"split '{split}' of {self.data_dir} has {int(self.counts.sum())} samples, fewer than "
                             f"the {world_size} data-parallel ranks: prepare more data or train on fewer ranks")
        # a saved position counts samples of these shards: another list (data added, shards
        # rewritten) gives its cursors another meaning
        self.shards_digest = hashlib.sha256(json.dumps([[s["name"], int(s["samples"])] for s in self.shards])
                                            .encode()).hexdigest()[:16]
        self._plans: dict[int, list[Segment]] = {}
        self._epoch_windows: dict[int, int] = {}  # an epoch resumed under another window keeps it
        self._starts: tuple[int, list[int]] = (-1, [])
        self.position = StreamPosition()

    def _epoch_plan(self, epoch: int) -> list[Segment]:
        """This rank's part of the epoch: positions start:stop:step of each window's sample order."""
        if epoch in self._plans:
            return self._plans[epoch]
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        k = self._window(epoch)
        windows = [tuple(order[i:i + k].tolist()) for i in range(0, len(order), k)]
        bounds = np.concatenate([[0], np.cumsum([int(self.counts[list(w)].sum()) for w in windows])]).tolist()
        total, world, rank = bounds[-1], self.world_size, self.rank
        plan = []
        if self.split_by == "sample":
            phase = (rank - epoch * total) % world  # epoch-local positions q with (epoch * total + q) % W == rank
            for j, window in enumerate(windows):
                first = bounds[j] + (phase - bounds[j]) % world
                if first < bounds[j + 1]:
                    plan.append(Segment(window, j, first - bounds[j], bounds[j + 1] - bounds[j], world))
        else:
            if self.loop:
                lo, hi = rank * (total // world), (rank + 1) * (total // world)
            else:
                lo, hi = rank * total // world, (rank + 1) * total // world
            for j in range(int(np.searchsorted(bounds, lo, side="right")) - 1, len(windows)):
                if bounds[j] >= hi:
                    break
                start, stop = max(lo, bounds[j]) - bounds[j], min(hi, bounds[j + 1]) - bounds[j]
                if stop > start:
                    plan.append(Segment(windows[j], j, start, stop, 1))
        self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
        self._plans[epoch] = plan
        return plan

    def _window(self, epoch: int) -> int:
        return self._epoch_windows.get(epoch, self.shuffle_window)

    def epochs_done(self) -> float:
        """Epochs this rank has consumed, the current one as the fraction of its samples yielded."""
        pos = self.position
        if self._starts[0] != pos.epoch:  # samples before each segment of the epoch, and in all
            lengths = [len(range(s.start, s.stop, s.step)) for s in self._epoch_plan(pos.epoch)]
            self._starts = (pos.epoch, np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist())
        starts = self._starts[1]
        done = starts[min(pos.segment_cursor, len(starts) - 1)] + pos.sample_cursor
        return pos.epoch + (done / starts[-1] if starts[-1] else 0.0)

    def _sample_order(self, epoch: int, segment: Segment, count: int) -> np.ndarray:
        """The permutation of the window's samples (its shards' samples in turn, in file order)."""
        order = np.arange(count)
        if self.shuffle:
            # a one-shard window keeps the seeding of the loader before windows (its positions stay
            # valid); numpy's seeding ignores trailing zeros, hence the final 1 of the other key
            key = [self.seed, epoch, *segment.shards] if len(segment.shards) == 1 else \
                [self.seed, epoch, self._window(epoch), segment.window, 1]
            order = np.random.default_rng(key).permutation(order)
        return order

    def _upcoming(self, epoch: int, plan: list[Segment], cursor: int) -> tuple[int, ...]:
        """The shards this rank reads after plan[cursor] (the next epoch's first window when looping)."""
        if cursor + 1 < len(plan):
            return plan[cursor + 1].shards
        following = self._epoch_plan(epoch + 1) if self.loop else []
        return following[0].shards if following else ()

    def _read_shards(self, indices: list[int]) -> dict[int, list[dict]]:
        return {i: self._read(self.shards[i]) for i in indices}

    def __iter__(self):
        # the next window's shards are read and decoded in a background thread while this one is
        # consumed: the training loop never waits on storage at a window boundary (the order is
        # unchanged); a shard already held (windows of two segments overlap) is not read again
        pending: ShardRead | None = None
        held: dict[int, list[dict]] = {}
        pos = self.position
        while True:
            plan = self._epoch_plan(pos.epoch)
            while pos.segment_cursor < len(plan):
                segment = plan[pos.segment_cursor]
                if pos.sample_cursor >= len(range(segment.start, segment.stop, segment.step)):
                    pos.segment_cursor += 1  # a position saved at a segment's end: its window is done
                    pos.sample_cursor = 0
                    continue
                if pending is not None:
                    held.update(pending.result())
                    pending = None
                missing = [i for i in segment.shards if i not in held]
                held = {i: held[i] for i in segment.shards if i in held} | self._read_shards(missing)
                samples = [sample for i in segment.shards for sample in held[i]]
                upcoming = [i for i in self._upcoming(pos.epoch, plan, pos.segment_cursor) if i not in held]
                if upcoming:
                    pending = ShardRead(self._read_shards, upcoming)
                yield from self._segment_samples(pos, segment, samples)
                pos.segment_cursor += 1
                pos.sample_cursor = 0
            if not self.loop:
                return
            pos.epoch += 1
            pos.segment_cursor = 0

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
            except SHARD_READ_ERRORS as err:  # anything else is a bug here, not damage: raised as itself
                reason = f"{type(err).__name__}: {err}"
                if attempt == self.read_tries:
                    raise OSError(f"{url} could not be read ({reason}), {self.read_tries} tries; if the storage "
                                  f"is reachable the shard is damaged: {verify}") from err
                log.warning("reading %s failed (%s); retrying", url, reason)
                time.sleep(self.read_retry_wait_s * attempt)
        if len(samples) != shard["samples"]:
            raise ShardDataError(f"{shard['name']}: {len(samples)} samples but the manifest says "
                             f"{shard['samples']}; {verify}")
        seq_len, vocab = int(self.manifest["seq_len"]), int(self.manifest["tokenizer"]["vocab_size"])
        for sample in samples:
            tokens = sample["tokens"]
            if tokens.shape != (seq_len,) or (tokens.size and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab):
                ids = f"ids {int(tokens.min())}..{int(tokens.max())}" if tokens.size else "no ids"
                raise ShardDataError(f"{shard['name']}: sample {sample['key']} has shape {tokens.shape} and token "
                                 f"{ids}, but the manifest says {seq_len} tokens with ids in 0..{vocab - 1}; {verify}")
        return samples

    def _segment_samples(self, pos: StreamPosition, segment: Segment, samples: list[dict]):
        order = self._sample_order(pos.epoch, segment, len(samples))[segment.start:segment.stop:segment.step]
        while pos.sample_cursor < len(order):
            sample = samples[order[pos.sample_cursor]]
            pos.sample_cursor += 1
            pos.samples_seen += 1
            yield sample

    def state_dict(self) -> dict:
        return {**asdict(self.position), "world_size": self.world_size, "rank": self.rank, "seed": self.seed,
                "shuffle": self.shuffle, "split_by": self.split_by,
                "shuffle_window": self._window(self.position.epoch), "shards": self.shards_digest,
                "plan": PLAN_VERSION}

    def load_state_dict(self, state: dict) -> None:
        mine = {"world_size": self.world_size, "seed": self.seed, "shuffle": self.shuffle, "split_by": self.split_by,
                "shards": self.shards_digest}
        if state.get("plan") != PLAN_VERSION:  # its cursors count the segments of another plan
            reason = f"by an earlier data loader (plan {state.get('plan', 1)}, now {PLAN_VERSION})"
        else:
            differ = [k for k, v in mine.items() if k != "shards" and state.get(k) != v]
            reasons = [f"with {' '.join(f'{k}={state.get(k)}' for k in differ)}, resuming with "
                       f"{' '.join(f'{k}={mine[k]}' for k in differ)}"] if differ else []
            if state.get("shards") != self.shards_digest:
                reasons.append("for other shards (the split's shard list or sample counts have changed)")
            reason = "; ".join(reasons)
        if reason:
            warnings.warn(f"data position was saved {reason}: restarting epoch {state.get('epoch', 0)} from its start")
            self.position = StreamPosition(epoch=state.get("epoch", 0), samples_seen=state.get("samples_seen", 0))
            return
        self.position = StreamPosition(**{k: state[k] for k in asdict(StreamPosition())})
        # another shuffle_window (or none saved: one shard at a time) takes effect at the next
        # epoch: the current one is finished as it was planned, nothing repeated or skipped
        saved_window = int(state.get("shuffle_window", 1))
        self._plans, self._epoch_windows = {}, {}
        if saved_window != self.shuffle_window:
            self._epoch_windows[self.position.epoch] = saved_window
            log.info("data position saved with shuffle_window=%d: epoch %d finishes with it, the next ones use %d",
                     saved_window, self.position.epoch, self.shuffle_window)


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
