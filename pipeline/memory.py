"""Memory per GPU of an MDLM training run: tensor parallel x ZeRO stage x micro-batch.

    python -m pipeline.memory --preset mdlm-8b --tensor 4 --zero-stage 3 --micro-batch 4 \\
        --seq-len 1024 --gpus 64 [--precision bf16] [--vocab 50258] [--activation-checkpointing]

Model states (bytes per parameter held by this GPU, AdamW, as the trainer runs DeepSpeed):
  bf16/fp8:   weights 2, gradients 4 (train.grad_precision=fp32 at ZeRO 2-3; at ZeRO-1 BF16_Optimizer's
              fp32 buffer, plus the bf16 gradients: held through the forward, 2 more, with
              train.fuse_grad_update=false; fused, only made during the backward as it frees
              activations, so counted where they outgrow them; 2 with grad_precision=bf16 or ZeRO-0),
              optimizer 12 (fp32 master copy + Adam m and v)
  bf16-mixed: weights 4, gradients 4, optimizer 12 with ZeRO-1/2 (their fp32 partition copy +
              Adam m and v), 8 with ZeRO-0/3; activations are bf16 as with bf16
  fp32:       as bf16-mixed, activations fp32
  EMA:        4 (fp32 copy of this rank's tensor-parallel shard; ZeRO 1-3 partition it over the
              data-parallel group like the optimizer states, ZeRO-0 keeps it whole on every rank)
Tensor parallelism splits the block projections, the embedding and the output head over TP
ranks (vocabulary padded to a multiple of TP, of 128 x TP for the head); norms, adaLN and the
timestep MLP are replicated.
ZeRO splits over the data-parallel group D = gpus / TP: stage 1 the optimizer states, stage 2
also the gradients, stage 3 also the weights.

Activations kept for backward, one micro-batch of T = b * s tokens, counted for this DiT as
autograd keeps them (checked against the tensors autograd saves on CPU, tests/pipeline/
test_tp_memory.py), per block in units of T*d elements:
  replicated on every TP rank: the 2 LayerNorm inputs (fp32: LayerNormFP32 upcasts), the 2 norm
    outputs and 2 modulated outputs (adaLN), the 2 branch outputs the gates multiply, and with
    dropout the 2 dropout masks (at activation width);
  split over TP (/t): the qkv output (3), rotated q and k (2), the attention output and its
    head-merged copy (2; scaled_dot_product_attention keeps no L x L score matrix), the MLP's
    4d-wide input and GELU output (8) = 15.
So per block 8 fp32 + 6 (8 with dropout) + 15/t elements at the activation width: the analogue of
Korthikanti et al. 2022's s*b*h*(10 + 24/t) without its attention-score term. The output head
adds the fp32 log-softmax of the gathered logits (4*T*V bytes: logits are gathered over TP, see
model/tensor_parallel.py) and the final norm's input and outputs. MDLM computes logits at masked
positions only, half of T on average, but the micro-batch that holds the highest times masks
nearly all of its tokens, so the peak is counted with all T. With activation checkpointing
each block keeps only its input (T*d) plus one block's activations during its recompute.
Framework buffers, fragmentation and communication buffers are not counted (add ~10-20%).
Measured on one H200 (mdlm-1b, compiled blocks, ZeRO-1 on one GPU, dropout 0, no EMA;
bench/gpu/README.md): peak allocated 38.5 / 53.3 / 83.1 GiB at micro-batch 8 / 16 / 32 x 1024
against 40.5 / 57.8 / 92.3 estimated here for that unfused gradient update (the activation
term's slope is ~14% above the measured one, with compiled blocks): the estimate stays above the
peak, buffers included. With train.fuse_grad_update (the default since) it estimates 38.2 / 55.4 /
90.0 against 51.2 / 81.0 GiB measured at micro-batch 16 / 32 (x accumulation 4).
FP8 (torchao) is estimated as bf16, an upper bound: its linears keep their inputs for backward in
FP8, and the same runs measured 42.4 / 63.5 GiB at micro-batch 16 / 32.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

from model.config import ModelConfig, model_config
from model.layers import HEAD_MULTIPLE
from pipeline.configtools import ConfigError

GIB = 2**30
TIMESTEP_FREQ_DIM = 256  # model/dit.py TimestepEmbedder


def _pad(v: int, multiple: int) -> int:
    return -(-v // multiple) * multiple


def parameter_split(cfg: ModelConfig, tensor: int = 1) -> dict:
    """Parameters of the MDLM (adaptive DiT) by how TP treats them: {'sharded_full': count of the
    plain model's parameters that are split, 'sharded_local': their count on one TP rank (with
    the vocabulary padding), 'replicated': the rest, 'total': the plain model's count}."""
    d, c, n, v, r = cfg.d_model, cfg.cond_dim, cfg.n_layers, cfg.vocab_size, cfg.mlp_ratio
    adaptive = cfg.objective == "mdlm"
    per_block_split = 3 * d * d + d * d + (d * r * d + r * d) + r * d * d   # qkv, out, mlp_in (+bias), mlp_out
    per_block_repl = d + 2 * d + (c * 6 * d + 6 * d if adaptive else 0)  # mlp_out bias, 2 norms, adaLN
    ve = _pad(v, tensor)
    vh = _pad(v, HEAD_MULTIPLE * tensor) if tensor > 1 else v   # model/tensor_parallel.py
    head_split_full = v * d + v * d + v                                       # embedding, output weight + bias
    head_split_local = (ve * d + vh * d + vh) // tensor
    final_repl = d + ((c * 2 * d + 2 * d) if adaptive else 0)                   # final norm + adaLN
    sigma = (TIMESTEP_FREQ_DIM * c + c + c * c + c) if adaptive else 0
    sharded_full = n * per_block_split + head_split_full
    sharded_local = n * per_block_split // tensor + head_split_local
    replicated = n * per_block_repl + final_repl + sigma
    return {"sharded_full": sharded_full, "sharded_local": sharded_local, "replicated": replicated,
            "total": sharded_full + replicated, "local": sharded_local + replicated}


@dataclass
class MemoryEstimate:
    preset: str
    params_total: int
    params_per_gpu: int          # this TP rank's parameters (before ZeRO)
    tensor: int
    data: int
    zero_stage: int
    micro_batch: int
    seq_len: int
    precision: str
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    ema_gib: float
    activations_gib: float
    total_gib: float
    # evaluation and sampling build the whole plain model in fp32 on every rank (TP gathered) while
    # the training states stay resident; the activations of training are freed by then
    eval_model_gib: float = 0.0
    eval_peak_gib: float = 0.0


def estimate(cfg: ModelConfig, tensor: int, zero_stage: int, micro_batch: int, seq_len: int, gpus: int,
             precision: str = "bf16", ema: bool = True, activation_checkpointing: bool = False,
             grad_precision: str = "fp32", fuse_grad_update: bool = True) -> MemoryEstimate:
    if gpus % tensor:
        raise ValueError(f"--tensor {tensor} must divide --gpus {gpus}")
    if cfg.n_heads % tensor:
        raise ValueError(f"--tensor {tensor} must divide the {cfg.n_heads} attention heads")
    data = gpus // tensor
    split = parameter_split(cfg, tensor)
    p = split["local"]
    half = precision in ("bf16", "fp8")
    # the optimizer holds an fp32 master copy whenever weights are bf16; ZeRO-1/2 also copy fp32
    # weights' partitions, ZeRO-3 updates fp32 partitions in place
    w_bytes, g_bytes = (2, 2) if half else (4, 4)
    zero1_bf16_grads = half and grad_precision == "fp32" and zero_stage == 1
    if half and grad_precision == "fp32" and zero_stage >= 1:
        # accumulated in fp32; ZeRO-1 (BF16_Optimizer) keeps a whole fp32 buffer next to the
        # bf16 gradients each backward produces (kept between micro-batches unless fused)
        g_bytes = 6 if zero1_bf16_grads and not fuse_grad_update else 4
    o_bytes = 12 if half or zero_stage in (1, 2) else 8
    weights = p * w_bytes / (data if zero_stage >= 3 else 1)
    grads = p * g_bytes / (data if zero_stage >= 2 else 1)
    optimizer = p * o_bytes / (data if zero_stage >= 1 else 1)
    ema_bytes = p * 4 / (data if zero_stage >= 1 else 1) if ema else 0
    act = activation_bytes(cfg, tensor, micro_batch, seq_len, 4 if precision == "fp32" else 2,
                           activation_checkpointing)
    if zero1_bf16_grads and fuse_grad_update:
        # the backward frees activations as it makes the bf16 gradients: they add to the peak
        # only where they outgrow the activations (small micro-batches)
        grads += max(0.0, p * 2 - act)
    total = weights + grads + optimizer + ema_bytes + act
    eval_model = split["total"] * 4
    return MemoryEstimate(cfg.preset, split["total"], p, tensor, data, zero_stage, micro_batch, seq_len,
                          precision, weights / GIB, grads / GIB, optimizer / GIB, ema_bytes / GIB, act / GIB,
                          total / GIB, eval_model / GIB, (total - act + eval_model) / GIB)


def activation_bytes(cfg: ModelConfig, tensor: int, micro_batch: int, seq_len: int, act_bytes: int = 2,
                     activation_checkpointing: bool = False) -> float:
    """Bytes of activations kept for backward for one micro-batch (see the module docstring)."""
    t_tok, d, v, a = micro_batch * seq_len, cfg.d_model, cfg.vocab_size, act_bytes
    td = t_tok * d
    replicated = 2 * 4 * td + 6 * a * td + (2 * a * td if cfg.dropout > 0 else 0)
    split = 15 * a * td / tensor
    per_layer = replicated + split
    head = 4 * t_tok * v + 4 * td + 2 * a * td
    if activation_checkpointing:
        return cfg.n_layers * a * td + per_layer + head
    return cfg.n_layers * per_layer + head


def format_table(est: MemoryEstimate) -> str:
    rows = [("weights", est.weights_gib), ("gradients", est.grads_gib), ("optimizer states", est.optimizer_gib),
            ("EMA (fp32)", est.ema_gib), ("activations", est.activations_gib), ("total", est.total_gib)]
    head = (f"{est.preset}: {est.params_total / 1e9:.2f}B parameters, {est.params_per_gpu / 1e9:.3f}B per TP rank; "
            f"TP={est.tensor} x DP={est.data}, ZeRO-{est.zero_stage}, micro-batch {est.micro_batch} x "
            f"{est.seq_len} tokens, {est.precision}")
    evaluation = (f"  at evaluation: the training states plus the whole model in fp32 ({est.eval_model_gib:.2f} GiB) "
                  f"= {est.eval_peak_gib:.2f} GiB, before evaluation activations")
    return "\n".join([head] + [f"  {name:<17}{gib:10.2f} GiB" for name, gib in rows] + [evaluation])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Per-GPU memory of MDLM training (TP x ZeRO x micro-batch)")
    ap.add_argument("--preset", default="mdlm-8b")
    ap.add_argument("--vocab", type=int, default=50258)
    ap.add_argument("--tensor", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--precision", default="bf16", choices=("bf16", "bf16-mixed", "fp8", "fp32"))
    ap.add_argument("--dropout", type=float, default=None, help="default: the preset's (0.1)")
    ap.add_argument("--grad-precision", default="fp32", choices=("fp32", "bf16"),
                    help="train.grad_precision (bf16/fp8 weights only)")
    ap.add_argument("--no-fuse-grad-update", action="store_true",
                    help="train.fuse_grad_update=false (ZeRO-1 with fp32 gradients: bf16 gradients kept)")
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    overrides = {"vocab_size": args.vocab}
    if args.dropout is not None:
        overrides["dropout"] = args.dropout
    try:
        cfg = model_config(args.preset, **overrides)
        est = estimate(cfg, args.tensor, args.zero_stage, args.micro_batch, args.seq_len, args.gpus,
                       args.precision, not args.no_ema, args.activation_checkpointing, args.grad_precision,
                       not args.no_fuse_grad_update)
    except (ValueError, ConfigError) as err:
        print(f"memory: {err}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(est), indent=2) if args.json else format_table(est))
    return 0


if __name__ == "__main__":
    sys.exit(main())
