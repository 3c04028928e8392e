"""Training throughput, side by side in one process: a plain PyTorch step against the project's
DeepSpeed step (and FP8 variants), same model, same micro-batch, same data.

GPU (one H100/H200):
    python bench/train_throughput.py --preset mdlm-1b --micro-batch 8 --seq-len 1024 --compile \
        --modes plain,deepspeed,deepspeed-fp8 [--data DIR --loss-steps 200]
CPU smoke run (tiny preset):
    python bench/train_throughput.py --preset mdlm-tiny --device cpu --micro-batch 4 --seq-len 64 \
        --steps 3 --warmup 1 --precision fp32

Prints tokens/s, MFU (6N + 12 L d S FLOPs per token, pipeline/metrics.py), peak memory and the
ratio of each mode to the plain step; writes the figures as JSON (--output).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.config import model_config  # noqa: E402
from model.layers import TorchLayers  # noqa: E402
from model.mdlm import build_model  # noqa: E402
from model.noise import stratified_times  # noqa: E402
from pipeline import metrics  # noqa: E402
from pipeline.adapters import attention_backend, compile_blocks, zero3_leaf_blocks  # noqa: E402
from pipeline.config import RunConfig  # noqa: E402
from pipeline.precision import FP8Config, apply_fp8, te_autocast  # noqa: E402
from pipeline.trainer import lr_lambda, make_engine, param_groups  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mdlm-1b")
    p.add_argument("--vocab-size", type=int, default=50258)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, autotune)")
    p.add_argument("--modes", default="plain,deepspeed",
                   help="comma list of plain or deepspeed (bf16 weights, fp32 master), each with optional "
                        "suffixes: -fp8 (with -rowwise or -rowwisegw: torchao's rowwise or rowwise_with_gw_hp "
                        "recipe instead of --fp8-recipe), -full (the output head on every position, not only the masked "
                        "ones), -cudnn (cuDNN's fused attention preferred: train.attention_backend=cudnn), "
                        "-unaligned (the output head's matmuls on its unpadded weight, as before "
                        "model/layers.py padded it), "
                        "and for deepspeed -bf16grad (gradients accumulated and reduced in bf16, not fp32) "
                        "or -mixed (fp32 weights under autocast) or -immediate (DeepSpeed's "
                        "bf16.immediate_grad_update: fp32 gradients accumulated in the backward hooks, "
                        "not after the backward) or -unfused (DeepSpeed's own update of the fp32 gradients "
                        "after each backward, not train.fuse_grad_update's foreach add); e.g. deepspeed-fp8-cudnn")
    p.add_argument("--zero-stage", type=int, default=1, help="default: that of configs/train/mdlm-1b-h100.yaml")
    p.add_argument("--ds-config", default="",
                   help="DeepSpeed JSON merged under the generated config (default: configs/deepspeed/"
                        "zero<stage>.json, as the training configs use; 'none' for DeepSpeed's defaults)")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--fp8-backend", default="torchao", choices=("torchao", "te"))
    p.add_argument("--fp8-recipe", default="", help="default: tensorwise (torchao) / delayed (te)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile each block")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", default="", help="a data_prep dir: train on real text instead of random ids")
    p.add_argument("--loss-steps", type=int, default=0, help="also train this many steps per mode and report the loss")
    p.add_argument("--lr-warmup", type=int, default=50,
                   help="linear LR warmup steps (to 3e-4): a 1B model trained from scratch at full LR can spike")
    p.add_argument("--profile", type=int, default=0,
                   help="also profile this many steps per mode and print where the device time goes")
    p.add_argument("--output", default="", help="write the figures as JSON here")
    return p.parse_args(argv)


def batch_source(args, vocab: int, device):
    if args.data:
        from pipeline.data import ShardStream, batches, load_manifest

        manifest = load_manifest(args.data)
        if int(manifest["seq_len"]) != args.seq_len or int(manifest["model_vocab_size"]) > vocab:
            raise SystemExit(f"--data {args.data} holds seq_len {manifest['seq_len']} and vocab "
                             f"{manifest['model_vocab_size']}: pass --seq-len {manifest['seq_len']} and a "
                             f"--vocab-size of at least {manifest['model_vocab_size']}")
        available = sum(int(shard["samples"]) for shard in manifest["splits"]["train"]["shards"])
        wanted = (args.warmup + args.steps + args.loss_steps) * args.grad_accum * args.micro_batch
        if wanted > available:
            print(f"warning: a mode trains on {wanted} sequences but {args.data} holds {available}: the last "
                  f"{wanted - available} repeat (the loss is then partly on seen text)", file=sys.stderr)
        stream = batches(ShardStream(args.data, "train", seed=0), args.micro_batch)
        while True:
            yield next(stream)[0].to(device)
    gen = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, vocab - 1, (args.micro_batch, args.seq_len), generator=gen).to(device)


def noise(step: int, n: int, seq_len: int, device):
    gen = torch.Generator().manual_seed(step)
    return stratified_times(n, 1e-3, gen).to(device), torch.rand(n, seq_len, generator=gen).to(device)


def step_inputs(args, data, seed: int, device) -> list[tuple]:
    """A step's micro-batches: (tokens, times, mask uniforms) each, the same in every mode."""
    return [(next(data), *noise(seed * 1000 + micro, args.micro_batch, args.seq_len, device))
            for micro in range(args.grad_accum)]


def run_config(args, cfg_model) -> RunConfig:
    cfg = RunConfig()
    cfg.model = cfg_model
    cfg.data.micro_batch_size = args.micro_batch
    cfg.train.global_batch_size = args.micro_batch * args.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
    cfg.train.zero_stage = args.zero_stage
    default = Path(__file__).resolve().parents[1] / f"configs/deepspeed/zero{args.zero_stage}.json"
    if args.ds_config != "none":  # a path that does not exist fails in build_deepspeed_config
        cfg.train.deepspeed_config = args.ds_config or (str(default) if default.is_file() else "")
    cfg.train.precision = args.precision
    cfg.optim.warmup_steps = args.lr_warmup
    return cfg


MODE_FLAGS = {"plain": {"fp8", "rowwise", "rowwisegw", "full", "cudnn", "unaligned"},
              "deepspeed": {"fp8", "rowwise", "rowwisegw", "full", "cudnn", "unaligned", "bf16grad", "mixed",
                            "immediate", "unfused"}}
# torchao recipes by mode flag; -fp8 alone takes --fp8-recipe
FP8_RECIPE_FLAGS = {"rowwise": "rowwise", "rowwisegw": "rowwise_with_gw_hp"}


def mode_parts(mode: str) -> tuple[str, set]:
    """'deepspeed-fp8-cudnn' -> ('deepspeed', {'fp8', 'cudnn'})."""
    kind, *flags = mode.split("-")
    if kind not in MODE_FLAGS or not set(flags) <= MODE_FLAGS[kind] or len(set(flags)) < len(flags):
        raise ValueError(f"unknown mode '{mode}': plain with -fp8[-rowwise|-rowwisegw]/-full/-cudnn/-unaligned, or "
                         f"deepspeed with those "
                         f"or -bf16grad/-mixed/-immediate/-unfused (see --help)")
    if {"fp8", "mixed"} <= set(flags):
        raise ValueError(f"mode '{mode}': -fp8 and -mixed exclude each other")
    recipes = set(flags) & set(FP8_RECIPE_FLAGS)
    if recipes and ("fp8" not in flags or len(recipes) > 1):
        raise ValueError(f"mode '{mode}': -rowwise and -rowwisegw pick one torchao recipe for -fp8: "
                         f"write e.g. deepspeed-fp8-rowwise")
    update = set(flags) & {"immediate", "unfused", "bf16grad", "mixed"}
    if len(update) > 1 and update & {"immediate", "unfused"}:
        raise ValueError(f"mode '{mode}': {' and '.join('-' + f for f in sorted(update))} exclude each other "
                         f"(-immediate and -unfused change how DeepSpeed's BF16_Optimizer, for bf16 weights with "
                         f"fp32 gradients, updates the gradients; -bf16grad and -mixed do not use it)")
    return kind, set(flags)


def build(args, mode: str, device):
    kind, flags = mode_parts(mode)
    torch.manual_seed(0)
    cfg_model = model_config(args.preset, vocab_size=args.vocab_size, dropout=0.0,
                             masked_logits_only="full" not in flags)
    model = build_model(cfg_model, TorchLayers(head_multiple=1) if "unaligned" in flags else None)
    recipe = next((FP8_RECIPE_FLAGS[f] for f in sorted(flags) if f in FP8_RECIPE_FLAGS), args.fp8_recipe)
    if recipe != args.fp8_recipe and args.fp8_backend != "torchao":
        raise ValueError(f"mode '{mode}': -rowwise/-rowwisegw are torchao recipes; --fp8-backend is {args.fp8_backend}")
    fp8 = FP8Config(backend=args.fp8_backend,
                    recipe=recipe or ("tensorwise" if args.fp8_backend == "torchao" else "delayed"))
    if "fp8" in flags:
        apply_fp8(model, fp8)
    if args.compile:
        compile_blocks(model)
        if kind == "deepspeed" and args.zero_stage == 3:
            zero3_leaf_blocks(model)
    context = (lambda: te_autocast(fp8)) if "fp8" in flags else contextlib.nullcontext
    bf16 = args.precision == "bf16" or "fp8" in flags
    if kind == "deepspeed":
        cfg = run_config(args, cfg_model)
        if "fp8" in flags:
            cfg.train.precision = "bf16"
        if "mixed" in flags:
            cfg.train.precision = "bf16-mixed" if args.precision == "bf16" else "fp32"
        if "bf16grad" in flags:
            cfg.train.grad_precision = "bf16"
        if "unfused" in flags:  # DeepSpeed's own per-parameter update of the fp32 gradients
            cfg.train.fuse_grad_update = False
        if "immediate" in flags:  # BF16_Optimizer: fp32 gradients updated in the backward hooks
            ds_json = json.loads(Path(cfg.train.deepspeed_config).read_text()) if cfg.train.deepspeed_config else {}
            ds_json.setdefault("bf16", {})["immediate_grad_update"] = True
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(ds_json, f)
            cfg.train.deepspeed_config = f.name
        try:
            engine, _ = make_engine(model, cfg, int(os.environ.get("WORLD_SIZE", "1")), device)
        finally:
            if "immediate" in flags:
                os.unlink(cfg.train.deepspeed_config)

        def step(micro_batches):
            losses = []
            for x0, t, u in micro_batches:
                with context():
                    out = engine(x0, t, noise=u)
                engine.backward(out.loss)
                engine.step()
                losses.append(out.loss.detach())
            return torch.stack(losses).mean()

        return model, step, engine
    model.to(device)  # fp32 weights, bf16 autocast: the plain PyTorch recipe
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=3e-4, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(run_config(args, cfg_model)))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(micro_batches):
        losses = []
        for x0, t, u in micro_batches:
            with amp, context():
                out = model(x0, t, noise=u)
            (out.loss / args.grad_accum).backward()
            losses.append(out.loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return torch.stack(losses).mean()

    return model, step, None


_traced_attention_backend = None


def measure(args, mode: str, device) -> dict:
    global _traced_attention_backend
    backend = "cudnn" if "cudnn" in mode_parts(mode)[1] else "default"
    # compiled graphs keep the attention kernel they were traced with, and a later mode's blocks
    # would reuse them: trace again where the preference changes
    if args.compile and _traced_attention_backend not in (None, backend):
        torch._dynamo.reset()
    _traced_attention_backend = backend
    with attention_backend(backend):
        model, step, engine = build(args, mode, device)
        try:
            return _measure(args, mode, device, model, step)
        finally:
            if engine is not None:  # DeepSpeed's hooks keep an engine (weights, optimizer) alive otherwise
                engine.destroy()
            del model, step, engine
            free_mode_state(device)


def free_mode_state(device) -> None:
    if "transformer_engine.pytorch" in sys.modules:  # its global amax buffers hold this mode's modules
        try:
            from transformer_engine.pytorch.quantization import FP8GlobalStateManager
        except ImportError:  # TE < 2.9
            from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
        FP8GlobalStateManager.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(args, mode: str, device, model, step) -> dict:
    flops_tok = metrics.model_flops_per_token(model.cfg, metrics.matmul_params(model), args.seq_len,
                                              metrics.conditioning_params(model))
    data = batch_source(args, model.cfg.vocab_size, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        step(step_inputs(args, data, i, device))
    sync()
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(step_inputs(args, data, args.warmup + i, device))
    sync()
    elapsed = time.perf_counter() - start
    tokens = args.steps * args.grad_accum * args.micro_batch * args.seq_len
    tps = tokens / elapsed
    peak = metrics.peak_flops(device)
    result = {"mode": mode, "tokens_per_s": tps, "step_ms": 1000 * elapsed / args.steps,
              "model_tflops": tps * flops_tok / 1e12, "mfu": tps * flops_tok / peak if peak else None,
              "mem_gb": metrics.memory_gb(device), "last_loss": float(loss.detach())}
    if args.loss_steps:
        losses = []
        for i in range(args.loss_steps):
            losses.append(float(step(step_inputs(args, data, 10_000 + i, device))))
        tail = losses[-max(1, args.loss_steps // 10):]
        result["loss_after"] = {"steps": args.warmup + args.steps + args.loss_steps, "mean_last_10pct": sum(tail) / len(tail)}
    if args.profile:
        result["profile"] = profile_steps(args, device, step, data)
    return result


# Where a step's device time goes, by kernel name (GPU) or operator name (CPU); first match wins.
# Attention comes first: flash kernels carry cutlass types in their template arguments; then
# Inductor's kernels, whose names list the fused ops (triton_poi_fused__scaled_mm_... is a cast).
# cuBLAS names FP8 GEMMs nvjet_sm90_qqtst_... / _qrtst_... (e4m3 x e4m3, e4m3 x e5m2), bf16 nvjet_sm90_tst_...
TIME_CATEGORIES = (
    ("attention", r"pytorch_flash|flash_fwd|flash_bwd|fmha|sdpa|attention|scaled_dot_product"),
    ("compiled (triton)", r"triton(?!_tem)"),  # triton_tem_*: Inductor's matmul templates (max-autotune)
    ("fp8 matmul", r"nvjet_(sm\d+a?_)?[qr][qr]|(gemm|xmma|cutlass).*(e4m3|e5m2)|f8f8|scaled_mm"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|triton_tem|aten::(mm|addmm|bmm|matmul|linear)$"),
    ("grad norm", r"lpnorm|l2norm|norm_reduce|clip_grad"),  # the clip's foreach norm is no optimizer time
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("communication", r"nccl|all_?reduce|reduce_scatter|all_?gather|broadcast"),
    ("fp8 casts (eager)", r"e4m3|e5m2|float8"),
    ("copy/fill", r"memcpy|memset|copy_kernel|FillFunctor|aten::copy_|aten::fill_|aten::zero_"),
)


def time_category(name: str) -> str:
    for category, pattern in TIME_CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return category
    return "other"


def profile_breakdown(events, steps: int, wall_s: float, on_device: bool) -> dict:
    """Self time per step of each category and of the top names, from torch.profiler's
    key_averages(); on a GPU only kernels count (device time), on a CPU the operators' self time."""
    per_name = {}
    for e in events:
        if getattr(e, "is_user_annotation", False):  # record_function spans: their kernels count already
            continue
        if on_device:
            if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
                continue
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us
        else:
            us = e.self_cpu_time_total
        if us > 0:
            total, count = per_name.get(e.key, (0.0, 0))
            per_name[e.key] = (total + us, count + e.count)
    busy_ms = sum(us for us, _ in per_name.values()) / 1000 / steps
    categories = {}
    for name, (us, _) in per_name.items():
        category = time_category(name)
        categories[category] = categories.get(category, 0.0) + us / 1000 / steps
    top = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:12]
    return {"steps": steps, "counted": "kernels" if on_device else "operators", "wall_ms_per_step": 1000 * wall_s / steps, "busy_ms_per_step": busy_ms,
            "categories_ms_per_step": dict(sorted(categories.items(), key=lambda kv: -kv[1])),
            "top_ms_per_step": [[name[:120], us / 1000 / steps, count // steps] for name, (us, count) in top]}


def profile_steps(args, device, step, data) -> dict:
    from torch.profiler import ProfilerActivity, profile

    on_device = device.type == "cuda"
    sync = torch.cuda.synchronize if on_device else (lambda: None)
    sync()
    # kernels are recorded with their launching CPU ops, as the profiler is normally run
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_device else [ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(args.profile):
            step(step_inputs(args, data, 20_000 + i, device))
        sync()
        wall = time.perf_counter() - start
    return profile_breakdown(prof.key_averages(), args.profile, wall, on_device)


def print_profile_change(mode: str, base_mode: str, p: dict, ref: dict) -> None:
    """Per category, the device time a mode adds or saves per step against its base mode (e.g.
    what FP8 saves in matmuls and spends in casts)."""
    mine, theirs = p["categories_ms_per_step"], ref["categories_ms_per_step"]
    print(f"  device ms per step, {mode} minus {base_mode}: "
          f"{p['busy_ms_per_step'] - ref['busy_ms_per_step']:+.1f} in all")
    for category in sorted(set(mine) | set(theirs), key=lambda c: mine.get(c, 0) - theirs.get(c, 0)):
        print(f"    {category:<20}{mine.get(category, 0.0) - theirs.get(category, 0.0):>+9.2f} ms")


def print_profile(mode: str, p: dict) -> None:
    print(f"{mode}: {p['wall_ms_per_step']:.1f} ms per step under the profiler, device busy "
          f"{p['busy_ms_per_step']:.1f} ms ({p['busy_ms_per_step'] / p['wall_ms_per_step']:.0%})")
    for category, ms in p["categories_ms_per_step"].items():
        print(f"  {category:<20}{ms:>9.2f} ms {ms / p['busy_ms_per_step']:>6.1%}")
    print(f"  top {p['counted']}:")
    for name, ms, count in p["top_ms_per_step"]:
        print(f"    {ms:>8.2f} ms {count:>5}x  {name}")


def write_figures(path: str, device_name: str, args, results: list, failed: list) -> None:
    if path:
        Path(path).write_text(json.dumps({"device": device_name, "args": vars(args), "results": results,
                                          "failed": failed}, indent=2))


def print_row(r: dict, base: dict | None) -> None:
    """base: the mode the ratio column is against, None while it is still to run ("-")."""
    mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
    loss = r.get("loss_after", {}).get("mean_last_10pct", r["last_loss"])
    ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}" if base else "-"
    print(f"{r['mode']:<24}{r['tokens_per_s']:>12.0f}{ratio:>8}{r['model_tflops']:>10.1f}{mfu:>8}"
          f"{r['mem_gb']:>9.2f}{loss:>9.4f}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        try:
            mode_parts(mode)
        except ValueError as err:
            print(f"--modes: {err}", file=sys.stderr)
            return 2
    if any(m.startswith("deepspeed") for m in modes):
        from pipeline.distributed import init_distributed

        info = init_distributed()
        if device.type == "cuda":
            device = info.device  # with its index: DeepSpeed binds the engine to it
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; preset {args.preset}, micro-batch {args.micro_batch} x {args.seq_len}, "
          f"accumulation {args.grad_accum}, compile {args.compile}, zero {args.zero_stage}")
    print(f"{'mode':<24}{'tokens/s':>12}{'ratio':>8}{'TFLOP/s':>10}{'MFU':>8}{'mem GB':>9}{'loss':>9}", flush=True)
    results, failed = [], []
    ratio_base = "plain" if "plain" in modes else modes[0]
    multi_rank = int(os.environ.get("WORLD_SIZE", "1")) > 1
    for mode in modes:  # one mode failing (e.g. out of memory) must not lose the others' figures
        try:
            results.append(measure(args, mode, device))
        except Exception as err:
            if multi_rank:  # the other ranks would wait in a collective: stop them all
                raise
            print(f"mode {mode} failed: {type(err).__name__}: {err}", file=sys.stderr)
            failed.append({"mode": mode, "error": f"{type(err).__name__}: {err}"})
        # outside the except block: the traceback no longer holds the failed mode's engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if results and results[-1]["mode"] == mode:
            print_row(results[-1], next((r for r in results if r["mode"] == ratio_base), None))
            if "profile" in results[-1]:
                print_profile(mode, results[-1]["profile"])
        # each finished mode is on disk at once: a run cut off by a time limit keeps its figures
        write_figures(args.output, name, args, results, failed)
    if not results:
        return 1
    base = next((r for r in results if r["mode"] == "plain"), results[0])
    by_mode = {r["mode"]: r for r in results}
    if len(results) > 1:  # rows printed before their base mode ran showed "-"
        print(f"vs {base['mode']}: " + ", ".join(f"{r['mode']} {r['tokens_per_s'] / base['tokens_per_s']:.3f}x"
                                               for r in results if r is not base))
    for r in results:  # each FP8 (or mixed) mode against its bf16 counterpart
        r["ratio_to_" + base["mode"]] = r["tokens_per_s"] / base["tokens_per_s"]
        base_mode = r["mode"].rsplit("-", 1)[0] if "-" in r["mode"] else None
        if base_mode in by_mode:
            ref = by_mode[base_mode]
            loss, ref_loss = (x.get("loss_after", {}).get("mean_last_10pct", x["last_loss"]) for x in (r, ref))
            r["vs_" + base_mode] = {"speed": r["tokens_per_s"] / ref["tokens_per_s"],
                                    "loss_rel_diff": (loss - ref_loss) / ref_loss}
            print(f"{r['mode']} vs {base_mode}: {r['tokens_per_s'] / ref['tokens_per_s']:.3f}x tokens/s, "
                  f"loss {100 * (loss - ref_loss) / ref_loss:+.2f}%")
            if "profile" in r and "profile" in ref:
                print_profile_change(r["mode"], base_mode, r["profile"], ref["profile"])
    write_figures(args.output, name, args, results, failed)
    return 0 if not failed and all(math.isfinite(r["last_loss"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
