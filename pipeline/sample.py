"""Generate text from a trained checkpoint.

    python -m pipeline.sample --checkpoint RUN_DIR/checkpoints --steps 128 --num-samples 4 --length 128

Writes the texts and a JSON with network calls, wall time and tokens/s (EMA weights by default).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m pipeline.sample", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a run dir, its checkpoints dir, or one step dir")
    p.add_argument("--steps", type=int, default=128, help="reverse-process steps T (MDLM)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--length", type=int, default=0, help="tokens per sample (default: training seq_len)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="call the network at every step")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--tokenizer", default="", help="tokenizer.json (default: the run's data tokenizer)")
    p.add_argument("--output", default="samples", help="output prefix: writes PREFIX.txt and PREFIX.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps < 1:
        print(f"error: --steps must be >= 1 (got {args.steps})", file=sys.stderr)
        return 2
    from tokenizers import Tokenizer

    from model.mdlm import MDLM
    from model.sampling import ar_sample, mdlm_ancestral

    from .data import load_manifest
    from .inference import load_checkpoint_model

    loaded = load_checkpoint_model(args.checkpoint, use_ema=not args.no_ema)
    data_dir = Path(loaded.config["data"]["path"])
    manifest = load_manifest(data_dir)
    length = args.length or int(manifest["seq_len"])
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    if isinstance(loaded.model, MDLM):
        result = mdlm_ancestral(loaded.model, args.num_samples, length, args.steps, generator=gen,
                                use_cache=not args.no_cache, top_p=args.top_p)
    else:
        result = ar_sample(loaded.model, args.num_samples, length, int(manifest["tokenizer"]["bos_id"]),
                           generator=gen, top_p=args.top_p)
    wall = time.perf_counter() - start
    tok = Tokenizer.from_file(args.tokenizer or str(data_dir / "tokenizer" / "tokenizer.json"))
    texts = [tok.decode(row.tolist(), skip_special_tokens=False) for row in result.tokens]
    prefix = Path(args.output)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".txt").write_text("\n\n=====\n\n".join(texts) + "\n")
    stats = {"checkpoint": str(loaded.path), "weights": loaded.weights, "steps": args.steps,
             "num_samples": args.num_samples, "length": length, "network_calls": result.network_calls,
             "wall_s": wall, "tokens_per_s": args.num_samples * length / wall}
    prefix.with_suffix(".json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
