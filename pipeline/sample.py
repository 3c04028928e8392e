"""Generate text from a trained checkpoint (EMA weights by default).

    python -m pipeline.sample --checkpoint RUN_DIR/checkpoints --steps 128 --num-samples 4 --length 128
        [--prompt TEXT] [--suffix TEXT] [--sampler ancestral|cached|semi-ar|confidence]
        [--block-size B] [--carry C] [--top-p P] [--temperature T] [--seed S] [--judge AR_CKPT]
        [--stop-at-eos]

Writes PREFIX.txt (the texts), PREFIX.jsonl (each sample's token ids and whole text, a line each)
and PREFIX.json (network calls, rows evaluated, wall time, tokens/s, entropy, gen-PPL under
--judge, the tokenizer); `python -m pipeline.genppl PREFIX.json --judge ...` scores them later. MDLM samples start with BOS followed by the prompt when one is
given (training samples begin with BOS); `[MASK]` in the prompt or suffix marks a position for the
model to fill (infilling); --suffix puts known tokens at the end of each sample. An AR checkpoint
decodes from BOS + prompt with a KV cache (--sampler ancestral turns the cache off).
Bad arguments fail with exit code 2 before the model is loaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# the choices of model.sampling.SAMPLERS and inference.PRECISIONS (a test keeps them equal):
# argument errors are reported without importing torch
SAMPLERS = ("ancestral", "cached", "semi-ar", "confidence")
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
MASK_MARK = "[MASK]"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pipeline.sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a run dir, its checkpoints dir, or one step dir")
    p.add_argument("--steps", type=int, default=128, help="reverse-process steps T (MDLM; per block for semi-ar)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--length", type=int, default=0, help="tokens per sample (default: training seq_len)")
    p.add_argument("--prompt", default="", help="text the samples start with ([MASK] = a position to fill)")
    p.add_argument("--suffix", default="", help="text the samples end with (MDLM infilling)")
    p.add_argument("--sampler", default="cached", choices=SAMPLERS,
                   help="ancestral (a call per step), cached (default), semi-ar (blocks), confidence (top-k)")
    p.add_argument("--block-size", type=int, default=0, help="semi-ar block size (default: training seq_len)")
    p.add_argument("--carry", type=int, default=-1, help="semi-ar: tokens of the previous block kept as "
                                                          "the next block's prefix (default: block size // 2)")
    p.add_argument("--final", default="sample", choices=["sample", "argmax"],
                   help="sample: the last step draws every remaining position (exact); argmax: the "
                        "steps end at t=eps and one more pass fills the ~m(eps) still masked with "
                        "the argmax (the MDLM reference's noise removal)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0, help="p^(1/T) before top-p (below 1: sharper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="same as --sampler ancestral")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="fp32, tf32 (GPU) or bf16 autocast; auto: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default; 1 is fastest on busy cores)")
    p.add_argument("--judge", default="", help="AR checkpoint (or Hugging Face directory) for gen-PPL")
    p.add_argument("--stop-at-eos", action="store_true",
                   help="PREFIX.txt ends each sample before its first end-of-text token after the prompt "
                        "(packed training data joins documents with it); gen-PPL and entropy still score "
                        "whole samples, as the MDLM paper does")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: the copy in the checkpoint)")
    p.add_argument("--data", default="", help="the training data_prep output, for checkpoints that hold no copy "
                                              "of its manifest and tokenizer (default: the run's data.path)")
    p.add_argument("--output", default="samples", help="output prefix: writes PREFIX.txt, PREFIX.jsonl and "
                                                        "PREFIX.json (a folder: FOLDER/samples.*); default: "
                                                        "./samples.*, replaced by the next run")
    args = p.parse_args(argv)
    if args.no_cache and args.sampler in ("semi-ar", "confidence"):
        p.error(f"--no-cache applies to the cached sampler (it runs the ancestral one); --sampler {args.sampler} "
                "keeps its cache")
    if args.no_cache and args.sampler == "cached":
        args.sampler = "ancestral"
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (got {args.threads})")
    if args.steps < 1:
        p.error(f"--steps must be >= 1 (got {args.steps}): T is the number of reverse-process steps")
    if args.num_samples < 1:
        p.error(f"--num-samples must be >= 1 (got {args.num_samples})")
    if args.length < 0:
        p.error(f"--length must be >= 1, or 0 for the training seq_len (got {args.length})")
    if not 0.0 < args.top_p <= 1.0:
        p.error(f"--top-p must be in (0, 1] (got {args.top_p})")
    if not 0.0 < args.temperature < float("inf"):
        p.error(f"--temperature must be > 0 (got {args.temperature})")
    if args.block_size and args.block_size < 2:
        p.error(f"--block-size must be >= 2 (got {args.block_size})")
    if args.carry >= 0 and args.block_size and args.carry >= args.block_size:
        p.error(f"--carry must be smaller than --block-size (got {args.carry} >= {args.block_size})")
    if args.sampler != "semi-ar" and (args.block_size or args.carry >= 0):
        p.error("--block-size and --carry only apply to --sampler semi-ar")
    if args.stop_at_eos and args.suffix:
        p.error("--stop-at-eos would cut off the --suffix that ends each sample: use one of them")
    return p, args


def _encode(tok, text: str, mask_id: int | None) -> list[int]:
    """Token ids of text; each [MASK] becomes mask_id (MDLM) or is refused (AR). The spaces
    before a [MASK] belong to the token that fills it (byte-level BPE writes a word with its
    leading space), so they are not encoded as tokens of their own."""
    pieces = text.split(MASK_MARK)
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i:
            ids.append(mask_id)
        if i < len(pieces) - 1:
            piece = piece.rstrip(" ")
        if piece:
            ids.extend(tok.encode(piece, add_special_tokens=False).ids)
    return ids


def suffix_text(suffix: str) -> str:
    """A suffix that begins with a letter or digit starts a new word (its leading space is part of
    its first token); one that begins with punctuation, a space or [MASK] is kept as it is."""
    return " " + suffix if suffix[:1].isalnum() else suffix


def output_prefix(output: str) -> Path:
    """PREFIX of PREFIX.txt / PREFIX.json: a folder (existing, or given with a trailing slash)
    gets 'samples' inside it; a dotted name (run.v1.2) keeps its dots."""
    path = Path(output)
    if output.endswith(("/", "\\")) or path.is_dir():
        path = path / "samples"
    elif path.suffix in (".txt", ".json", ".jsonl"):  # --output gen.txt means the prefix gen
        path = path.with_suffix("")
    return path


def until_eos(row: list[int], start: int, eos_id: int) -> list[int]:
    """row up to (without) the first eos_id at or after position start."""
    try:
        return row[:row.index(eos_id, start)]
    except ValueError:
        return row


def _with(prefix: Path, extension: str) -> Path:
    return prefix.with_name(prefix.name + extension)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    import torch
    from tokenizers import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)

    from .inference import (checkpoint_run_config, precision_context, resolve_checkpoint, resolve_device,
                            resolve_precision, training_data)

    try:
        args.device = resolve_device(args.device)
        precision = resolve_precision(args.precision, args.device, cuda_default="bf16")
        ckpt = resolve_checkpoint(args.checkpoint)
        config = checkpoint_run_config(ckpt)
        manifest, tokenizer_file = training_data(ckpt, args.data or config["data"]["path"])
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    objective = config["model"].get("objective", "mdlm")
    mask_id = int(manifest["mask_token_id"]) if objective == "mdlm" else None
    bos_id = int(manifest["tokenizer"]["bos_id"])
    length = args.length or int(manifest["seq_len"])
    block_size = args.block_size or int(manifest["seq_len"])
    if length > int(manifest["seq_len"]) and args.sampler != "semi-ar":
        print(f"warning: --length {length} is longer than the {manifest['seq_len']} tokens the model was trained "
              "on (rotary positions beyond it were never seen); --sampler semi-ar generates long texts "
              "block by block", file=sys.stderr)
    if args.sampler == "semi-ar" and block_size > int(manifest["seq_len"]):
        print(f"warning: --block-size {block_size} is longer than the {manifest['seq_len']} tokens the model was "
              "trained on (rotary positions beyond it were never seen)", file=sys.stderr)
    model_vocab = int(config["model"].get("vocab_size") or 0)
    if model_vocab and int(manifest.get("model_vocab_size", model_vocab)) != model_vocab:
        parser.error(f"the data's manifest ({args.data or tokenizer_file.parent.parent}) is for a model vocabulary of "
                     f"{manifest['model_vocab_size']} but {ckpt} has {model_vocab}: pass the data_prep output "
                     "the checkpoint was trained on (--data)")
    tokenizer_path = Path(args.tokenizer or tokenizer_file)
    if not tokenizer_path.is_file():
        parser.error(f"tokenizer file {tokenizer_path} not found: pass a tokenizer.json (--tokenizer)")
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok_vocab = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # as data_prep counts it: ids may have holes
    if tok_vocab != int(manifest["tokenizer"]["vocab_size"]):
        parser.error(f"tokenizer {tokenizer_path} has {tok_vocab} token ids but {ckpt} was trained with "
                     f"{manifest['tokenizer']['vocab_size']}: use the checkpoint's own tokenizer")
    prefix = output_prefix(args.output)
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--output {args.output}: cannot create {prefix.parent} ({err})")
    if args.judge:
        from .genppl import check_judge

        try:
            check_judge(args.judge, manifest)
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            parser.error(f"--judge {args.judge}: {err}")

    # every check that needs no weights, before loading them
    if objective != "mdlm" and (args.suffix or MASK_MARK in args.prompt):
        parser.error("--suffix and [MASK] infilling need an MDLM checkpoint (AR decodes left to right)")
    if objective != "mdlm" and args.sampler in ("semi-ar", "confidence"):
        parser.error(f"--sampler {args.sampler} needs an MDLM checkpoint")
    prompt = _encode(tok, args.prompt, mask_id) if args.prompt else []
    suffix = _encode(tok, suffix_text(args.suffix), mask_id) if args.suffix else []
    fixed = 1 + len(prompt) + len(suffix) if (prompt or objective != "mdlm") else len(suffix)
    if fixed > length:
        parser.error(f"the prompt has {len(prompt)} tokens (+1 BOS{f', +{len(suffix)} suffix' if suffix else ''}) "
                     f"but the sample length is {length}: raise --length or shorten the prompt")
    carry = args.carry if args.carry >= 0 else block_size // 2
    if args.sampler == "semi-ar" and carry >= block_size:
        parser.error(f"--carry must be smaller than the block size (got {carry} >= {block_size})")

    from model.mdlm import MDLM
    from model.sampling import generate

    from .inference import load_checkpoint_model

    loaded = load_checkpoint_model(ckpt, use_ema=not args.no_ema, device=args.device)
    model = loaded.model
    canvas = None
    if isinstance(model, MDLM):
        if prompt or suffix:
            canvas = torch.full((length,), model.mask_id, dtype=torch.long)
            head = [bos_id, *prompt] if prompt else []
            canvas[:len(head)] = torch.tensor(head, dtype=torch.long)
            if suffix:
                canvas[length - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
    elif prompt:
        canvas = torch.tensor(prompt, dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    with precision_context(precision, args.device):
        result = generate(model, args.num_samples, length, sampler=args.sampler, steps=args.steps,
                          block_size=block_size if args.sampler == "semi-ar" else None, carry=carry,
                          prompt=canvas, top_p=args.top_p, generator=gen, bos_id=bos_id, final=args.final,
                          device=args.device, temperature=args.temperature,
                          banned_ids=(int(manifest["mask_token_id"]),) if objective != "mdlm" else ())
    sync()
    wall = time.perf_counter() - start
    tokens = result.tokens.cpu()
    texts = [tok.decode(row.tolist(), skip_special_tokens=False) for row in tokens]
    shown = texts
    if args.stop_at_eos:
        eos_id, first = int(manifest["tokenizer"]["eos_id"]), 1 + len(prompt)
        shown = [tok.decode(until_eos(row.tolist(), first, eos_id), skip_special_tokens=False) for row in tokens]
    # what the model generated (a judge scores only those): [MASK] positions of the canvas, or
    # those after BOS + prompt for AR; None without a prompt or suffix (every position)
    if canvas is None:
        generated = None
    elif objective == "mdlm":
        generated = (canvas == model.mask_id).nonzero().squeeze(1).tolist()
    else:
        generated = list(range(1 + len(prompt), length))
    rows = [{"tokens": row, "text": text} for row, text in zip(tokens.tolist(), texts)]
    if generated:  # the pieces a judge with another tokenizer scores: the context, then what follows it
        for row in rows:
            ids = row["tokens"]
            row["context_text"] = tok.decode(ids[:generated[0]], skip_special_tokens=False)
            row["generated_text"] = tok.decode(ids[generated[0]:generated[-1] + 1], skip_special_tokens=False)
    from data_prep.manifest import atomic_write_text

    _with(prefix, ".json").unlink(missing_ok=True)  # an earlier run's stats must not pair with these samples
    atomic_write_text(_with(prefix, ".txt"), "\n\n=====\n\n".join(shown) + "\n")
    atomic_write_text(_with(prefix, ".jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
    from .genppl import evaluate_samples, load_judge, sample_pieces, scored_mask

    judge = load_judge(args.judge, args.device) if args.judge and generated != [] else None
    if args.judge and judge is None:
        print("note: the prompt and suffix fill every position: nothing was generated for --judge to score",
              file=sys.stderr)
    quality = evaluate_samples(tokens, judge, texts, scored=scored_mask(tokens, generated), pieces=sample_pieces(rows))
    stats = {"checkpoint": str(loaded.path), "weights": loaded.weights, "objective": objective,
             "sampler": args.sampler if objective == "mdlm" else ("ar-kv" if args.sampler != "ancestral" else "ar"),
             "steps": args.steps, "block_size": block_size if args.sampler == "semi-ar" else None,
             "carry": carry if args.sampler == "semi-ar" else None, "top_p": args.top_p, "temperature": args.temperature, "seed": args.seed,
             "final": args.final, "num_samples": args.num_samples, "length": length,
             "prompt_tokens": len(prompt), "suffix_tokens": len(suffix), "stop_at_eos": args.stop_at_eos,
             "generated_positions": generated,
             **result.stats(),
             "wall_s": wall, "tokens_per_s": args.num_samples * length / wall, "device": str(args.device),
             "precision": precision, **quality}
    stats["tokenizer"] = manifest["tokenizer"]
    atomic_write_text(_with(prefix, ".json"), json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))
    print(f"wrote {', '.join(str(_with(prefix, ext)) for ext in ('.txt', '.jsonl', '.json'))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
