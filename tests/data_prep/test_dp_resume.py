"""A run killed mid-way (SIGKILL) and rerun with the same config gives byte-identical output;
groups finished before the kill are skipped (their done-record and shards are reused)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from data_prep.verify import verify_dir
from dp_helpers import REPO, make_docs, run, tree_bytes, write_txt_corpus

ARGS = ["--tokenizer", "train:300", "--seq-len", "32", "--val-fraction", "0.1", "--samples-per-shard", "20",
        "group_bytes=3000"]


def kill_once_group_is_done(ray_session, corpus, out, group: int) -> None:
    """`python -m data_prep` on the test's Ray, SIGKILLed once group `group` has finished."""
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "--input", str(corpus), "--out", str(out),
                             "--num-workers", "1", *ARGS], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = out / "_work" / "groups" / f"{group:06d}.json"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1].decode()
    assert target.exists(), err[-2000:]


def test_resume_after_kill_gives_identical_shards(tmp_path, ray_session, capsys):
    corpus = write_txt_corpus(tmp_path / "corpus", make_docs(300, seed=3, lo=100, hi=300))
    ref = tmp_path / "ref"
    run(["--input", corpus, "--out", ref, *ARGS])

    out = tmp_path / "killed"
    kill_once_group_is_done(ray_session, corpus, out, 3)
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    assert (out / "_work" / "job.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard-*.tar")}
    done = len(list((out / "_work" / "groups").glob("*.json")))

    capsys.readouterr()
    man = run(["--input", corpus, "--out", out, "--num-workers", "2", *ARGS])
    log = capsys.readouterr().err
    # (a task already running when the driver was killed may still have finished its group)
    m = re.search(r"resumed: (\d+) group\(s\) already done were skipped", log)
    assert m and done <= int(m.group(1)) < man["groups"], log[-3000:]
    assert tree_bytes(out) == tree_bytes(ref)
    assert verify_dir(out)[0] == []
    after = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("shard-*.tar")}
    assert all(after[name] == t for name, t in before.items())  # completed shards were kept as they were
    assert len(man["splits"]["train"]["shards"]) > len(before)


def test_a_rerun_over_a_finished_folder_is_unfinished_until_it_ends(tmp_path, ray_session):
    """A finished job rerun after its inputs changed, and killed mid-way: the old manifest must not
    stay behind vouching for the tokenizer and shards being replaced."""
    corpus = write_txt_corpus(tmp_path / "corpus", make_docs(300, seed=3, lo=100, hi=300))
    out = tmp_path / "out"
    run(["--input", corpus, "--out", out, *ARGS])
    (corpus / "doc0000.txt").write_text(make_docs(1, seed=99, lo=200, hi=201)[0])
    kill_once_group_is_done(ray_session, corpus, out, 2)
    assert not (out / "manifest.json").exists()
    problems = verify_dir(out)[0]
    assert problems and "manifest.json" in problems[0], problems[:3]
    man = run(["--input", corpus, "--out", out, *ARGS])  # the rerun finishes it
    assert verify_dir(out)[0] == [] and man["groups"] > 3


def test_relative_inputs_are_read_from_any_working_directory(tmp_path, monkeypatch):
    """A Ray worker of a joined cluster does not run in the driver's directory."""
    from data_prep.sources import discover

    write_txt_corpus(tmp_path / "corpus", make_docs(3, seed=1))
    monkeypatch.chdir(tmp_path)
    files = discover(["corpus"])
    assert [f.path for f in files] == [str(tmp_path / "corpus" / f"doc{i:04d}.txt") for i in range(3)]
    assert [f.file_id for f in files] == [f"corpus/doc{i:04d}.txt" for i in range(3)]  # ids unchanged


def test_an_output_folder_in_use_is_refused(tmp_path, ray_session):
    """A second data_prep into a folder another one is still writing: refused, naming the holder,
    before it touches anything (an earlier failed start would otherwise be replaced)."""
    import socket

    import pytest

    from data_prep.manifest import lock_folder
    from data_prep.run import JobFailed

    corpus = write_txt_corpus(tmp_path / "corpus", make_docs(20, seed=3))
    out = tmp_path / "out"
    held, _ = lock_folder(out, "a test")
    try:
        with pytest.raises(JobFailed, match=rf"'{out}' is in use by another data_prep job \(host "
                                            rf"{socket.gethostname()}, pid {os.getpid()}, since "):
            run(["--input", corpus, "--out", out, *ARGS])
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        held.close()
    assert run(["--input", corpus, "--out", out, *ARGS])["splits"]["train"]["samples"] > 0
