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
from dp_helpers import make_docs, run, tree_bytes


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
        b'{"text": "lone \\ud800 surrogate"}',             # 11 invalid_utf8 (valid JSON, no UTF-8)
        b"[" * 100_000,                                     # 12 invalid_json (too deep to parse)
        json.dumps({"text": good[0] + " again"}).encode(),  # 13 ok: reading went on
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
               "--val-fraction", 0, "--max-doc-chars", 4000, "--max-bad-fraction", 0.9, "--max-lost-inputs", 2])
    sk = man["skipped"]
    assert sk["invalid_json"] == 2             # a.jsonl:2 and the nesting of a.jsonl:12
    assert sk["wrong_type"] == 1
    assert sk["missing_field"] == 2            # a.jsonl:4 and the parquet null
    assert sk["invalid_utf8"] == 3             # a.jsonl:5, the lone surrogate of a.jsonl:11 and e.txt
    assert sk["empty"] == 3                    # a.jsonl:6, parquet "", f.txt
    assert sk["too_long"] == 1
    assert sk["not_an_object"] == 1
    assert sk["truncated_input"] == 2
    docs = man["splits"]["train"]["documents"]
    assert 3 + 2 + 2 + 1 <= docs <= 3 + 6 + 2 + 2   # the truncated gzip keeps what came before the cut
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    where = {(e["reason"], e["where"]) for e in errors}
    assert ("invalid_json", "in/a.jsonl:2") in where
    assert ("wrong_type", "in/a.jsonl:3") in where
    assert ("too_long", "in/a.jsonl:7") in where
    assert ("invalid_utf8", "in/a.jsonl:11") in where and ("invalid_json", "in/a.jsonl:12") in where
    assert ("invalid_utf8", "in/e.txt") in where
    assert any(r == "truncated_input" and w.startswith("in/b.jsonl.gz:") for r, w in where)
    assert ("truncated_input", "in/g.jsonl.zst:1") in where
    assert ("missing_field", "in/d.parquet:1") in where
    assert verify_dir(out)[0] == []


def test_inputs_not_read_to_their_end_fail_the_job_by_default(messy_corpus, tmp_path, ray_session):
    """A truncated archive loses every document after the cut but is one bad 'record': the job
    fails, naming the files and the flag to go on without them, and writes no manifest."""
    out = tmp_path / "lossy"
    with pytest.raises(JobFailed, match=r"2 input file\(s\) or part\(s\) could not be read to their end") as err:
        run(["--input", messy_corpus, "--out", out, "--tokenizer", "train:300", "--seq-len", 32,
             "--max-doc-chars", 4000, "--max-bad-fraction", 0.9])
    assert "in/b.jsonl.gz" in str(err.value) and "in/g.jsonl.zst" in str(err.value)
    assert "--max-lost-inputs 2" in str(err.value)
    assert not (out / "manifest.json").exists()
    # the rerun the message suggests is the same job: it continues in the same --out
    assert (out / "_work" / "job.json").exists()
    man = run(["--input", messy_corpus, "--out", out, "--tokenizer", "train:300", "--seq-len", 32,
               "--max-doc-chars", 4000, "--max-bad-fraction", 0.9, "--max-lost-inputs", 2])
    assert man["skipped"]["truncated_input"] == 2 and (out / "manifest.json").exists()


def test_max_bad_fraction_fails_with_clear_message(messy_corpus, tmp_path, ray_session):
    out = tmp_path / "strict"
    with pytest.raises(JobFailed, match=r"input records are bad .*max_bad_fraction=0\.1"):
        run(["--input", messy_corpus, "--out", out, "--tokenizer", "train:300", "--seq-len", 32,
             "--max-doc-chars", 4000, "--max-bad-fraction", 0.1, "--max-lost-inputs", 2])
    assert not (out / "manifest.json").exists()
    assert (out / "errors.jsonl").read_text().strip()


def test_wrong_text_field_hints_at_the_flag(messy_corpus, tmp_path, ray_session):
    with pytest.raises(JobFailed, match="is --text-field right"):
        run(["--input", messy_corpus / "c.jsonl.zst", "--out", tmp_path / "o", "--tokenizer", "train:300",
             "--text-field", "content"])


def test_a_failed_start_does_not_lock_the_output_folder(messy_corpus, tmp_path, ray_session):
    """The corrected command after a wrong --text-field runs without --overwrite: that start wrote
    no data; a folder another job wrote data into is still refused."""
    out = tmp_path / "o"
    args = ["--input", messy_corpus / "c.jsonl.zst", "--out", out, "--tokenizer", "train:300", "--seq-len", 32]
    with pytest.raises(JobFailed, match="is --text-field right"):
        run([*args, "--text-field", "content"])
    man = run(args)
    assert man["splits"]["train"]["samples"] > 0 and verify_dir(out)[0] == []
    with pytest.raises(JobFailed, match=r"holds a different job \(differs in: seq_len: 32 -> 64\)"):
        run([*args[:-1], 64])


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path, ray_session):
    d = tmp_path / "bom"
    d.mkdir()
    docs = make_docs(4, seed=2)
    (d / "x.jsonl").write_bytes("\ufeff".encode() + "".join(json.dumps({"text": t}) + "\n" for t in docs).encode())
    man = run(["--input", d, "--out", tmp_path / "o", "--tokenizer", "train:300", "--seq-len", 32,
               "--val-fraction", 0])
    assert man["skipped"] == {} and man["splits"]["train"]["documents"] == 4


def test_an_input_with_no_usable_document_fails(tmp_path, ray_session):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "x.jsonl").write_text(json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(JobFailed, match=r"no document of the input could be used \(1 skipped: missing_field=1\)"):
        run(["--input", d, "--out", tmp_path / "o", "--tokenizer", "train:300",
             "--seq-len", 32, "--max-bad-fraction", 1])


def test_the_output_folder_inside_an_input_folder_is_not_read(messy_corpus, tmp_path, ray_session):
    import shutil

    d = tmp_path / "in"
    shutil.copytree(messy_corpus, d)
    args = ["--input", d, "--out", d / "shards", "--tokenizer", "train:300", "--seq-len", 32,
            "--max-doc-chars", 4000, "--max-lost-inputs", 2, "--max-bad-fraction", 1]
    first = run(args)
    assert (d / "shards" / "errors.jsonl").read_text().strip()  # a .jsonl inside the input folder
    second = run([*args, "--overwrite"])
    assert second["skipped"] == first["skipped"] and second["splits"] == first["splits"]


def test_dedup_drops_exact_duplicates(tmp_path, ray_session):
    d = tmp_path / "dups"
    d.mkdir()
    docs = make_docs(6, seed=9)
    (d / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs + docs[:3]))
    man = run(["--input", d, "--out", tmp_path / "o", "--tokenizer", "train:300", "--seq-len", 32,
               "--val-fraction", 0, "--dedup"])
    assert man["skipped"] == {"duplicate": 3}
    assert man["splits"]["train"]["documents"] == 6


def test_dedup_is_global_across_groups(tmp_path, ray_session):
    """Duplicates in other files (other groups, other workers) are dropped too: first one wins."""
    d = tmp_path / "dups2"
    d.mkdir()
    docs = make_docs(8, seed=10)
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:5]))
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[3:] + docs[:1]))
    from data_prep.sources import discover, plan_units
    assert len(plan_units(discover([str(d)]), 500)) >= 2
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"o{workers}"
        man = run(["--input", d, "--out", out, "--tokenizer", "train:300", "--seq-len", 32, "--val-fraction", 0,
                   "--dedup", "--num-workers", workers, "group_bytes=500"])
        assert man["skipped"] == {"duplicate": 3} and man["splits"]["train"]["documents"] == 8
        outs.append(out)
    errors = [json.loads(x) for x in (outs[0] / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["where"] for e in errors) == ["dups2/b.jsonl:1", "dups2/b.jsonl:2", "dups2/b.jsonl:6"]
    assert (outs[0] / "manifest.json").read_bytes() == (outs[1] / "manifest.json").read_bytes()


def test_group_plan_cuts_big_files_and_workers_never_change_the_output(tmp_path, ray_session):
    """Big jsonl / parquet files are cut into several groups (line ranges, row groups); 1 or 2
    workers give the same bytes, and bad records keep their file:line."""
    d = tmp_path / "big"
    d.mkdir()
    docs = make_docs(120, seed=21)
    lines = [json.dumps({"text": t}) for t in docs[:80]]
    lines[17] = "{broken"
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": docs[80:]}), d / "b.parquet", row_group_size=7)
    from data_prep.sources import discover, plan_units
    groups = plan_units(discover([str(d)]), 3000)
    assert len(groups) > 4 and {g["kind"] for g in groups} == {"jsonl", "parquet"}
    assert any("range" in g for g in groups) and any("row_groups" in g for g in groups)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"o{workers}"
        man = run(["--input", d, "--out", out, "--tokenizer", "train:300", "--seq-len", 48, "--val-fraction", 0.2,
                   "--samples-per-shard", 30, "--num-workers", workers, "group_bytes=3000"])
        outs.append(out)
    assert man["groups"] == len(groups) and man["splits"]["train"]["documents"] + man["splits"]["val"]["documents"] == 119
    tree = [tree_bytes(o) for o in outs]
    assert tree[0] == tree[1]
    errors = [json.loads(x) for x in (outs[1] / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"reason": "invalid_json", "where": "big/a.jsonl:18", "detail": errors[0]["detail"]}]
    assert verify_dir(outs[0])[0] == []


def test_small_files_of_any_kind_share_groups_and_lose_no_val_split(tmp_path, ray_session):
    """Each group drops its last partial sequence: small jsonl/parquet files must not be groups of
    their own (200 small jsonl files used to give 200 groups and an empty val split)."""
    from data_prep.sources import BadRecords, discover, iter_unit_documents, plan_units

    d = tmp_path / "small"
    d.mkdir()
    docs = make_docs(236, seed=41, lo=200, hi=400)
    for i in range(200):
        (d / f"{i:03d}.jsonl").write_text(json.dumps({"text": docs[i]}) + "\n")
    for i in range(200, 230):
        (d / f"{i:03d}.txt").write_text(docs[i])
    pq.write_table(pa.table({"text": docs[230:]}), d / "230.parquet")
    files = discover([str(d)])
    groups = plan_units(files, 20_000)
    total = sum(f.size for f in files)
    assert len(files) == 231 and len(groups) <= total // 20_000 + 1 and sum(g["bytes"] for g in groups) == total
    mixed = [g for g in groups if g["kind"] == "mixed"]
    assert mixed and all(len(g["kinds"]) == len(g["files"]) for g in mixed)
    bad = BadRecords()
    texts = [t for g in groups for _, t in iter_unit_documents(g, {"text_field": "text", "max_doc_chars": 10**7}, bad)]
    assert texts == [t.strip() for t in docs] and bad.counts == {}
    man = run(["--input", d, "--out", tmp_path / "o", "--tokenizer", "train:300", "--seq-len", 128,
               "--val-fraction", 0.1, "group_bytes=20000"])
    assert man["groups"] == len(groups)
    assert man["splits"]["val"]["samples"] > 0
    kept = sum(man["splits"][s]["tokens"] for s in ("train", "val"))
    assert man["dropped_tail_tokens"] < 0.1 * kept
