"""Load a trained model from a DeepSpeed checkpoint for evaluation and sampling, no engine needed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.mdlm import build_model

from .checkpoint import COMPLETE, complete_tags
from .configtools import from_dict


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: dict
    path: Path
    step: int
    weights: str  # "ema" or "raw"


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path
    tags = complete_tags(path)
    if not tags and (path / "checkpoints").is_dir():
        path = path / "checkpoints"
        tags = complete_tags(path)
    if not tags:
        raise FileNotFoundError(f"no complete checkpoint at '{path}': pass a run's checkpoints "
                                "directory or one of its stepNNNNNNNN directories")
    return path / tags[-1]


def holds_weights(module_state: dict | None) -> bool:
    """False for ZeRO-3 model states: their tensors are empty placeholders (the weights live in
    the optimizer partitions)."""
    return bool(module_state) and any(t.numel() for t in module_state.values() if torch.is_tensor(t))


def load_checkpoint_model(path: str | Path, use_ema: bool = True, device="cpu") -> LoadedModel:
    from model.config import ModelConfig

    ckpt = resolve_checkpoint(path)
    states = sorted(ckpt.glob("mp_rank_00_model_states.pt")) or sorted(ckpt.glob("*model_states.pt"))
    if not states:
        raise FileNotFoundError(f"{ckpt} has no DeepSpeed model states file")
    state = torch.load(states[0], map_location="cpu", weights_only=False)
    config = state["run_config"]
    tensor = int((state.get("parallel") or {}).get("tensor", 1))
    if tensor > 1:
        raise ValueError(f"{ckpt} is a tensor-parallel checkpoint (TP={tensor}); merge it first: "
                         f"python -m pipeline.convert_tp --checkpoint {ckpt} --out <dir>")
    model = build_model(from_dict(ModelConfig, config["model"], "model"))
    if use_ema and state.get("ema"):
        weights, source = state["ema"], "ema"
    elif state.get("ema_only"):
        raise ValueError(f"{ckpt} holds only the EMA weights (converted from a ZeRO-3 tensor-parallel "
                         "run, whose raw weights live in optimizer partitions): load it with the EMA")
    elif holds_weights(state.get("module")):
        weights, source = state["module"], "raw"
    else:  # ZeRO-3 keeps only partitions in the model states: consolidate them
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights, source = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name), "raw"
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    model.to(device).eval()
    return LoadedModel(model, config, ckpt, int(state.get("step", 0)), source)
