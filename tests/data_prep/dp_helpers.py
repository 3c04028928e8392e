"""Helpers of the data_prep tests: generated corpora, in-process runs, paths."""
from __future__ import annotations

import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO / ".." / "shared" / "data"

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she all one their there been has when who will more no if out "
         "so said what up its about into than them can only other new some could time these two may then "
         "do first any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people state "
         "union congress nation peace treaty commerce revenue").split()


def make_doc(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    out, line = [], []
    for w in words:
        line.append(w)
        if rng.random() < 0.08:
            out.append(" ".join(line).capitalize() + ".")
            line = []
    if line:
        out.append(" ".join(line) + ",")
    text = " ".join(out)
    if rng.random() < 0.3:
        text = text.replace(". ", ".\n\n", 2)
    if rng.random() < 0.2:
        text += " Caf\u00e9 na\u00efve \u2014 \u00fcber \u4e2d\u6587."
    return text


def make_docs(n: int, seed: int = 0, lo: int = 20, hi: int = 400) -> list[str]:
    rng = random.Random(seed)
    return [make_doc(rng, rng.randint(lo, hi)) for _ in range(n)]


def write_txt_corpus(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (folder / f"doc{i:04d}.txt").write_text(d, encoding="utf-8")
    return folder


def run(argv: list) -> dict:
    """Run `python -m data_prep run ...` in-process (reusing the test session's Ray); returns the manifest."""
    from data_prep.cli import parse_run_args
    from data_prep.run import run_job

    return run_job(parse_run_args([str(a) for a in argv]))


def tree_bytes(out: Path) -> dict:
    """{relative path: bytes} of every file under a data_prep output, without the job lock (it names
    its holder's host, pid and start time, which differ between otherwise identical runs)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).rglob("*"))
            if p.is_file() and p.name != ".lock"}


def read_samples(out: Path, split: str = "train") -> list[dict]:
    """All samples of a split through webdataset, in shard order: [{__key__, tokens.npy, (mask.npy)}]."""
    import webdataset as wds

    from data_prep.manifest import load_manifest, shard_paths

    urls = [str(p) for p in shard_paths(out, load_manifest(out), split)]
    if not urls:
        return []
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    return list(ds)
