"""Likelihood evaluation: the MDLM perplexity bound (or AR perplexity) and the unigram baseline.

`python -m pipeline.evaluate --checkpoint RUN_DIR/checkpoints[/stepN] [--data DIR] [--time-samples K]
[--discrete-steps T] [--output FILE]` prints a JSON result (and writes it to FILE); under torchrun, deepspeed or srun every rank
loads the model and scores every W-th sequence (the same result for any number of ranks, since each
sequence's Monte Carlo draws are seeded by its key). Conventions (recorded with every result):
every stored position of a sequence is scored, BOS and EOS included; documents are packed as
BOS + chunk + EOS with EOS between documents (wrap mode).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.likelihood import ar_nll, mdlm_discrete_nelbo, mdlm_nelbo
from model.mdlm import MDLM

from .data import ShardDataError, ShardStream, batches, load_manifest


def conventions(manifest: dict, objective: str = "mdlm") -> dict:
    counted = ("every position (BOS/EOS included, pad excluded)" if objective == "mdlm" else
               "every position after the first (BOS is never predicted; EOS included, pad excluded)")
    return {
        "tokens_counted": counted,
        "packing": manifest.get("packing", "wrap"),
        "eos_between_documents": manifest.get("packing", "wrap") == "wrap",
        "seq_len": manifest.get("seq_len"),
    }


def key_uniforms(keys: list[str], seed: int, width: int) -> torch.Tensor:
    """(B, width) float64 uniforms seeded by (seed, sample key): each sequence's Monte Carlo draws
    are the same whatever the batch size, the world size or the order of evaluation."""
    import hashlib

    rows = []
    for key in keys:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        rows.append(torch.rand(width, generator=gen, dtype=torch.float64))
    return torch.stack(rows)


def _all_reduce(values: list[float], device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


class EvaluationFailed(RuntimeError):
    """The evaluation failed on some rank (out of memory, a bug): raised on every rank together,
    after the one reduction they all reach; on the failing rank with its error as the cause."""


class UnreadableSplit(EvaluationFailed):
    """A rank could not read its part of the evaluated split: raised on every rank together."""


@torch.no_grad()
def evaluate_likelihood(model: torch.nn.Module, data_dir: str | Path, split: str, batch_size: int,
                        time_samples: int = 4, max_batches: int = 0, seed: int = 0,
                        rank: int = 0, world_size: int = 1, device=None,
                        discrete_steps: int = 0, check_sha256: bool = True) -> dict:
    """exp(NELBO per token) for MDLM, exact perplexity for AR, over a deterministic pass of `split`,
    split across ranks; the standard error comes from the K draws per sequence. A shard that a
    rank cannot read raises UnreadableSplit on every rank, any other error on a rank (out of memory,
    a bug) EvaluationFailed, after the one reduction they all reach: one rank raising alone would
    leave the others waiting in it. The model is a local one (Trainer.eval_model): its forward
    makes no collective call, so a rank can leave the loop at any batch."""
    if isinstance(model, MDLM) and time_samples < 2:
        raise ValueError(f"time_samples={time_samples}: the bound's standard error needs at least 2 Monte Carlo "
                         "times per sequence")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    # every rank reads the (small) eval split and keeps every W-th sample: the evaluated set is
    # the first samples of the split in file order, whatever the world size
    total, var, tokens, after_first, seqs, error, crash = 0.0, 0.0, 0.0, 0.0, 0, None, None
    try:
        stream = ShardStream(data_dir, split, rank, world_size, seed=0, shuffle=False, loop=False,
                             split_by="sample", check_sha256=check_sha256)
    except (OSError, ValueError) as err:
        stream, error = [], err
    it = batches(stream, batch_size, drop_last=False)
    for i in itertools.count():
        if max_batches and i >= max_batches:
            break
        try:
            x0, valid, keys = next(it)
        except StopIteration:
            break
        except (OSError, ShardDataError) as err:  # a missing or damaged shard
            error = err
            break
        except Exception as err:
            crash = err
            break
        try:
            x0 = x0.to(device)
            valid = valid.to(device) if valid is not None else None
            if isinstance(model, MDLM):
                uniforms = key_uniforms(keys, seed, 1 + time_samples * x0.shape[1])
                if discrete_steps:
                    nelbo, v = mdlm_discrete_nelbo(model, x0, discrete_steps, time_samples, valid=valid,
                                                   uniforms=uniforms)
                else:
                    nelbo, v = mdlm_nelbo(model, x0, time_samples, valid=valid, uniforms=uniforms)
                var += float(v.sum())
                tokens += float(valid.sum()) if valid is not None else x0.numel()
            else:
                nelbo = ar_nll(model, x0, valid)
                tokens += float(valid[:, 1:].sum()) if valid is not None else x0[:, 1:].numel()
            after_first += float(valid[:, 1:].sum()) if valid is not None else x0[:, 1:].numel()
            total += float(nelbo.sum())
            seqs += x0.shape[0]
        except Exception as err:  # e.g. out of memory on this rank only
            crash = err
            break
    del stream, it  # the shards read for this pass (a crash's traceback still holds its batch)
    total, var, tokens, after_first, seqs, failed, crashed = _all_reduce(
        [total, var, tokens, after_first, seqs, float(error is not None), float(crash is not None)], device)
    model.train(was_training)
    if crashed:
        here = f"; here: {type(crash).__name__}: {crash}" if crash is not None else "; see that rank's log"
        raise EvaluationFailed(f"evaluating split '{split}' of {data_dir} failed on {int(crashed)} of {world_size} "
                               f"rank(s){here}") from crash
    if failed:
        here = f"; here: {type(error).__name__}: {error}" if error is not None else ""
        raise UnreadableSplit(f"split '{split}' of {data_dir} could not be read on {int(failed)} of {world_size} "
                              f"rank(s){here}") from error
    if tokens == 0:
        raise ValueError(f"split '{split}' of {data_dir} gave no tokens to evaluate")
    per_token = total / tokens
    se = math.sqrt(var) / tokens
    result = {"nelbo": per_token, "ppl_bound": math.exp(per_token), "nelbo_se": se,
              "ppl_bound_ci95": [math.exp(per_token - 1.96 * se), math.exp(per_token + 1.96 * se)],
              "tokens": int(tokens), "sequences": int(seqs), "time_samples": time_samples,
              # the AR convention's count (all positions but the first), for comparisons across objectives:
              # total / tokens_after_first is MDLM's bound per token on AR's denominator
              "nll_total": total, "tokens_after_first": int(after_first),
              "estimator": ("discrete" if discrete_steps else "continuous") if isinstance(model, MDLM) else "exact",
              "discrete_steps": discrete_steps, "split": split}
    if not isinstance(model, MDLM):
        result = {**result, "nll": per_token, "ppl": math.exp(per_token)}
    return result


def token_counts(data_dir: str | Path, split: str, vocab: int, max_samples: int = 0,
                 check_sha256: bool = True) -> np.ndarray:
    counts = np.zeros(vocab, dtype=np.int64)
    pending: list[np.ndarray] = []

    def flush() -> None:  # one bincount per ~1M tokens, not one vocab-sized array per sample
        if pending:
            counts[:] += np.bincount(np.concatenate(pending).astype(np.int64), minlength=vocab)[:vocab]
            pending.clear()

    stream = ShardStream(data_dir, split, shuffle=False, loop=False, check_sha256=check_sha256)
    held = 0
    for i, sample in enumerate(stream):
        if max_samples and i >= max_samples:
            break
        toks = sample["tokens"]
        if "mask" in sample:
            toks = toks[sample["mask"].astype(bool)]
        pending.append(toks)
        held += toks.size
        if held >= 2**20:
            flush()
            held = 0
    flush()
    return counts


# the unigram is fit on at most this many train tokens: enough for a stable baseline, and a
# web-scale train split (billions of tokens) would otherwise be read in full after every run
UNIGRAM_TRAIN_TOKENS = 2**24


def unigram_perplexity(data_dir: str | Path, eval_split: str = "val", train_split: str = "train",
                       max_train_samples: int | None = None, max_eval_samples: int = 0,
                       check_sha256: bool = True) -> dict:
    """Perplexity of the eval tokens under the add-one-smoothed unigram of the train tokens (the
    first UNIGRAM_TRAIN_TOKENS of them unless `max_train_samples` says otherwise; 0 = all): the bar
    a model must clear to show it uses context."""
    manifest = load_manifest(data_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    if max_train_samples is None:
        max_train_samples = -(-UNIGRAM_TRAIN_TOKENS // int(manifest["seq_len"]))
    train_counts = token_counts(data_dir, train_split, vocab, max_train_samples, check_sha256)
    train = train_counts.astype(np.float64) + 1.0
    log_p = np.log(train / train.sum())
    evals = token_counts(data_dir, eval_split, vocab, max_eval_samples, check_sha256)
    nll = -(evals * log_p).sum() / evals.sum()
    return {"unigram_nll": float(nll), "unigram_ppl": float(math.exp(nll)), "unigram_tokens": int(evals.sum()),
            "unigram_train_tokens": int(train_counts.sum())}


def _launched_ranks(device_arg: str):
    """(rank, world size, device) of this process: a one-process run uses --device; every rank of a
    multi-process launch uses its own GPU (its local rank), or the CPU on a machine without one."""
    from .distributed import _env_from_slurm, init_distributed
    from .inference import resolve_device

    _env_from_slurm()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, resolve_device(device_arg)
    if device_arg != "auto":
        raise ValueError(f"--device {device_arg} with {os.environ['WORLD_SIZE']} ranks: leave --device auto, "
                         "each rank then takes the GPU of its local rank (or the CPU where there is none)")
    info = init_distributed()
    return info.rank, info.world_size, info.device


def main(argv: list[str] | None = None) -> int:
    from .distributed import shutdown_distributed
    from .inference import (PRECISIONS, check_same_tokenizer, checkpoint_run_config, load_checkpoint_model,
                            precision_context, resolve_checkpoint, resolve_precision, training_data)

    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run dir or its checkpoints dir (the newest complete checkpoint), or one step dir")
    parser.add_argument("--data", default="", help="data_prep output dir (default: the run's data.path)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--time-samples", type=int, default=16)
    parser.add_argument("--discrete-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch on each rank")
    parser.add_argument("--max-batches", type=int, default=0,
                        help="batches per rank (0 = the whole split): W ranks score the first "
                             "W x max-batches x batch-size sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="fp32, tf32 (GPU) or bf16 autocast; auto: tf32 on a GPU, fp32 on a CPU")
    parser.add_argument("--output", default="", help="write the result JSON here")
    args = parser.parse_args(argv)
    if args.time_samples < 2:
        parser.error(f"--time-samples {args.time_samples}: the standard error needs at least 2 draws per sequence")
    if args.batch_size < 1 or args.max_batches < 0 or args.discrete_steps < 0:
        parser.error(f"--batch-size {args.batch_size}, --max-batches {args.max_batches}, --discrete-steps "
                     f"{args.discrete_steps}: need a batch size >= 1 and no negative counts")
    # every check that needs no weights, before loading them (or starting a process group)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        config = checkpoint_run_config(ckpt)
        data = args.data or config["data"]["path"]
        manifest = load_manifest(data)
        if args.split not in manifest["splits"]:
            raise ValueError(f"split '{args.split}' not in {data}/manifest.json (has {', '.join(manifest['splits'])})")
        if not manifest["splits"][args.split].get("shards"):
            raise ValueError(f"split '{args.split}' of {data} holds no shards (a corpus prepared with "
                             f"--val-fraction 0 has its text in 'train'): pass --split with a split that has shards")
        try:
            trained_on, _ = training_data(ckpt, config["data"]["path"])
            warnings = check_same_tokenizer(ckpt, trained_on, data, manifest)
        except FileNotFoundError:  # an older checkpoint whose training data has moved
            warnings = [f"{ckpt} holds no copy of its training data's manifest and its data.path "
                        f"'{config['data']['path']}' is gone: the tokenizer of '{data}' could not be checked"]
        if args.output and not Path(args.output).resolve().parent.is_dir():
            raise FileNotFoundError(f"--output {args.output}: its folder does not exist")
        rank, world, device = _launched_ranks(args.device)
        precision = resolve_precision(args.precision, device, cuda_default="tf32")
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if rank == 0:
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
    try:
        loaded = load_checkpoint_model(ckpt, use_ema=not args.no_ema, device=device)
    except ValueError as err:  # e.g. --no-ema on an EMA-only (merged ZeRO-3 tensor-parallel) checkpoint
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        shutdown_distributed()
        return 2
    if not args.no_ema and loaded.weights != "ema":
        warnings.append(f"{loaded.path} holds no EMA weights (train.ema=0): evaluated its raw weights")
        if rank == 0:
            print(f"warning: {warnings[-1]}", file=sys.stderr)
    try:
        with precision_context(precision, device):
            result = evaluate_likelihood(loaded.model, data, args.split, args.batch_size, args.time_samples,
                                         args.max_batches, args.seed, rank=rank, world_size=world, device=device,
                                         discrete_steps=args.discrete_steps)
    except EvaluationFailed as err:
        if err.__cause__ is not None and not isinstance(err, UnreadableSplit):  # a bug or OOM: where it was
            traceback.print_exception(err.__cause__)
        print(f"error: {err}", file=sys.stderr)
        shutdown_distributed()
        return 1
    if rank == 0:
        try:  # a baseline: its failure (an unreadable train split, say) must not cost the bound
            result.update(unigram_perplexity(data, args.split,
                                             max_eval_samples=args.max_batches * args.batch_size * world))
        except Exception as err:
            result["unigram_error"] = f"{type(err).__name__}: {err}"
            warnings.append(f"the unigram baseline could not be computed: {result['unigram_error']}")
            print(f"warning: {warnings[-1]}", file=sys.stderr)
        result["conventions"] = conventions(manifest, loaded.model.cfg.objective)
        result["checkpoint"] = str(loaded.path)
        result["step"] = loaded.step
        result["weights"] = loaded.weights
        result["ranks"] = world
        result["precision"] = precision
        result["warnings"] = warnings
        text = json.dumps(result, indent=2)
        print(text)
        if args.output:
            out = Path(args.output)
            tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
            tmp.write_text(text + "\n")
            os.replace(tmp, out)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
