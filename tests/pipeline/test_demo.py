"""The demo's own checks, before it trains: data made with other settings, no validation text."""
from __future__ import annotations

import json
from argparse import Namespace

import pytest

from pipeline import demo


def test_a_run_folder_made_with_another_tokenizer_is_refused_in_the_demos_terms(tmp_path):
    data = tmp_path / "runs" / "demo" / "data"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text(json.dumps({"job": {"tokenizer": "train:8192", "seq_len": 128}}))
    with pytest.raises(SystemExit, match=r"was made with tokenizer train:8192 \(now train:4096\): delete it, choose "
                                         r"another --run-dir, or pass the same --vocab-size"):
        demo._check_earlier_data(data, Namespace(vocab_size=4096, seq_len=128))
    demo._check_earlier_data(data, Namespace(vocab_size=8192, seq_len=128))  # the same job: no objection
    demo._check_earlier_data(tmp_path / "none", Namespace(vocab_size=4096, seq_len=128))


def test_a_corpus_with_no_validation_document_stops_before_training(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"d{i}.txt").write_text(" ".join(f"word{j % 50}" for j in range(400 + i)))
    with pytest.raises(SystemExit, match=r"no document of .* landed in the validation split \(0 of them; each goes "
                                         r"there with probability --val-fraction 0.01\): pass a larger --val-fraction"):
        demo.main(["--corpus", str(corpus), "--run-dir", str(tmp_path / "run"), "--vocab-size", "300",
                   "--seq-len", "32", "--val-fraction", "0.01"])
    assert not (tmp_path / "run" / "checkpoints").exists()
