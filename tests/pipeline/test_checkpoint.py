"""Checkpoint storage semantics: which checkpoint a resume continues after going back to an older
one, missing shard files, a run_dir that other nodes' ranks cannot see, and what COMPLETE vouches
for. Real DeepSpeed training where the trainer is involved; a stand-in engine (it writes one file
per rank) where only the manager's collective bookkeeping is under test."""
from __future__ import annotations

import functools
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline import checkpoint as ckpt

from .conftest import free_port, run_single, run_two_ranks

FAST = ("tracking.enabled=false", "train.log_every=1", "eval.max_batches=1", "sample.num_samples=1",
        "sample.steps=4")


def test_resuming_an_older_checkpoint_leaves_the_newer_ones_behind(markov_data, tmp_path):
    """Back to step 8 of a run that reached 10 (e.g. after a loss spike): the run continues from 8,
    and a later --resume auto follows that line, not the abandoned step 10."""
    args = (*FAST, "train.checkpoint_every=2", "train.keep_last=2")
    run_single(tmp_path, markov_data, *args, "train.max_steps=10")
    assert ckpt.complete_tags(tmp_path / "checkpoints") == ["step00000008", "step00000010"]
    out = run_single(tmp_path, markov_data, *args, "train.max_steps=9", resume="step00000008")
    text = out.stdout + out.stderr
    assert "resumed at step 8" in text and "the newer checkpoints step00000010 were moved to" in text
    assert ckpt.complete_tags(tmp_path / "checkpoints") == ["step00000008", "step00000009"]
    [abandoned] = (tmp_path / "checkpoints" / ckpt.ABANDONED).iterdir()
    assert abandoned.name.startswith("step00000010-") and (abandoned / ckpt.COMPLETE).is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step00000009"
    again = run_single(tmp_path, markov_data, *args, "train.max_steps=9", resume="auto")
    assert "resumed at step 9" in again.stdout + again.stderr


def test_another_runs_checkpoint_starts_a_run_without_touching_that_run(markov_data, tmp_path):
    """--resume DIR/checkpoints/stepN into a new run_dir (a fork): the new run saves, prunes and
    writes `latest` in its own folder; the other run keeps every checkpoint it had."""
    args = (*FAST, "train.checkpoint_every=2", "train.keep_last=2")
    a = tmp_path / "a"
    run_single(a, markov_data, *args, "train.max_steps=10")
    before = {p.relative_to(a): p.stat().st_mtime_ns for p in (a / "checkpoints").rglob("*") if p.is_file()}
    fork = tmp_path / "fork"
    out = run_single(fork, markov_data, *args, "train.max_steps=14", "optim.lr=1e-4",
                     resume=str(a / "checkpoints" / "step00000008"))
    text = out.stdout + out.stderr
    assert "resumed at step 8" in text and "resumed with optim.lr from the config" in text
    assert ckpt.complete_tags(fork / "checkpoints") == ["step00000012", "step00000014"]
    assert (fork / "checkpoints" / "latest").read_text() == "step00000014"
    after = {p.relative_to(a): p.stat().st_mtime_ns for p in (a / "checkpoints").rglob("*") if p.is_file()}
    assert after == before and not (a / "checkpoints" / ckpt.ABANDONED).exists()
    # the same command again (a requeue) continues the fork, not a second start from step 8
    again = run_single(fork, markov_data, *args, "train.max_steps=16", "optim.lr=1e-4",
                       resume=str(a / "checkpoints" / "step00000008"))
    text = again.stdout + again.stderr
    assert "already holds its own (newest step00000014): continuing those" in text and "resumed at step 14" in text
    assert ckpt.complete_tags(fork / "checkpoints") == ["step00000014", "step00000016"]
    # its own step directory, spelled another way, is still its own: the newer step 10 is abandoned
    own = os.path.relpath(a / "checkpoints" / "step00000008", os.getcwd())
    out = run_single(a, markov_data, *args, "train.max_steps=9", resume=f"../{os.path.basename(os.getcwd())}/{own}")
    assert "the newer checkpoints step00000010 were moved to" in out.stdout + out.stderr


def test_a_resume_applies_the_configs_optimizer_settings_at_the_restored_schedule():
    """The optimizer state and LR schedule come back with the checkpoint's hyperparameters; the
    config's apply from the resume on, and an unchanged config leaves everything as loaded."""
    import copy

    from pipeline.config import RunConfig
    from pipeline.trainer import apply_optim_config, lr_lambda, param_groups

    cfg = RunConfig()
    cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.train.max_steps = 4, 0.0, 100
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    for _ in range(3):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        sched.step()
    saved = copy.deepcopy((opt.state_dict(), sched.state_dict()))
    apply_optim_config(sched, cfg)
    assert (opt.state_dict()["param_groups"], sched.state_dict()) == (saved[0]["param_groups"], saved[1])
    new = copy.deepcopy(cfg)
    new.optim.lr, new.optim.weight_decay, new.optim.betas, new.optim.eps = 1e-4, 0.5, (0.8, 0.9), 1e-6
    apply_optim_config(sched, new)
    factor = lr_lambda(cfg)(3)
    decay, no_decay = opt.param_groups
    assert decay["lr"] == no_decay["lr"] == 1e-4 * factor and sched.get_last_lr() == [1e-4 * factor] * 2
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.5, 0.0)
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6
    sched.step()
    assert opt.param_groups[0]["lr"] == 1e-4 * lr_lambda(cfg)(4)


def test_a_resume_with_a_longer_schedule_runs_its_next_step_at_the_new_schedules_lr():
    """The restored optimizer holds the LR the old schedule set for the next step; a changed
    max_steps (or warmup, schedule, ...) must already set that step's LR."""
    import copy

    from pipeline.config import RunConfig
    from pipeline.trainer import apply_optim_config, lr_lambda, param_groups

    def build(cfg):
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(param_groups(model, 0.0), lr=cfg.optim.lr)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    old = RunConfig()
    old.optim.schedule, old.optim.warmup_steps, old.train.max_steps = "cosine", 0, 4
    model, opt, sched = build(old)
    for _ in range(3):
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        sched.step()
    longer = copy.deepcopy(old)
    longer.train.max_steps = 40
    _, opt2, sched2 = build(longer)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == old.optim.lr * lr_lambda(old)(3)  # what the checkpoint brings
    apply_optim_config(sched2, longer)
    want = longer.optim.lr * lr_lambda(longer)(3)
    assert want > 3 * old.optim.lr * lr_lambda(old)(3)
    assert [g["lr"] for g in opt2.param_groups] == [want, want] and sched2.get_last_lr() == [want, want]


def test_a_missing_shard_falls_back_to_the_previous_checkpoint(markov_data, tmp_path):
    """COMPLETE lists every rank's files with their sizes: a shard lost afterwards (an interrupted
    cleanup, a storage fault) makes that checkpoint damaged (with several ranks it used to read as a
    different data-parallel size), and the resume falls back."""
    args = (*FAST, "train.checkpoint_every=2", "train.keep_last=3", "train.zero_stage=2")
    run_single(tmp_path, markov_data, *args, "train.max_steps=4")
    listed = ckpt.listed_files(tmp_path / "checkpoints" / "step00000004")
    lost = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert listed[lost] == (tmp_path / "checkpoints" / "step00000004" / lost).stat().st_size > 0
    assert json.loads((tmp_path / "checkpoints" / "step00000004" / ckpt.COMPLETE).read_text())["step"] == 4
    (tmp_path / "checkpoints" / "step00000004" / lost).unlink()
    out = run_single(tmp_path, markov_data, *args, "train.max_steps=5", resume="auto")
    text = out.stdout + out.stderr
    assert f"missing or damaged: {lost}" in text and "resumed at step 2" in text, text[-3000:]
    assert ckpt.complete_tags(tmp_path / "checkpoints") == ["step00000002", "step00000004", "step00000005"]


class OneFilePerRank:
    """Stands in for a DeepSpeed engine: each rank writes its own shard, as ZeRO does."""

    def __init__(self, rank: int):
        self.rank = rank

    def save_checkpoint(self, root, tag, client_state, save_latest):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"), "wb") as fh:
            fh.write(b"x" * (100 + self.rank))


def test_a_failure_to_prune_old_checkpoints_keeps_the_new_one(tmp_path, monkeypatch, caplog):
    manager = ckpt.CheckpointManager(tmp_path, keep_last=1, rank=0)
    manager.save(OneFilePerRank(0), 1, {"run_config": {"model": {}}})

    def no_permission():
        raise PermissionError(13, "Permission denied", str(tmp_path / "step00000001"))

    monkeypatch.setattr(manager, "_prune", no_permission)
    with caplog.at_level("WARNING", logger="pipeline.checkpoint"):
        manager.save(OneFilePerRank(0), 2, {"run_config": {"model": {}}})
    assert ckpt.complete_tags(tmp_path) == ["step00000001", "step00000002"]
    assert (tmp_path / "latest").read_text() == "step00000002"
    assert "step00000002 saved, but older ones could not be removed (keep_last=1)" in caplog.text


def save_worker(rank: int, size: int, port: int, roots: list[str], queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        ckpt.VISIBILITY_WAIT_S = 2.0
        manager = ckpt.CheckpointManager(roots[rank], keep_last=2, rank=rank)
        try:
            manager.save(OneFilePerRank(rank), 3, {"run_config": {"model": {}}})
            queue.put((rank, "saved"))
        except RuntimeError as err:
            queue.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


def save_on_two_ranks(roots: list[str]) -> dict[int, str]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=save_worker, args=(r, 2, port, roots, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results


def test_complete_is_written_only_once_rank_0_sees_every_rank_s_files(tmp_path):
    shared = str(tmp_path / "shared")
    assert save_on_two_ranks([shared, shared]) == {0: "saved", 1: "saved"}
    tag_dir = tmp_path / "shared" / "step00000003"
    assert ckpt.listed_files(tag_dir) == {"zero_pp_rank_0_mp_rank_00_optim_states.pt": 100,
                                          "zero_pp_rank_1_mp_rank_00_optim_states.pt": 101}
    assert ckpt.damaged_files(tag_dir) == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                           "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # no zip: not torch files
    # a node-local run_dir: the same path on two nodes, two different folders
    local = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    results = save_on_two_ranks(local)
    assert "run_dir must be storage that every node mounts" in results[0], results
    assert "was not written" in results[1], results
    assert not (tmp_path / "node0" / "step00000003").exists()      # the partial checkpoint is removed
    assert ckpt.complete_tags(tmp_path / "node0") == [] and not (tmp_path / "node0" / "latest").exists()


def full_disk_worker(rank: int, size: int, port: int, queue, root: str):
    """Real ZeRO-2 and ZeRO-3 engines where one rank cannot write its optimizer shard (torch.save's
    error on a full disk): rank 1 under ZeRO-2, rank 0 under ZeRO-3, whose save still has an
    all-gather of the persistent parameters after the writes."""
    import datetime

    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(size))
    # a rank left waiting would fail the test at this timeout, not pass it
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    outcome = {}
    try:
        for stage, failing in ((2, 1), (3, 0)):
            torch.manual_seed(0)
            model = torch.nn.Linear(8, 8)
            config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}
            engine, *_ = deepspeed.initialize(model=model, config=config,
                                              optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
            manager = ckpt.CheckpointManager(f"{root}/zero{stage}", keep_last=2, rank=rank)
            manager.save(engine, 1, {"run_config": {"model": {}}})
            if rank == failing:
                write = engine.checkpoint_engine.save

                def full_disk(state_dict, path, write=write):  # DeepSpeed passes both by name or position
                    if "optim_states" in str(path):
                        with open(path, "wb") as fh:
                            fh.write(b"PK partial")
                        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed "
                                           "writing file data/0: file write failed")
                    return write(state_dict, path)

                engine.checkpoint_engine.save = full_disk
            try:
                manager.save(engine, 2, {"run_config": {"model": {}}})
                outcome[stage] = "saved"
            except RuntimeError as err:
                outcome[stage] = str(err)
            engine.destroy()
        queue.put((rank, outcome))
    finally:
        dist.destroy_process_group()


def test_a_shard_write_failing_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    results = dict(run_two_ranks(functools.partial(full_disk_worker, root=str(tmp_path)), timeout=180))
    for stage, failing in ((2, 1), (3, 0)):
        for rank in (0, 1):
            message = results[rank][stage]
            assert "checkpoint step00000002 was not written" in message, (stage, results)
            assert "newest complete: step00000001" in message, (stage, results)
        assert f"rank {failing}: save(" in results[0][stage] and "file write failed" in results[failing][stage]
        root = tmp_path / f"zero{stage}"
        assert ckpt.complete_tags(root) == ["step00000001"] and not (root / "step00000002").exists()
        assert (root / "latest").read_text() == "step00000001"


def test_gradient_precision_is_fixed_for_a_bf16_run():
    bf16 = {"train": {"precision": "bf16", "zero_stage": 1}}  # a checkpoint from before the setting
    fixed, _ = ckpt.config_differences(bf16, {"train": {**bf16["train"], "grad_precision": "fp32"}})
    assert fixed == ["train.grad_precision: bf16 -> fp32"]
    assert ckpt.config_differences(bf16, {"train": {**bf16["train"], "grad_precision": "bf16"}}) == ([], [])
    fp32 = {"train": {"precision": "fp32"}}  # meaningless with fp32 weights: never refused
    assert ckpt.config_differences(fp32, {"train": {"precision": "fp32", "grad_precision": "fp32"}}) == ([], [])


def test_a_tp_checkpoint_from_before_the_head_padding_setting_names_it():
    old = {"parallel": {"tensor": 2}}  # its output head was padded to a multiple of TP only
    fixed, _ = ckpt.config_differences(old, {"parallel": {"tensor": 2, "head_multiple": 128}})
    assert fixed == ["parallel.head_multiple: 1 -> 128"]
    assert ckpt.config_differences(old, {"parallel": {"tensor": 2, "head_multiple": 1}}) == ([], [])
    no_tp = {"parallel": {"tensor": 1}}  # no TP: the head is never padded in the weights
    assert ckpt.config_differences(no_tp, {"parallel": {"tensor": 1, "head_multiple": 128}}) == ([], [])


def test_a_checkpoint_from_before_the_fused_gradient_update_says_it_ran_deepspeeds():
    old = {"train": {"precision": "bf16", "zero_stage": 1}}
    assert ckpt.config_differences(old, {"train": {**old["train"], "grad_precision": "bf16", "fuse_grad_update": True}}) == \
        ([], ["train.fuse_grad_update: False -> True"])  # the same sums: a resume may change it
    fp32 = {"train": {"precision": "fp32"}}  # no bf16 gradients to fuse
    assert ckpt.config_differences(fp32, {"train": {"precision": "fp32", "fuse_grad_update": True}}) == ([], [])


def test_a_checkpoint_from_before_shuffle_windows_names_its_one_shard_window():
    old = {"data": {"seed": 1}}
    assert ckpt.config_differences(old, {"data": {"seed": 1, "shuffle_window": 1}}) == ([], [])
    assert ckpt.config_differences(old, {"data": {"seed": 1, "shuffle_window": 4}}) == \
        ([], ["data.shuffle_window: 1 -> 4"])
    unshuffled = {"data": {"seed": 1, "shuffle": False}}  # read a shard at a time whatever the window
    assert ckpt.config_differences(unshuffled, {"data": {**unshuffled["data"], "shuffle_window": 4}}) == ([], [])


def test_a_checkpoint_from_before_sample_judge_resumes_without_a_changed_setting():
    old = {"sample": {"num_samples": 4}}
    assert ckpt.config_differences(old, {"sample": {"num_samples": 4, "judge": ""}}) == ([], [])
    assert ckpt.config_differences(old, {"sample": {"num_samples": 4, "judge": "/runs/ar"}}) == \
        ([], ["sample.judge:  -> /runs/ar"])
