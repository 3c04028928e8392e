"""Shared fixtures of the data_prep tests: one in-process Ray for the session, small corpora."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dp_helpers import REPO, make_docs, run, write_txt_corpus  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for all in-process runs (run_job reuses an initialised Ray)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # another test module of this session started one: share it
        yield ray
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    pypath = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": pypath}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_docs() -> list[str]:
    return make_docs(60, seed=1)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, small_docs) -> Path:
    return write_txt_corpus(tmp_path_factory.mktemp("corpus") / "small", small_docs)


@pytest.fixture(scope="session")
def wrap_out(ray_session, small_corpus, tmp_path_factory) -> Path:
    """A wrap-mode dataset of the small corpus made with 1 worker (reused by several tests)."""
    out = tmp_path_factory.mktemp("wrap") / "out"
    run(["--input", small_corpus, "--out", out, "--tokenizer", "train:400", "--seq-len", 64,
         "--val-fraction", 0.2, "--samples-per-shard", 50, "--num-workers", 1, "group_bytes=4000"])
    return out

