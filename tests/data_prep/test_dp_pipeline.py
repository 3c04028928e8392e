"""End-to-end runs on real Ray with real webdataset shards: round trip, determinism, pad mode."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep.manifest import ManifestError, load_manifest
from data_prep.sources import clean_text, discover, plan_units
from data_prep.verify import verify_dir
from data_prep.worker import content_hash, is_val
from dp_helpers import read_samples, run, tree_bytes


def test_wrap_round_trip_detokenizes_each_document_in_order(wrap_out, small_docs, small_corpus):
    man = load_manifest(wrap_out)
    tok = Tokenizer.from_file(str(wrap_out / "tokenizer" / "tokenizer.json"))
    bos, eos, seq_len = man["tokenizer"]["bos_id"], man["tokenizer"]["eos_id"], man["seq_len"]
    assert man["packing"] == "wrap" and man["dtype"] == "uint16" and seq_len == 64
    assert man["model_vocab_size"] == man["tokenizer"]["vocab_size"] + 1
    assert man["mask_token_id"] == man["tokenizer"]["vocab_size"] and man["tokenizer"]["mask_id"] is None
    # the plan: groups of consecutive files (group_bytes=4000), each packed into its own shards
    groups = plan_units(discover([str(small_corpus)]), 4000)
    assert man["groups"] == len(groups) > 2
    names = {s: [sh["name"] for sh in man["splits"][s]["shards"]] for s in ("train", "val")}
    assert names["train"] == sorted(names["train"]) and names["train"][0] == "train/shard-000000-0000.tar"
    by_file = {Path(f).name: clean_text(d) for f, d in zip(sorted(small_corpus.glob("*.txt")), small_docs)}
    for split in ("train", "val"):
        samples = read_samples(wrap_out, split)
        assert len(samples) == man["splits"][split]["samples"] > 0
        keys = [s["__key__"] for s in samples]
        assert len(set(keys)) == len(keys)
        shard_of = []
        for sh in man["splits"][split]["shards"]:
            shard_of += [int(sh["name"].split("-")[1])] * sh["samples"]
        n_docs = 0
        for g in groups:
            expected = [by_file[Path(path).name] for path, _ in g["files"]]
            expected = [t for t in expected if is_val(content_hash(t), "", 0.2) == (split == "val")]
            n_docs += len(expected)
            stream = []
            for s, gi in zip(samples, shard_of):
                if gi != g["index"]:
                    continue
                t = s["tokens.npy"]
                assert t.dtype == np.uint16 and t.shape == (seq_len,)
                assert t[0] == bos and t[-1] == eos
                stream.extend(t[1:-1].tolist())
            if not stream:  # the group's documents of this split fit in its dropped tail
                assert sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in expected) < seq_len - 2
                continue
            # within a group, documents are separated by EOS; the last one is cut by the group's tail
            pieces = [tok.decode(p) for p in _split(stream, eos)]
            assert pieces[:-1] == expected[:len(pieces) - 1]
            assert expected[len(pieces) - 1].startswith(pieces[-1])
        assert man["splits"][split]["documents"] == n_docs
    # keys name their source document and chunk index
    first = read_samples(wrap_out, "train")[0]["__key__"]
    assert first.startswith("small_doc") and first.endswith("-0")
    total_tokens = sum(len(tok.encode(clean_text(d), add_special_tokens=False).ids) + 1 for d in small_docs)
    written = sum(man["splits"][s]["samples"] for s in ("train", "val")) * (seq_len - 2)
    assert total_tokens == written + man["dropped_tail_tokens"]


def _split(stream, eos):
    out, cur = [], []
    for t in stream:
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    out.append(cur)
    return out


def test_one_and_two_workers_give_identical_output(wrap_out, small_corpus, tmp_path, ray_session):
    out2 = tmp_path / "two"
    run(["--input", small_corpus, "--out", out2, "--tokenizer", "train:400", "--seq-len", 64,
         "--val-fraction", 0.2, "--samples-per-shard", 50, "--num-workers", 2, "group_bytes=4000"])
    assert (wrap_out / "manifest.json").read_bytes() == (out2 / "manifest.json").read_bytes()
    assert tree_bytes(wrap_out) == tree_bytes(out2)
    man = load_manifest(out2)
    assert len(man["splits"]["train"]["shards"]) > 1
    assert "num_workers" not in man["job"] and "out" not in man["job"]


def test_pad_mode_masks_and_truncation(small_corpus, tmp_path, ray_session, small_docs):
    out = tmp_path / "pad"
    man = run(["--input", small_corpus, "--out", out, "--tokenizer", "train:400", "--seq-len", 96,
               "--packing", "pad", "--val-fraction", 0, "--samples-per-shard", 25])
    assert verify_dir(out)[0] == []
    samples = read_samples(out)
    assert len(samples) == len(small_docs) == man["splits"]["train"]["documents"]
    assert man["splits"]["val"]["samples"] == 0 and man["splits"]["val"]["shards"] == []
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    pad = man["tokenizer"]["pad_id"]
    truncated = 0
    for s, doc in zip(samples, small_docs):
        t, m = s["tokens.npy"], s["mask.npy"]
        assert m.dtype == np.uint8 and t.shape == m.shape == (96,)
        n = int(m.sum())
        ids = tok.encode(clean_text(doc), add_special_tokens=False).ids
        assert t[1:n - 1].tolist() == ids[:94]
        assert (t[n:] == pad).all() and t[n - 1] == man["tokenizer"]["eos_id"]
        truncated += max(0, len(ids) - 94)
    assert man["truncated_tokens"] == truncated > 0
    assert man["splits"]["train"]["tokens"] == sum(int(s["mask.npy"].sum()) for s in samples)


def test_split_is_by_content_hash_not_position(small_docs):
    docs = [clean_text(d) for d in small_docs]
    flags = [is_val(content_hash(d), "", 0.3) for d in docs]
    assert 0 < sum(flags) < len(docs)
    flags_rev = [is_val(content_hash(d), "", 0.3) for d in reversed(docs)]
    assert flags_rev == flags[::-1]


def test_manifest_fields_and_version_check(wrap_out, tmp_path):
    man = load_manifest(wrap_out)
    assert set(man) >= {"format_version", "tokenizer", "model_vocab_size", "mask_token_id", "seq_len", "packing",
                        "dtype", "splits", "dropped_tail_tokens", "skipped", "job"}
    assert set(man["tokenizer"]) == {"name", "vocab_size", "bos_id", "eos_id", "pad_id", "mask_id", "files"}
    sh = man["splits"]["train"]["shards"][0]
    assert set(sh) == {"name", "samples", "tokens", "sha256"} and sh["name"] == "train/shard-000000-0000.tar"
    assert man["job"]["tokenizer"] == "train:400" and man["job"]["seq_len"] == 64
    assert man["job"]["group_bytes"] == 4000 and man["groups"] >= 1 and man["dropped_tail_tokens"] > 0
    bad = dict(man, format_version=99)
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="format_version 99"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")


def test_different_job_in_same_out_dir_is_refused(wrap_out, small_corpus, ray_session):
    from data_prep.run import JobFailed

    with pytest.raises(JobFailed, match="differs in: seq_len"):
        run(["--input", small_corpus, "--out", wrap_out, "--tokenizer", "train:400", "--seq-len", 32,
             "--val-fraction", 0.2, "--samples-per-shard", 50, "group_bytes=4000"])
