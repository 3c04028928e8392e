from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic import write_markov_shards


@pytest.fixture(scope="session")
def cluster_markov_data(tmp_path_factory) -> Path:
    """Tiny synthetic shards (16-token Markov chain, 32-token samples) for the launch tests."""
    out = tmp_path_factory.mktemp("cluster-markov")
    write_markov_shards(out, vocab=16, seq_len=32, train_samples=512, val_samples=64, samples_per_shard=128)
    return out
