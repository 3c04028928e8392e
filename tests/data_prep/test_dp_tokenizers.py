"""Tokenizer SPECs: trained BPE (deterministic), GPT-2 files, BERT vocab.txt, tokenizer.json paths.

The GPT-2 / BERT files live beside the project in ../shared/data; these tests skip without it."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from data_prep.config import DataPrepConfig
from data_prep.tokenizer import load_tokenizer
from dp_helpers import REPO, make_docs, run

TOKDIR = REPO / ".." / "shared" / "data" / "tokenizers"
GPT2 = TOKDIR / "gpt2"
BERT = TOKDIR / "bert-base-uncased"
needs_gpt2 = pytest.mark.skipif(not (GPT2 / "vocab.json").is_file(), reason="../shared/data/tokenizers/gpt2 absent")
needs_bert = pytest.mark.skipif(not (BERT / "vocab.txt").is_file(), reason="../shared/data/tokenizers/bert absent")


def _cfg(**kw):
    return DataPrepConfig(input=["x"], out="y", **kw)


def test_trained_bpe_is_deterministic_and_treats_special_text_as_text():
    docs = make_docs(30, seed=4)
    a = load_tokenizer("train:320", _cfg(), iter(docs))
    b = load_tokenizer("train:320", _cfg(), iter(docs))
    assert a.json == b.json and a.vocab_size == 320
    assert a.bos_id == a.eos_id == a.pad_id == 0 and a.mask_id is None
    assert a.model_vocab_size == 321 and a.mask_token_id == 320 and a.dtype == "uint16"
    ids = a.tokenizer().encode("a <|endoftext|> b", add_special_tokens=False).ids
    assert a.eos_id not in ids
    assert a.tokenizer().decode(ids) == "a <|endoftext|> b"


@needs_gpt2
def test_gpt2_files_match_known_encoding():
    info = load_tokenizer(str(GPT2.resolve()), _cfg())
    tok = info.tokenizer()
    assert tok.encode("Hello world, this is GPT-2.").ids == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 13]
    assert (info.vocab_size, info.bos_id, info.eos_id, info.mask_id) == (50257, 50256, 50256, None)
    assert (info.model_vocab_size, info.mask_token_id, info.dtype) == (50258, 50257, "uint16")
    # the saved JSON reloads as the same tokenizer (what the trainer does)
    again = Tokenizer.from_str(info.json)
    assert again.encode("Hello world, this is GPT-2.").ids[:2] == [15496, 995]
    with pytest.raises(Exception, match="vocab_size=50000"):
        load_tokenizer(str(GPT2), _cfg(vocab_size=50000))


@needs_bert
def test_bert_vocab_matches_known_encoding():
    info = load_tokenizer(str(BERT / "vocab.txt"), _cfg())
    ids = info.tokenizer().encode("Hello world! Masked diffusion LMs.").ids
    assert ids == [101, 7592, 2088, 999, 16520, 19241, 1048, 5244, 1012, 102]
    assert (info.bos_id, info.eos_id, info.pad_id, info.mask_id) == (101, 102, 0, 103)
    assert info.model_vocab_size == 30522 and info.mask_token_id == 103


@needs_gpt2
def test_run_with_gpt2_and_tokenizer_json_specs(tmp_path, small_corpus, ray_session):
    out = tmp_path / "g"
    man = run(["--input", small_corpus, "--out", out, "--tokenizer", GPT2, "--seq-len", 128, "--val-fraction", 0])
    assert man["tokenizer"]["name"] == "gpt2" and man["model_vocab_size"] == 50258
    assert man["mask_token_id"] == 50257 and man["dtype"] == "uint16"
    saved = out / "tokenizer" / "tokenizer.json"
    assert json.loads(saved.read_text())["model"]["type"] == "BPE"
    # the saved tokenizer.json is itself a valid SPEC (file and folder) and gives identical shards
    out2, out3 = tmp_path / "g2", tmp_path / "g3"
    run(["--input", small_corpus, "--out", out2, "--tokenizer", saved, "--seq-len", 128, "--val-fraction", 0])
    run(["--input", small_corpus, "--out", out3, "--tokenizer", saved.parent, "--seq-len", 128, "--val-fraction", 0])
    for o in (out2, out3):
        assert (o / "train" / "shard-000000-0000.tar").read_bytes() == (out / "train" / "shard-000000-0000.tar").read_bytes()


@needs_bert
def test_run_with_bert_has_its_own_mask_token(tmp_path, small_corpus, ray_session):
    man = run(["--input", small_corpus, "--out", tmp_path / "b", "--tokenizer", BERT, "--seq-len", 64,
               "--packing", "pad", "--val-fraction", 0])
    assert man["tokenizer"]["mask_id"] == 103 and man["mask_token_id"] == 103
    assert man["model_vocab_size"] == 30522 and man["tokenizer"]["pad_id"] == 0


def test_large_vocab_gives_int32_and_tokenizer_json_specials(tmp_path, ray_session):
    from tokenizers import models, pre_tokenizers

    from data_prep.verify import verify_dir

    words = ["<s>", "</s>", "<pad>", "<mask>", "[UNK]"] + [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<pad>", "<mask>"])
    tok.save(str(tmp_path / "big.json"))
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" ".join(f"w{i}" for i in range(69_990, 70_000)) + " w1 w2")
    (corpus / "b.txt").write_text("w3 unknownword w69999")
    out = tmp_path / "o"
    man = run(["--input", corpus, "--out", out, "--tokenizer", tmp_path / "big.json", "--seq-len", 8,
               "--val-fraction", 0, "--packing", "pad"])
    assert man["dtype"] == "int32" and man["model_vocab_size"] == 70_005 and man["mask_token_id"] == 3
    assert (man["tokenizer"]["bos_id"], man["tokenizer"]["eos_id"], man["tokenizer"]["pad_id"]) == (0, 1, 2)
    assert verify_dir(out)[0] == []
    from dp_helpers import read_samples
    first = read_samples(out)[0]["tokens.npy"]
    assert first.dtype == "int32" and first.tolist() == [0, 69_995, 69_996, 69_997, 69_998, 69_999, 70_000, 1]
