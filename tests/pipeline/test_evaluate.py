from __future__ import annotations

import math

import pytest
import torch

from model.config import model_config
from model.mdlm import build_model
from pipeline.evaluate import evaluate_likelihood, key_uniforms, unigram_perplexity


def tiny_mdlm():
    torch.manual_seed(0)
    model = build_model(model_config("mdlm-tiny", vocab_size=17, mask_token_id=16, dropout=0.0))
    with torch.no_grad():  # a non-trivial head so the bound depends on the draws
        model.backbone.final.linear.weight.normal_(0, 0.5)
    return model


def test_bound_does_not_depend_on_batch_size_or_split_over_ranks(markov_data):
    model = tiny_mdlm()
    whole = evaluate_likelihood(model, markov_data, "val", batch_size=16, time_samples=3, seed=7)
    small = evaluate_likelihood(model, markov_data, "val", batch_size=5, time_samples=3, seed=7)
    assert math.isclose(whole["nelbo"], small["nelbo"], rel_tol=1e-9)
    # the two halves a 2-rank job evaluates add up to the 1-rank result (the all-reduce is a sum)
    halves = [evaluate_likelihood(model, markov_data, "val", 8, 3, seed=7, rank=r, world_size=2) for r in range(2)]
    assert sum(h["tokens"] for h in halves) == whole["tokens"] == 64 * 32
    total = sum(h["nelbo"] * h["tokens"] for h in halves) / whole["tokens"]
    assert math.isclose(total, whole["nelbo"], rel_tol=1e-9)
    other_seed = evaluate_likelihood(model, markov_data, "val", 16, 3, seed=8)
    assert other_seed["nelbo"] != whole["nelbo"]
    assert abs(other_seed["nelbo"] - whole["nelbo"]) < 4 * whole["nelbo_se"] + 1e-3


def test_more_time_samples_shrink_the_standard_error(markov_data):
    model = tiny_mdlm()
    few = evaluate_likelihood(model, markov_data, "val", 16, time_samples=2, seed=1)
    many = evaluate_likelihood(model, markov_data, "val", 16, time_samples=16, seed=1)
    assert many["nelbo_se"] < few["nelbo_se"]
    assert abs(many["nelbo"] - few["nelbo"]) < 4 * few["nelbo_se"]


def test_key_uniforms_are_stable_and_distinct():
    a = key_uniforms(["x", "y"], 0, 5)
    assert torch.equal(a, key_uniforms(["x", "y"], 0, 5))
    assert torch.equal(a[1], key_uniforms(["y"], 0, 5)[0])
    assert not torch.equal(a[0], a[1]) and a.dtype == torch.float64


def test_unigram_perplexity_matches_a_hand_count(markov_data, monkeypatch):
    from collections import Counter

    import pipeline.evaluate as evaluate
    from pipeline.data import ShardStream

    def hand_counts(split, limit=None):
        rows = list(ShardStream(markov_data, split, shuffle=False, loop=False))[:limit]
        counter = Counter(int(t) for row in rows for t in row["tokens"])
        return torch.tensor([counter[i] for i in range(16)], dtype=torch.float64)

    def expected_nll(train):
        val = hand_counts("val")
        return float(-(val * ((train + 1) / (train + 1).sum()).log()).sum() / val.sum())

    result = unigram_perplexity(markov_data, max_train_samples=0)
    assert math.isclose(result["unigram_nll"], expected_nll(hand_counts("train")), rel_tol=1e-12)
    assert result["unigram_tokens"] == 64 * 32 and result["unigram_train_tokens"] == 512 * 32
    # the train side is capped (a web-scale split is not read in full after every run)
    monkeypatch.setattr(evaluate, "UNIGRAM_TRAIN_TOKENS", 100)
    capped = unigram_perplexity(markov_data)
    assert capped["unigram_train_tokens"] == 4 * 32  # ceil(100 / seq_len 32) samples
    assert math.isclose(capped["unigram_nll"], expected_nll(hand_counts("train", 4)), rel_tol=1e-12)


def test_precision_context_sets_autocast_and_restores_tf32():
    from pipeline.inference import precision_context, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, cuda_default="bf16") == "fp32"
    assert resolve_precision("auto", torch.device("cuda"), cuda_default="tf32") == "tf32"
    with pytest.raises(ValueError, match="tf32 needs a CUDA GPU"):
        resolve_precision("tf32", cpu, cuda_default="tf32")
    before, before_cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with precision_context("bf16", cpu):
        assert (x @ w).dtype == torch.bfloat16
    with precision_context("fp32", cpu):
        assert (x @ w).dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu") and torch.backends.cuda.matmul.allow_tf32 == before
    # the TF32 switches are process-wide: set for the block on a GPU, then put back (the flags can
    # be set without a GPU; autocast stays off for fp32 and tf32)
    cuda = torch.device("cuda")
    try:
        for initial in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = initial
            for precision, inside in (("fp32", False), ("tf32", True)):
                with precision_context(precision, cuda):
                    assert torch.backends.cuda.matmul.allow_tf32 is inside and torch.backends.cudnn.allow_tf32 is inside
                assert torch.backends.cuda.matmul.allow_tf32 is initial and torch.backends.cudnn.allow_tf32 is initial
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before, before_cudnn


def test_zero3_placeholders_hold_no_weights_even_with_transformer_engine_state():
    """ZeRO-3 model files keep empty placeholders; TE's _extra_state is a non-empty byte tensor
    there, which must not make them look like raw weights."""
    from pipeline.inference import holds_weights

    placeholders = {"blocks.0.attn_qkv.weight": torch.empty(0), "blocks.0.attn_qkv._extra_state": torch.zeros(300, dtype=torch.uint8)}
    assert not holds_weights(placeholders)
    assert holds_weights({**placeholders, "blocks.0.attn_qkv.weight": torch.ones(4, 4)})
    assert not holds_weights({}) and not holds_weights(None)


def _evaluate_with_rank_1_unreadable(rank, port, data_dir, results):
    import torch.distributed as dist

    from pipeline import data
    from pipeline.evaluate import UnreadableSplit

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:  # its storage fails: rank 0 reads its part and waits in the reduction
            data.ShardStream.read_retry_wait_s = 0.0
            data.read_shard = lambda url, sha256=None: (_ for _ in ()).throw(OSError("Input/output error"))
        try:
            evaluate_likelihood(tiny_mdlm(), data_dir, "val", 8, 2, rank=rank, world_size=2)
            results[rank] = "returned"
        except UnreadableSplit as err:
            results[rank] = str(err)
    finally:
        dist.destroy_process_group()


def on_two_ranks(fn, data_dir) -> dict:
    """fn(rank, port, data_dir, results) on 2 gloo ranks; what each rank put in results."""
    import torch.multiprocessing as mp

    from .conftest import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(fn, args=(free_port(), str(data_dir), results), nprocs=2, join=True)
        return dict(results)


def test_a_shard_one_rank_cannot_read_fails_the_evaluation_on_every_rank(markov_data):
    """Not a hang: the rank that failed still joins the reduction, and every rank raises."""
    results = on_two_ranks(_evaluate_with_rank_1_unreadable, markov_data)
    assert results[0] == f"split 'val' of {markov_data} could not be read on 1 of 2 rank(s)"
    assert results[1].startswith(f"split 'val' of {markov_data} could not be read on 1 of 2 rank(s); here: OSError: ")
    assert "Input/output error), 3 tries" in results[1]


def _evaluate_with_rank_1_out_of_memory(rank, port, data_dir, results):
    import torch.distributed as dist

    from pipeline.evaluate import EvaluationFailed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = tiny_mdlm()
        if rank == 1:  # its second batch runs out of memory; rank 0 goes on to the reduction
            calls = {"n": 0}

            def forward_or_oom(module, args):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            model.backbone.register_forward_pre_hook(forward_or_oom)
        try:
            evaluate_likelihood(model, data_dir, "val", 8, 2, rank=rank, world_size=2)
            results[rank] = "returned"
        except EvaluationFailed as err:
            results[rank] = (type(err).__name__, str(err), type(err.__cause__).__name__)
    finally:
        dist.destroy_process_group()


def test_an_error_on_one_rank_fails_the_evaluation_on_every_rank(markov_data):
    """An out-of-memory on one rank: both ranks raise EvaluationFailed, the failing one with its
    error as the cause; nobody is left waiting in the reduction."""
    results = on_two_ranks(_evaluate_with_rank_1_out_of_memory, markov_data)
    head = f"evaluating split 'val' of {markov_data} failed on 1 of 2 rank(s)"
    assert results[0] == ("EvaluationFailed", f"{head}; see that rank's log", "NoneType")
    assert results[1] == ("EvaluationFailed", f"{head}; here: OutOfMemoryError: CUDA out of memory. Tried to "
                                              f"allocate 2.00 GiB", "OutOfMemoryError")


def test_only_data_errors_count_as_an_unreadable_split(markov_data, monkeypatch):
    """A shard that disagrees with its manifest is 'unreadable' (an extra corpus is then skipped);
    a ValueError from anywhere else is a bug: the evaluation fails with it as the cause."""
    from pipeline import data
    from pipeline.evaluate import EvaluationFailed, UnreadableSplit

    real = data.read_shard
    monkeypatch.setattr(data, "read_shard", lambda url, sha256=None: real(url, sha256)[:-1])
    with pytest.raises(UnreadableSplit, match=r"could not be read on 1 of 1 rank\(s\); here: ShardDataError: .*63 "
                                              r"samples but the manifest says 64"):
        evaluate_likelihood(tiny_mdlm(), markov_data, "val", 8, 2)
    monkeypatch.setattr(data, "read_shard", real)

    def broken(samples):
        raise ValueError("a bug in collate")

    monkeypatch.setattr(data, "collate", broken)
    with pytest.raises(EvaluationFailed, match=r"failed on 1 of 1 rank\(s\); here: ValueError: a bug in collate") as caught:
        evaluate_likelihood(tiny_mdlm(), markov_data, "val", 8, 2)
    assert not isinstance(caught.value, UnreadableSplit) and isinstance(caught.value.__cause__, ValueError)


@pytest.mark.parametrize("failure", ["unreadable", "out of memory"])
def test_a_periodic_evaluation_that_fails_saves_the_steps_first(failure):
    from types import SimpleNamespace

    from pipeline.evaluate import EvaluationFailed, UnreadableSplit
    from pipeline.trainer import Trainer

    error = (UnreadableSplit("split 'val' of /data could not be read on 1 of 8 rank(s)") if failure == "unreadable"
             else EvaluationFailed("evaluating split 'val' of /data failed on 1 of 8 rank(s); see that rank's log"))

    def failing():
        raise error

    for saved_step, saves in ((500, [1000]), (1000, [])):
        host = SimpleNamespace(step=1000, _saved_step=saved_step, evaluate=failing, saved=[])
        host.save = lambda host=host: host.saved.append(host.step)
        with pytest.raises(type(error)):
            Trainer._evaluate_saving_first_on_failure(host)
        assert host.saved == saves

    def interrupted():  # not an evaluation failure every rank shares: no collective save
        raise KeyboardInterrupt

    host = SimpleNamespace(step=1000, _saved_step=500, evaluate=interrupted, saved=[])
    host.save = lambda: host.saved.append(host.step)
    with pytest.raises(KeyboardInterrupt):
        Trainer._evaluate_saving_first_on_failure(host)
    assert host.saved == []
