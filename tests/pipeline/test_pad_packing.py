"""Pad packing: micro-batches hold different numbers of real tokens, yet a step's gradient must be
that of the step's loss (summed over its tokens / their number) whatever the split into
micro-batches and ranks, as it is with wrap packing."""
from __future__ import annotations

import pytest

from tests.synthetic import write_markov_shards

from .conftest import launch_train, metric_series, run_single

COMMON = ("train.max_steps=8", "train.log_every=1", "train.checkpoint_every=0", "data.split_by=sample",
          "tracking.enabled=false", "eval.max_batches=1", "sample.num_samples=1", "sample.steps=4",
          "train.global_batch_size=8", "train.precision=fp32")


@pytest.fixture(scope="module")
def padded_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("padded")
    write_markov_shards(out, vocab=16, seq_len=32, train_samples=256, val_samples=32, samples_per_shard=64,
                        padded=True)
    return out


def test_the_step_loss_does_not_depend_on_the_micro_batch_split(padded_data, tmp_path):
    whole = tmp_path / "whole"
    run_single(whole, padded_data, *COMMON, "data.micro_batch_size=8")
    runs = {"accumulated": tmp_path / "accumulated", "two ranks": tmp_path / "ranks"}
    run_single(runs["accumulated"], padded_data, *COMMON, "data.micro_batch_size=4")   # 2 x 4
    launch_train(runs["two ranks"], padded_data, *COMMON, "data.micro_batch_size=4")   # 2 ranks x 4
    reference = metric_series(whole)
    assert sorted(reference) == list(range(1, 9))
    for name, run_dir in runs.items():
        losses = metric_series(run_dir)
        worst = max(abs(losses[s] - reference[s]) for s in reference)
        print(f"pad packing, {name} vs one micro-batch: largest per-step loss difference {worst:.2e}")
        assert worst < 1e-5, (name, losses, reference)
