from __future__ import annotations

import itertools
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pipeline.data import ShardStream, batches

from tests.synthetic import write_markov_shards

from .conftest import ROOT


def keys(stream, n):
    return [s["key"] for s in itertools.islice(stream, n)]


def test_ranks_partition_each_epoch_exactly(markov_data):
    epoch = 512
    seen = []
    for rank in range(2):
        stream = ShardStream(markov_data, "train", rank, 2, seed=3)
        seen += keys(iter(stream), epoch // 2)
    assert len(seen) == len(set(seen)) == epoch


@pytest.mark.parametrize("split_by", ["shard", "sample"])
def test_fewer_shards_than_ranks_still_give_each_sample_to_one_rank(markov_data, split_by):
    seen = []
    for rank in range(3):  # val has a single shard of 64 samples
        seen += [s["key"] for s in ShardStream(markov_data, "val", rank, 3, shuffle=False, loop=False,
                                               split_by=split_by)]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 64


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory) -> Path:
    """301 training samples in shards of 64, 64, 64, 64 and 45: no world size divides them."""
    out = tmp_path_factory.mktemp("uneven")
    write_markov_shards(out, vocab=16, seq_len=32, train_samples=301, val_samples=67, samples_per_shard=64)
    return out


def rank_streams(data, world, split_by, epochs, seed=4, window=1):
    """Each rank's keys and epoch numbers for `epochs` epochs of the looping training stream."""
    out = []
    for rank in range(world):
        stream = ShardStream(data, "train", rank, world, seed=seed, split_by=split_by, shuffle_window=window)
        it, seen = iter(stream), []
        for _ in range(epochs * (301 // world)):
            seen.append((next(it)["key"], stream.position.epoch))
        out.append(seen)
    return out


@pytest.mark.parametrize("world,window", [(2, 1), (3, 1), (4, 1), (6, 1), (3, 2), (4, 3)])
def test_uneven_shards_give_every_rank_equal_epochs_without_a_repeat(uneven_data, world, window):
    """Shards that no world size divides (and more ranks than shards): every rank's epoch is
    301 // W samples, the r-th contiguous part of the one-rank epoch, all ranks change epoch at the
    same sample, no sample repeats within an epoch, and the 301 mod W left out change each epoch."""
    (single,) = rank_streams(uneven_data, 1, "shard", epochs=3, window=window)
    streams = rank_streams(uneven_data, world, "shard", epochs=3, window=window)
    per_epoch = 301 // world
    left_out = []
    for epoch in range(3):
        whole = [k for k, _ in single[epoch * 301:(epoch + 1) * 301]]
        span = slice(epoch * per_epoch, (epoch + 1) * per_epoch)
        assert all(e == epoch for seen in streams for _, e in seen[span])
        for rank, seen in enumerate(streams):
            assert [k for k, _ in seen[span]] == whole[rank * per_epoch:(rank + 1) * per_epoch]
        epoch_keys = [k for seen in streams for k, _ in seen[span]]
        assert len(epoch_keys) == len(set(epoch_keys)) == world * per_epoch
        left_out.append(set(whole) - set(epoch_keys))
        assert len(left_out[-1]) == 301 % world
    assert left_out[0] != left_out[1] != left_out[2]


@pytest.mark.parametrize("world,window", [(2, 1), (3, 1), (3, 2)])
def test_split_by_sample_keeps_the_global_order_of_one_rank_across_epochs(uneven_data, world, window):
    """Rank r's j-th sample is sample j * W + r of the one-rank stream, across epoch boundaries of
    a split that W does not divide: the global batches do not depend on the world size."""
    (single,) = rank_streams(uneven_data, 1, "sample", epochs=4, window=window)
    streams = rank_streams(uneven_data, world, "sample", epochs=4, window=window)  # four epoch boundaries
    n = len(streams[-1])
    interleaved = [streams[r][j][0] for j in range(n) for r in range(world)]
    assert n * world > 3 * 301 and interleaved == [k for k, _ in single[:n * world]]
    assert sorted(k for k, _ in single[:301]) == [f"train-{i:08d}" for i in range(301)]


@pytest.mark.parametrize("split_by,window", [("shard", 1), ("sample", 1), ("shard", 2)])
def test_a_single_pass_covers_every_sample_once_on_any_world_size(uneven_data, split_by, window):
    seen = []
    for rank in range(3):
        seen += [s["key"] for s in ShardStream(uneven_data, "val", rank, 3, loop=False, split_by=split_by,
                                               shuffle_window=window)]
    assert sorted(seen) == [f"val-{i:08d}" for i in range(67)]


@pytest.mark.parametrize("split_by,window", [("shard", 1), ("sample", 1), ("shard", 2), ("sample", 3)])
def test_a_position_inside_a_shard_two_ranks_share_resumes_exactly(uneven_data, split_by, window):
    def stream(rank):
        return ShardStream(uneven_data, "train", rank, 3, seed=2, split_by=split_by, shuffle_window=window)

    for rank in range(3):
        reference = keys(iter(stream(rank)), 250)
        for cut in (37, 100, 101, 150):  # inside shards, at the epoch's end (100 per rank), past it
            partial = stream(rank)
            head = keys(iter(partial), cut)
            resumed = stream(rank)
            resumed.load_state_dict(partial.state_dict())
            assert head + keys(iter(resumed), 250 - cut) == reference


def test_epochs_done_counts_the_fraction_of_the_rank_s_epoch(uneven_data):
    stream = ShardStream(uneven_data, "train", 1, 3, seed=2)  # 100 samples per rank and epoch
    it = iter(stream)
    assert stream.epochs_done() == 0.0
    keys(it, 25)
    assert stream.epochs_done() == pytest.approx(0.25)
    keys(it, 75)
    assert stream.epochs_done() == pytest.approx(1.0)
    keys(it, 150)
    assert stream.epochs_done() == pytest.approx(2.5)
    resumed = ShardStream(uneven_data, "train", 1, 3, seed=2)
    resumed.load_state_dict(stream.state_dict())
    assert resumed.epochs_done() == pytest.approx(2.5)
    # split_by=sample: rank 1 of 2 has positions 1, 3, ... of 301 in epoch 0 (150), then 301, 303 ... (151)
    interleaved = ShardStream(uneven_data, "train", 1, 2, seed=2, split_by="sample")
    it = iter(interleaved)
    keys(it, 75)
    assert interleaved.epochs_done() == pytest.approx(0.5)
    keys(it, 75 + 151)
    assert interleaved.epochs_done() == pytest.approx(2.0)


def test_a_resume_at_a_shard_s_end_does_not_read_that_shard_again(uneven_data, monkeypatch):
    from pipeline import data

    reads, real = [], data.read_shard
    monkeypatch.setattr(data, "read_shard", lambda url, sha256=None: reads.append(url[-10:]) or real(url, sha256))
    reference = keys(iter(ShardStream(uneven_data, "train", shuffle=False)), 400)
    for cut, first_read in ((64, "000001.tar"), (301, "000000.tar")):  # a shard's end, the epoch's end
        partial = ShardStream(uneven_data, "train", shuffle=False)
        head = keys(iter(partial), cut)
        resumed = ShardStream(uneven_data, "train", shuffle=False)
        resumed.load_state_dict(partial.state_dict())
        reads.clear()
        assert head + keys(iter(resumed), 400 - cut) == reference
        assert reads[0] == first_read


def test_a_position_of_other_shards_restarts_its_epoch_with_a_warning(markov_data, uneven_data):
    first = ShardStream(markov_data, "train", 0, 1, seed=1)
    keys(iter(first), 10)
    other = ShardStream(uneven_data, "train", 0, 1, seed=1)
    with pytest.warns(UserWarning, match=r"saved for other shards \(the split's shard list or sample counts have "
                                         r"changed\): restarting epoch 0"):
        other.load_state_dict(first.state_dict())
    assert (other.position.segment_cursor, other.position.sample_cursor, other.position.samples_seen) == (0, 0, 10)


def test_a_position_saved_by_the_earlier_loader_restarts_its_epoch_with_a_warning(markov_data):
    stream = ShardStream(markov_data, "train", 0, 2, seed=1)
    with pytest.warns(UserWarning, match=r"saved by an earlier data loader \(plan 1, now 2\): restarting epoch 3"):
        stream.load_state_dict({"epoch": 3, "shard_cursor": 1, "sample_cursor": 5, "samples_seen": 900,
                                "world_size": 2, "rank": 0, "seed": 1})
    assert (stream.position.epoch, stream.position.segment_cursor, stream.position.sample_cursor,
            stream.position.samples_seen) == (3, 0, 0, 900)


def shard_of(key: str) -> int:
    return int(key.split("-")[1]) // 64  # uneven_data writes keys in order, 64 per shard


def test_a_shuffle_window_mixes_its_shards_in_every_batch(uneven_data):
    """With a window of 3 shards, every 16-sample batch of the window's samples draws from several of the
    first window's shards (a one-shard window keeps each whole shard together); each
    epoch is still a permutation of the split, and the windows are regrouped every epoch."""
    mixed = ShardStream(uneven_data, "train", seed=5, shuffle_window=3)
    one = keys(iter(ShardStream(uneven_data, "train", seed=5)), 45)
    assert len({shard_of(k) for k in one}) == 1
    seen = [(s["key"], mixed.position.epoch) for s in itertools.islice(iter(mixed), 3 * 301)]
    first_window = mixed._epoch_plan(0)[0].shards
    assert len(first_window) == 3 and mixed._epoch_plan(0)[1].shards != first_window
    size = int(mixed.counts[list(first_window)].sum())
    head = [shard_of(k) for k, _ in seen[:size]]
    assert set(head) == set(first_window)
    assert all(len(set(head[i:i + 16])) >= 2 for i in range(0, size - 15, 16))
    for epoch in range(3):
        epoch_keys = [k for k, e in seen if e == epoch]
        assert sorted(epoch_keys) == [f"train-{i:08d}" for i in range(301)]
    assert {mixed._epoch_plan(e)[0].shards for e in range(3)} != {first_window}


@pytest.mark.parametrize("saved,now,world", [(2, 4, 1), (None, 4, 1), (3, 1, 3), (None, 2, 2)])
def test_a_changed_shuffle_window_takes_effect_at_the_next_epoch(uneven_data, saved, now, world):
    """A resume with another window (None: a position saved before windows, read one shard at a
    time) finishes the current epoch as it was planned, then uses the new window: nothing of the
    epoch is repeated or skipped, and the checkpoints taken meanwhile resume the same way."""
    per_epoch = 301 // world
    for rank in range(world):
        def stream(window):
            return ShardStream(uneven_data, "train", rank, world, seed=1, shuffle_window=window or 1)

        before, after = keys(iter(stream(saved)), 2 * per_epoch), keys(iter(stream(now)), 3 * per_epoch)
        partial = stream(saved)
        head = keys(iter(partial), 40)
        state = partial.state_dict()
        if saved is None:
            del state["shuffle_window"]
        resumed = stream(now)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            resumed.load_state_dict(state)
        it = iter(resumed)
        middle = keys(it, 20)
        again = stream(now)  # a checkpoint inside the carried-over epoch
        again.load_state_dict(resumed.state_dict())
        rest = keys(it, 3 * per_epoch - 60)
        assert head + middle + rest[:per_epoch - 60] == before[:per_epoch]
        assert rest[per_epoch - 60:] == after[per_epoch:] == keys(iter(again), 3 * per_epoch - 60)[per_epoch - 60:]
    if saved:
        assert before[:per_epoch] != after[:per_epoch]
    with pytest.raises(ValueError, match="shuffle_window must be >= 1 shard, got 0"):
        ShardStream(uneven_data, "train", shuffle_window=0)


def test_more_ranks_than_training_samples_is_refused_by_name(markov_data):
    with pytest.raises(ValueError, match=r"split 'val' of .* has 64 samples, fewer than the 65 data-parallel ranks"):
        ShardStream(markov_data, "val", 0, 65)


def test_resume_from_state_continues_with_the_next_unseen_sample(markov_data):
    full = ShardStream(markov_data, "train", 0, 1, seed=5)
    reference = keys(iter(full), 700)  # crosses into the second epoch
    partial = ShardStream(markov_data, "train", 0, 1, seed=5)
    head = keys(iter(partial), 300)
    resumed = ShardStream(markov_data, "train", 0, 1, seed=5)
    resumed.load_state_dict(partial.state_dict())
    assert head + keys(iter(resumed), 400) == reference
    assert reference[512:700] != reference[:188]  # the second epoch is reshuffled
    assert sorted(reference[:512]) == sorted(set(reference[:512]))


def test_world_size_change_restarts_the_epoch_with_a_warning(markov_data):
    first = ShardStream(markov_data, "train", 0, 2, seed=1)
    keys(iter(first), 10)
    other = ShardStream(markov_data, "train", 0, 1, seed=1)
    with pytest.warns(UserWarning, match="saved with world_size=2, resuming with world_size=1: restarting epoch 0"):
        other.load_state_dict(first.state_dict())
    assert (other.position.segment_cursor, other.position.sample_cursor) == (0, 0)


def test_batches_are_long_tensors_of_seq_len(markov_data):
    x0, valid, k = next(batches(iter(ShardStream(markov_data, "train")), 4))
    assert x0.shape == (4, 32) and str(x0.dtype) == "torch.int64" and valid is None and len(k) == 4
    assert int(x0.max()) < 16


def test_manifest_sample_count_mismatch_is_reported(markov_data, tmp_path):
    import json
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(markov_data, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["samples"] = 65
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="64 samples but the manifest says 65"):
        list(ShardStream(copy, "val", shuffle=False, loop=False))


@pytest.mark.parametrize("window", [1, 2])
def test_the_next_shard_is_read_in_the_background_in_the_same_order(markov_data, monkeypatch, window):
    import threading

    from pipeline import data

    reads = []
    real = data.read_shard

    def recording(url, sha256=None):
        reads.append((url.rsplit("/", 1)[-1], threading.current_thread().name.startswith("shard-prefetch")))
        return real(url, sha256)

    # the order the stream promises, built by hand: epoch plan, then each window's sample order
    reference = ShardStream(markov_data, "train", seed=3, shuffle_window=window)
    plain = []
    for epoch in range(2):
        for segment in reference._epoch_plan(epoch):
            samples = [s for i in segment.shards for s in data.read_shard(str(markov_data / reference.shards[i]["name"]))]
            order = reference._sample_order(epoch, segment, len(samples))
            plain += [samples[i]["key"] for i in order[segment.start:segment.stop:segment.step]]
    plain = plain[:512]
    monkeypatch.setattr(data, "read_shard", recording)
    stream = iter(ShardStream(markov_data, "train", seed=3, shuffle_window=window))
    first = next(stream)
    for _ in range(600):  # up to 30 s for the prefetch to finish on a busy machine
        if len(reads) == 2 * window:
            break
        threading.Event().wait(0.05)
    assert [background for _, background in reads] == [False] * window + [True] * window
    keys = [first["key"]] + [s["key"] for s in itertools.islice(stream, 511)]
    assert keys == plain  # prefetching changes nothing in what a rank sees (one epoch: 4 shards of 128)
    assert len({name for name, _ in reads[:4]}) == 4  # each shard read once
    assert all(background for _, background in reads[window:])


def test_a_pending_shard_read_does_not_hold_up_process_exit(markov_data):
    """The prefetch of the next shard runs in a daemon thread: a process that is done (after a
    SIGTERM checkpoint, say) exits at once, even while a read hangs on slow storage."""
    code = f"""
import sys, threading, time
sys.path.insert(0, {str(ROOT)!r})
from pipeline import data
real = data.read_shard
def read(url, sha256=None):
    if threading.current_thread().name == "shard-prefetch":
        time.sleep(60)
    return real(url, sha256)
data.read_shard = read
next(data.batches(data.ShardStream({str(markov_data)!r}, "train"), 4))
print("done", flush=True)
"""
    # a process that waited for the read would outlive the timeout (the read sleeps 60 s)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr


def test_a_failed_shard_read_is_retried_then_reported_with_what_to_do(markov_data, monkeypatch, caplog):
    from pipeline import data

    real, failures = data.read_shard, {"left": 1}

    def flaky(url, sha256=None):  # one network hiccup, then the storage answers again
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("Stale file handle")
        return real(url, sha256)

    expected = keys(ShardStream(markov_data, "val", shuffle=False, loop=False), 64)
    monkeypatch.setattr(data, "read_shard", flaky)
    monkeypatch.setattr(ShardStream, "read_retry_wait_s", 0.0)
    assert keys(ShardStream(markov_data, "val", shuffle=False, loop=False), 64) == expected
    assert "Stale file handle); retrying" in caplog.text

    def gone(url, sha256=None):
        raise OSError("Input/output error")

    monkeypatch.setattr(data, "read_shard", gone)
    with pytest.raises(OSError, match=r"could not be read \(OSError: Input/output error\), 3 tries; .*data_prep verify"):
        next(iter(ShardStream(markov_data, "val", shuffle=False, loop=False)))


def test_a_bug_while_reading_is_raised_as_itself_not_retried_as_damage(markov_data, monkeypatch):
    from pipeline import data

    calls = []

    def buggy(url, sha256=None):
        calls.append(url)
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(data, "read_shard", buggy)
    monkeypatch.setattr(ShardStream, "read_retry_wait_s", 0.0)
    with pytest.raises(TypeError, match="unsupported operand"):
        next(iter(ShardStream(markov_data, "val", shuffle=False, loop=False)))
    assert len(calls) == 1


def _copy_with_first_val_shard(data_dir, tmp_path):
    """A copy of the dataset to damage: (its folder, the first val shard's manifest entry, its path)."""
    import json
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shard = json.loads((copy / "manifest.json").read_text())["splits"]["val"]["shards"][0]
    return copy, shard, copy / shard["name"]


def test_a_shard_with_a_sample_missing_its_tokens_is_unreadable(markov_data, tmp_path, monkeypatch):
    import io
    import tarfile

    copy, _, path = _copy_with_first_val_shard(markov_data, tmp_path)
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:  # the first sample's tokens.npy renamed away
        for i, (m, raw) in enumerate(members):
            if i == 0:
                m.name = m.name.replace("tokens.npy", "other.npy")
            tar.addfile(m, io.BytesIO(raw))
    monkeypatch.setattr(ShardStream, "read_retry_wait_s", 0.0)
    with pytest.raises(OSError, match=r"could not be read \(KeyError: 'tokens.npy'\), 3 tries"):
        next(iter(ShardStream(copy, "val", shuffle=False, loop=False, check_sha256=False)))


def test_token_ids_outside_the_vocabulary_are_caught_at_the_shard(markov_data, monkeypatch):
    from pipeline import data

    real = data.read_shard

    def damaged(url, sha256=None):
        samples = real(url, sha256)
        samples[5]["tokens"] = samples[5]["tokens"].copy()
        samples[5]["tokens"][3] = 16  # the markov tokenizer has ids 0..15
        return samples

    monkeypatch.setattr(data, "read_shard", damaged)
    with pytest.raises(ValueError, match=r"sample \S+ has shape \(32,\) and token ids 0\.\.16, but the manifest "
                                         r"says 32 tokens with ids in 0\.\.15"):
        next(iter(ShardStream(markov_data, "val", shuffle=False, loop=False)))


def test_a_shard_damaged_inside_valid_tokens_fails_its_checksum(markov_data, tmp_path, monkeypatch):
    """One bit flipped in a token (the tar and every id still valid: only the checksum sees it)."""
    import tarfile

    copy, shard, path = _copy_with_first_val_shard(markov_data, tmp_path)
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("tokens.npy"))
    raw = bytearray(path.read_bytes())
    last = member.offset_data + member.size - 1 - (1 if raw[member.offset_data + member.size - 1] == 0 else 0)
    raw[last] ^= 1  # the last token's low byte: an id of 0..15 stays in 0..15
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(ShardStream, "read_retry_wait_s", 0.0)
    with pytest.raises(OSError, match=rf"ShardChecksumError: sha256 of \S+{shard['name']} is [0-9a-f]{{64}}, the "
                                      rf"manifest says {shard['sha256']}\), 3 tries; .*data_prep verify"):
        next(iter(ShardStream(copy, "val", shuffle=False, loop=False)))
    # without the check the damaged shard reads (and would train) as if nothing happened
    damaged = list(ShardStream(copy, "val", shuffle=False, loop=False, check_sha256=False))
    clean = list(ShardStream(markov_data, "val", shuffle=False, loop=False))
    assert [s["key"] for s in damaged] == [s["key"] for s in clean]
    assert sum(int((a["tokens"] != b["tokens"]).sum()) for a, b in zip(damaged, clean)) == 1
    # evaluation reads the same shards under the same setting
    from pipeline.evaluate import token_counts

    with pytest.raises(OSError, match="ShardChecksumError"):
        token_counts(copy, "val", 16)
    assert token_counts(copy, "val", 16, check_sha256=False).sum() == token_counts(markov_data, "val", 16).sum()
