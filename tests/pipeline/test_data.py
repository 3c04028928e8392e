from __future__ import annotations

import itertools
import subprocess
import sys
import time

import pytest

from pipeline.data import ShardStream, batches

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


def test_fewer_shards_than_ranks_interleaves_samples(markov_data):
    seen = []
    for rank in range(3):  # val has a single shard of 64 samples
        seen += [s["key"] for s in ShardStream(markov_data, "val", rank, 3, shuffle=False, loop=False)]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 64


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
    with pytest.warns(UserWarning, match="restarting epoch 0"):
        other.load_state_dict(first.state_dict())
    assert (other.position.shard_cursor, other.position.sample_cursor) == (0, 0)


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


def test_the_next_shard_is_read_in_the_background_in_the_same_order(markov_data, monkeypatch):
    import threading

    from pipeline import data

    reads = []
    real = data.read_shard

    def recording(url, sha256=None):
        reads.append((url.rsplit("/", 1)[-1], threading.current_thread().name.startswith("shard-prefetch")))
        return real(url, sha256)

    # the order the stream promises, built by hand: epoch plan, then each shard's sample order
    reference = ShardStream(markov_data, "train", seed=3)
    plain = []
    for epoch in range(2):
        plan, interleaved = reference._epoch_plan(epoch)
        for shard_index in plan:
            samples = data.read_shard(str(markov_data / reference.shards[shard_index]["name"]))
            order = reference._sample_order(epoch, shard_index, len(samples), interleaved)
            plain += [samples[i]["key"] for i in order]
    plain = plain[:200]
    monkeypatch.setattr(data, "read_shard", recording)
    stream = iter(ShardStream(markov_data, "train", seed=3))
    first = next(stream)
    for _ in range(50):  # the prefetch has had time to start
        if len(reads) > 1:
            break
        threading.Event().wait(0.05)
    assert len(reads) == 2 and reads[0][1] is False and reads[1][1] is True
    keys = [first["key"]] + [s["key"] for s in itertools.islice(stream, 199)]
    assert keys == plain  # prefetching changes nothing in what a rank sees
    assert all(background for _, background in reads[1:])


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
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert time.time() - start < 30


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
    import json
    import shutil
    import tarfile

    copy = tmp_path / "data"
    shutil.copytree(markov_data, copy)
    shard = json.loads((copy / "manifest.json").read_text())["splits"]["val"]["shards"][0]
    path = copy / shard["name"]
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
