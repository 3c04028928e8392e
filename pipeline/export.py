"""Export a checkpoint's weights (the EMA by default) for use outside this project.

    python -m pipeline.export --checkpoint RUN_DIR/checkpoints[/stepN] --out DIR [--no-ema] [--dtype fp32|bf16]

DIR gets model.safetensors (the state dict of the plain PyTorch model in model/), config.json
(the model config; the token conventions: mask, BOS, EOS and pad ids, seq_len, packing; the source
checkpoint, step and which weights) and tokenizer/ (the exact files the data was tokenized with).
`load_exported(DIR)` rebuilds the model from them. A tensor-parallel checkpoint is merged first
with `python -m pipeline.convert_tp`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "mdlm-pretrain-export/1"


def export(checkpoint: str | Path, out: str | Path, use_ema: bool = True, dtype: str = "fp32") -> Path:
    from safetensors.torch import save_file

    from .inference import checkpoint_run_config, load_checkpoint_model, resolve_checkpoint, training_data

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} {'is not empty' if out.is_dir() else 'is a file'}: pass a new folder")
    ckpt = resolve_checkpoint(checkpoint)
    run_config = checkpoint_run_config(ckpt)
    manifest, tokenizer_file = training_data(ckpt, run_config["data"]["path"])
    loaded = load_checkpoint_model(ckpt, use_ema=use_ema)
    cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    # contiguous, unshared tensors: safetensors refuses views of one storage
    weights = {name: t.detach().to(cast).contiguous().clone() for name, t in loaded.model.state_dict().items()}
    tok = manifest["tokenizer"]
    config = {
        "format": FORMAT,
        "model": run_config["model"],
        "tokens": {"mask_token_id": manifest.get("mask_token_id"), "bos_id": tok.get("bos_id"),
                   "eos_id": tok.get("eos_id"), "pad_id": tok.get("pad_id"), "vocab_size": tok.get("vocab_size"),
                   "model_vocab_size": manifest.get("model_vocab_size"), "tokenizer": tok.get("name")},
        "seq_len": manifest.get("seq_len"),
        "packing": manifest.get("packing", "wrap"),
        "source": {"checkpoint": str(ckpt), "step": loaded.step, "weights": loaded.weights, "dtype": dtype},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # written next to the target and renamed into place: an interrupted export leaves no half folder
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would keep the export from other users
    try:
        save_file(weights, str(staging / WEIGHTS), metadata={"format": FORMAT, "weights": loaded.weights})
        (staging / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copytree(tokenizer_file.parent, staging / "tokenizer")
        os.chmod(staging / WEIGHTS, 0o666 & ~umask)  # safetensors writes it 0600
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_exported(path: str | Path, device="cpu") -> torch.nn.Module:
    """The model of an export folder, in the export's dtype, in eval mode."""
    from safetensors.torch import load_file

    from model.config import ModelConfig
    from model.mdlm import build_model

    from .configtools import from_dict

    path = Path(path)
    config = json.loads((path / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG}: not an export of this project (format {config.get('format')!r})")
    weights = load_file(str(path / WEIGHTS), device=str(device))
    model = build_model(from_dict(ModelConfig, config["model"], "model")).to(device)
    model.load_state_dict(weights)
    return model.to(next(iter(weights.values())).dtype).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run dir, its checkpoints dir, or one step dir")
    parser.add_argument("--out", required=True, help="a new (or empty) folder")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, use_ema=not args.no_ema, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {out}/{WEIGHTS}, {CONFIG}, tokenizer/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
