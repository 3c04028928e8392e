"""Bad input is counted by reason (manifest + errors.jsonl), never crashes the job."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep.run import JobFailed
from data_prep.verify import verify_dir
from dp_helpers import make_docs, run


@pytest.fixture(scope="module")
def messy_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("messy") / "in"
    d.mkdir()
    good = make_docs(12, seed=5)
    lines = [
        json.dumps({"text": good[0]}).encode(),            # 1 ok
        b'{"text": "unterminated',                          # 2 invalid_json
        json.dumps({"text": 42}).encode(),                  # 3 wrong_type
        json.dumps({"body": "no text field"}).encode(),     # 4 missing_field
        b'{"text": "bad \xff\xfe utf8"}',                   # 5 invalid_utf8
        json.dumps({"text": "   \r\n  "}).encode(),         # 6 empty
        json.dumps({"text": "x" * 5000}).encode(),          # 7 too_long (max_doc_chars=4000)
        json.dumps(["a", "list"]).encode(),                 # 8 not_an_object
        b"",                                                # 9 blank line: not a record
        json.dumps({"text": good[1], "id": 7}).encode(),    # 10 ok
    ]
    (d / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    # truncated gzip: the first records survive, the cut is counted once
    gz = gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in good[2:8]))
    (d / "b.jsonl.gz").write_bytes(gz[: len(gz) * 2 // 3])
    zst = zstandard.ZstdCompressor().compress(
        b"".join(json.dumps({"text": t}).encode() + b"\n" for t in good[8:10]))
    (d / "c.jsonl.zst").write_bytes(zst)
    (d / "g.jsonl.zst").write_bytes(zst[: len(zst) // 2])   # truncated zstd (no docs survive)
    pq.write_table(pa.table({"text": [good[10], None, good[11], ""]}), d / "d.parquet")
    (d / "e.txt").write_bytes(b"caf\xe9 latin-1 text")     # invalid_utf8
    (d / "f.txt").write_text("\n\n  \n")                   # empty
    return d


def test_each_bad_input_class_is_counted(messy_corpus, tmp_path, ray_session):
    out = tmp_path / "out"
    man = run(["--input", messy_corpus, "--out", out, "--tokenizer", "train:300", "--seq-len", 32,
               "--val-fraction", 0, "--max-doc-chars", 4000, "--max-bad-fraction", 0.9])
    sk = man["skipped"]
    assert sk["invalid_json"] == 1
    assert sk["wrong_type"] == 1
    assert sk["missing_field"] == 2            # a.jsonl:4 and the parquet null
    assert sk["invalid_utf8"] == 2             # a.jsonl:5 and e.txt
    assert sk["empty"] == 3                    # a.jsonl:6, parquet "", f.txt
    assert sk["too_long"] == 1
    assert sk["not_an_object"] == 1
    assert sk["truncated_input"] == 2
    docs = man["splits"]["train"]["documents"]
    assert 2 + 2 + 2 + 1 <= docs <= 2 + 6 + 2 + 2   # the truncated gzip keeps what came before the cut
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    where = {(e["reason"], e["where"]) for e in errors}
    assert ("invalid_json", "in/a.jsonl:2") in where
    assert ("wrong_type", "in/a.jsonl:3") in where
    assert ("too_long", "in/a.jsonl:7") in where
    assert ("invalid_utf8", "in/e.txt") in where
    assert any(r == "truncated_input" and w.startswith("in/b.jsonl.gz:") for r, w in where)
    assert ("truncated_input", "in/g.jsonl.zst:1") in where
    assert ("missing_field", "in/d.parquet:1") in where
    assert verify_dir(out)[0] == []


def test_max_bad_fraction_fails_with_clear_message(messy_corpus, tmp_path, ray_session):
    out = tmp_path / "strict"
    with pytest.raises(JobFailed, match=r"input records are bad .*max_bad_fraction=0\.1"):
        run(["--input", messy_corpus, "--out", out, "--tokenizer", "train:300", "--seq-len", 32,
             "--max-doc-chars", 4000, "--max-bad-fraction", 0.1])
    assert not (out / "manifest.json").exists()
    assert (out / "errors.jsonl").read_text().strip()


def test_wrong_text_field_hints_at_the_flag(messy_corpus, tmp_path, ray_session):
    with pytest.raises(JobFailed, match="is --text-field right"):
        run(["--input", messy_corpus / "c.jsonl.zst", "--out", tmp_path / "o", "--tokenizer", "train:300",
             "--text-field", "content"])


def test_dedup_drops_exact_duplicates(tmp_path, ray_session):
    d = tmp_path / "dups"
    d.mkdir()
    docs = make_docs(6, seed=9)
    (d / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + docs[:3]))
    man = run(["--input", d, "--out", tmp_path / "o", "--tokenizer", "train:300", "--seq-len", 32,
               "--val-fraction", 0, "--dedup"])
    assert man["skipped"] == {"duplicate": 3}
    assert man["splits"]["train"]["documents"] == 6


def test_task_split_never_changes_the_output(tmp_path, ray_session):
    """Big jsonl / parquet files are cut into several tasks; the output is the same as one task."""
    d = tmp_path / "big"
    d.mkdir()
    docs = make_docs(120, seed=21)
    lines = [json.dumps({"text": t}) for t in docs[:80]]
    lines[17] = "{broken"
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": docs[80:]}), d / "b.parquet", row_group_size=7)
    outs = []
    for task_bytes in (10_000_000, 3000):
        out = tmp_path / f"o{task_bytes}"
        run(["--input", d, "--out", out, "--tokenizer", "train:300", "--seq-len", 48, "--val-fraction", 0.2,
             "--samples-per-shard", 30, f"task_bytes={task_bytes}"])
        outs.append(out)
    from data_prep.sources import discover, plan_units
    assert len(plan_units(discover([str(d)]), 3000)) > 4
    for name in ("manifest.json", "errors.jsonl", "train/shard-000000.tar", "val/shard-000000.tar"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    errors = [json.loads(x) for x in (outs[1] / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"reason": "invalid_json", "where": "big/a.jsonl:18", "detail": errors[0]["detail"]}]
