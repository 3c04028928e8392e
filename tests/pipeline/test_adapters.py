from __future__ import annotations

import os

import pytest
import torch
from torch.nn.attention import SDPBackend

from model.config import model_config
from model.mdlm import build_model
from pipeline.adapters import apply_activation_checkpointing, attention_backend, compile_blocks, plain_name
from pipeline.configtools import ConfigError


def pair():
    torch.manual_seed(0)
    cfg = model_config("mdlm-tiny", vocab_size=33, dropout=0.0, n_layers=3)
    a = build_model(cfg)
    b = build_model(cfg)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for m in (a, b):
            m.backbone.final.linear.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return a, b


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    plain, ckpt = pair()
    assert apply_activation_checkpointing(ckpt) == 3
    assert set(ckpt.state_dict()) == set(plain.state_dict())  # checkpoints stay interchangeable
    x = torch.randint(0, 32, (2, 24))
    t = torch.tensor([0.3, 0.8])
    u = torch.rand(2, 24, generator=torch.Generator().manual_seed(2))
    la, lb = plain(x, t, noise=u).loss, ckpt(x, t, noise=u).loss
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb)
    grads = {plain_name(n): p.grad for n, p in ckpt.named_parameters()}
    for n, p in plain.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_compiled_blocks_keep_state_dict_keys():
    plain, compiled = pair()
    assert compile_blocks(compiled) == 3
    assert set(compiled.state_dict()) == set(plain.state_dict())
    assert {plain_name(n) for n, _ in compiled.named_parameters()} == {n for n, _ in plain.named_parameters()}


def test_compiled_blocks_under_zero3_train_like_eager_without_recompiles(markov_data, tmp_path):
    """ZeRO-3 gathers parameters in module hooks; compiled blocks must not trace them (dynamo then
    recompiled per block until its cache limit and ran eager). The blocks are ZeRO-3 leaves and
    only their forward is compiled: no recompile, no graph break, the eager run's losses."""
    from .conftest import logged_losses, run_single

    common = ("train.max_steps=6", "train.log_every=1", "train.checkpoint_every=0", "train.zero_stage=3",
              "tracking.enabled=false", "eval.max_batches=1", "sample.num_samples=1", "sample.steps=4")
    eager = run_single(tmp_path / "eager", markov_data, *common)
    # (a CPU has no cuDNN attention: the preference must change nothing there, and say so)
    compiled = run_single(tmp_path / "compiled", markov_data, *common, "train.compile=true",
                          "train.attention_backend=cudnn", env_extra={"TORCH_LOGS": "recompiles,graph_breaks,guards"})
    text = compiled.stdout + compiled.stderr
    assert "train.attention_backend=cudnn selects among GPU attention kernels; on cpu it changes nothing" in text
    assert "GUARDS:" in text  # dynamo did compile (one graph serves every block)
    assert "Recompiling" not in text and "Graph break" not in text, text[-3000:]
    ref, got = logged_losses(eager.stdout + eager.stderr), logged_losses(text)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    assert all(abs(float(got[s]) - float(ref[s])) <= 2e-4 for s in ref), (got, ref)


def sdpa_state():
    enabled = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
               torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())
    return torch._C._get_sdp_priority_order(), enabled


@pytest.mark.parametrize("name, first", [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                                         ("efficient", SDPBackend.EFFICIENT_ATTENTION)])
def test_attention_backend_prefers_one_kernel_and_keeps_the_others_as_fallbacks(name, first):
    before = sdpa_state()
    with attention_backend(name):
        order, enabled = sdpa_state()
        # the preferred kernel first, the others in torch's own order behind it
        assert order == [int(first)] + [b for b in before[0] if b != int(first)]
        assert all(enabled)  # shapes the preferred kernel cannot serve still find one
        # compiled graphs traced under another preference are not taken from the compile cache
        assert torch.compiler.config.cache_key_tag == f"sdpa-{name}"
        q = torch.randn(2, 4, 16, 8, requires_grad=True)
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
        assert q.grad is not None
    assert sdpa_state() == before and torch.compiler.config.cache_key_tag == ""


def test_attention_backend_default_changes_nothing_and_unknown_names_are_refused():
    before = sdpa_state()
    with attention_backend("default"):
        assert sdpa_state() == before
    with pytest.raises(ConfigError, match="attention backend 'fa3' is not one of default, cudnn, flash, efficient"):
        with attention_backend("fa3"):
            pass
    assert sdpa_state() == before


def fused_grad_update_worker(rank: int, size: int, port: int, queue):
    """Two real ZeRO-1 engines with bf16 weights and fp32 gradients (DeepSpeed's BF16_Optimizer),
    one with the fused gradient update, over 2 gloo ranks and 3 micro-batches per step."""
    import deepspeed
    import torch.distributed as dist
    from torch import nn
    from torch.utils._python_dispatch import TorchDispatchMode

    from pipeline.adapters import fuse_bf16_grad_update

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(size))
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        def engine(**bf16):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
            config = {"train_batch_size": 3 * 2 * size, "train_micro_batch_size_per_gpu": 2,
                      "gradient_clipping": 1.0, "bf16": {"enabled": True, **bf16},
                      "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}
            return deepspeed.initialize(model=model, config=config,
                                        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))[0]

        stock, fused = engine(), engine()
        initial = [p.detach().clone() for p in stock.module.parameters()]
        assert type(fused.optimizer).__name__ == "BF16_Optimizer"
        applied = fuse_bf16_grad_update(fused)
        immediate_applied = fuse_bf16_grad_update(engine(immediate_grad_update=True))
        g = torch.Generator().manual_seed(rank)
        losses, grads_equal, lp_grads_left, ops = {"stock": [], "fused": []}, [], [], {}
        for micro in range(6):
            x = torch.randn(2, 16, generator=g).to(torch.bfloat16)
            for name, e in (("stock", stock), ("fused", fused)):
                loss = e(x).float().pow(2).mean()
                with CountOps() as counted:
                    e.backward(loss)
                if micro == 1:
                    ops[name] = counted.names
                losses[name].append(loss.item())
            grads_equal.append(all(torch.equal(a, b) for a, b in zip(stock.optimizer.fp32_groups_gradients_flat,
                                                                  fused.optimizer.fp32_groups_gradients_flat)))
            lp_grads_left.append(sum(p.grad is not None for p in fused.module.parameters()))
            stock.step()
            fused.step()
        weights_equal = all(torch.equal(a, b) for a, b in zip(stock.module.parameters(), fused.module.parameters()))
        weights_moved = all(not torch.equal(a, b) for a, b in zip(initial, fused.module.parameters()))
        masters_equal = all(torch.equal(a, b) for a, b in zip(stock.optimizer.fp32_groups_flat_partition,
                                                              fused.optimizer.fp32_groups_flat_partition))
        queue.put((rank, applied, immediate_applied, losses, grads_equal, lp_grads_left, weights_equal and weights_moved,
                   masters_equal,
                   {name: {op: names.count(op) for op in set(names)} for name, names in ops.items()}))
    finally:
        dist.destroy_process_group()


def test_the_fused_gradient_update_matches_deepspeeds_bit_for_bit_with_fewer_ops():
    from .conftest import run_two_ranks

    for rank, applied, immediate_applied, losses, grads_equal, lp_grads_left, weights_equal, masters_equal, ops in \
            run_two_ranks(fused_grad_update_worker, timeout=300):
        assert applied and not immediate_applied  # immediate_grad_update's hooks keep DeepSpeed's update
        assert losses["fused"] == losses["stock"] and losses["stock"][5] != losses["stock"][0]
        assert grads_equal == [True] * 6          # the fp32 sums after every micro-batch
        assert lp_grads_left == [0] * 6           # the bf16 gradients are not kept
        assert weights_equal and masters_equal    # after 2 optimizer steps over 2 ranks, both moved
        print(f"rank {rank} aten ops per backward: stock {ops['stock']}, fused {ops['fused']}")
        # dispatched ops (a foreach op counts once; on a GPU its mixed-dtype lists run one add per
        # tensor): DeepSpeed's zero fill before the backward, autograd's add into it, a cast and an
        # add per parameter after it; fused, one foreach add
        assert ops["fused"].get("_foreach_add_") == 1 and "_foreach_zero_" not in ops["fused"]
        assert ops["stock"].get("_foreach_zero_") == 1 and ops["stock"].get("_to_copy", 0) >= 4
        assert sum(ops["fused"].values()) < sum(ops["stock"].values()) - 8
