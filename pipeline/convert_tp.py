"""Convert a tensor-parallel (TP=N) training checkpoint to a TP=1 one for sampling and export.

    python -m pipeline.convert_tp --checkpoint runs/x/checkpoints [--out runs/x/checkpoints-tp1]

Reads every mp_rank_XX_model_states.pt of the checkpoint (raw weights and EMA; under ZeRO-3 the
zero_pp_rank_0_mp_rank_XX files, whose EMA the trainer assembles from the partitions), merges the shards
with the layout the trainer recorded in the client state (`parallel.layout`: which tensors are
split along which dimension, the qkv interleave, the vocabulary padding), and writes
<out>/<tag>/mp_rank_00_model_states.pt + COMPLETE + <out>/latest, which pipeline.inference,
evaluate and sample load like any TP=1 checkpoint. Optimizer states are not converted: the
result is for inference and export, not for resuming training. ZeRO-3 keeps the raw weights only
as partitions in the optimizer states: its merged checkpoint holds the EMA weights alone.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from model.tensor_parallel import merge_state_dicts, strip_extra_state

from .adapters import plain_name
from .checkpoint import COMPLETE, DATA_MANIFEST, RUN_CONFIG, complete_tags
from .inference import holds_weights, resolve_checkpoint

KEEP = ("step", "tokens_seen", "skipped_steps", "run_config", "mlflow_run_id")


def model_state_files(ckpt: Path) -> list[Path]:
    files = list(ckpt.glob("mp_rank_*_model_states.pt")) or list(ckpt.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt} has no mp_rank_XX_model_states.pt files")
    return sorted(files, key=lambda p: int(re.search(r"mp_rank_(\d+)", p.name).group(1)))


def convert(checkpoint: str | Path, out: str | Path) -> Path:
    ckpt = resolve_checkpoint(checkpoint)
    out_dir = Path(out) / ckpt.name
    if out_dir.exists():
        # the default or a typo could name the training checkpoints themselves: never write over them
        raise ValueError(f"{out_dir} already exists{' (it is the checkpoint being converted)' if out_dir.resolve() == ckpt.resolve() else ''}: "
                         "pass an --out directory that does not hold this checkpoint")
    trained = [t for t in complete_tags(out) if any((Path(out) / t).glob("*optim_states.pt"))]
    if trained:
        raise ValueError(f"--out {out} holds a run's training checkpoints ({trained[-1]}, with optimizer states): "
                         "pass a folder for converted checkpoints")
    files = model_state_files(ckpt)
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    parallel = states[0].get("parallel") or {"tensor": 1, "layout": {}}
    tp, layout = int(parallel.get("tensor", 1)), parallel.get("layout") or {}
    # checkpoints of runs with activation checkpointing once keyed the layout by wrapped names
    layout = {plain_name(name): spec for name, spec in layout.items()}
    if len(states) != tp:
        raise ValueError(f"{ckpt}: the checkpoint says tensor parallel {tp} but has {len(states)} "
                         "mp_rank files")
    has_ema = all(s.get("ema") for s in states)
    raw = holds_weights(states[0].get("module"))
    if not raw and not has_ema:
        raise ValueError(f"{ckpt}: the model states hold no weights (ZeRO-3 keeps them in partitions) "
                         "and no EMA: train with train.ema > 0 to convert ZeRO-3 tensor-parallel runs")
    merged = {k: states[0][k] for k in KEEP if k in states[0]}
    if raw:
        merged["module"] = merge_state_dicts([s["module"] for s in states], layout) if tp > 1 \
            else strip_extra_state(states[0]["module"])
    else:
        merged["module"] = None
        merged["ema_only"] = True
    if has_ema:
        merged["ema"] = merge_state_dicts([s["ema"] for s in states], layout) if tp > 1 else states[0]["ema"]
    run_config = copy.deepcopy(merged.get("run_config") or {})
    run_config.setdefault("parallel", {})["tensor"] = 1
    merged["run_config"] = run_config
    merged["parallel"] = {"tensor": 1, "data": 1, "layout": {}, "converted_from_tensor": tp}
    merged["world_size"] = 1

    out_dir.mkdir(parents=True)
    target = out_dir / "mp_rank_00_model_states.pt"
    tmp = target.with_name(target.name + ".tmp")
    torch.save(merged, tmp)
    os.replace(tmp, target)
    files = {target.name: target.stat().st_size}
    # self-contained like the training checkpoint: evaluate and sample need no data folder
    (out_dir / RUN_CONFIG).write_text(json.dumps(run_config, indent=1))
    if (ckpt / DATA_MANIFEST).is_file():
        shutil.copyfile(ckpt / DATA_MANIFEST, out_dir / DATA_MANIFEST)
    if (ckpt / "tokenizer").is_dir():
        shutil.copytree(ckpt / "tokenizer", out_dir / "tokenizer")
    (out_dir / COMPLETE).write_text(json.dumps({"step": merged.get("step", 0), "files": files}, indent=1) + "\n")
    latest = Path(out) / "latest"
    latest.with_name(".latest.tmp").write_text(ckpt.name)
    os.replace(latest.with_name(".latest.tmp"), latest)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Merge a tensor-parallel checkpoint into a TP=1 one")
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoints dir or a stepNNNNNNNN dir")
    parser.add_argument("--out", default=None, help="output directory (default: <checkpoints>-tp1)")
    args = parser.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        out = args.out or str(ckpt.parent) + "-tp1"
        path = convert(ckpt, out)
    except (FileNotFoundError, ValueError) as err:
        print(f"convert_tp: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
