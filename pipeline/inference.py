"""Load a trained model from a DeepSpeed checkpoint for evaluation and sampling, no engine needed."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from model.mdlm import build_model
from model.tensor_parallel import strip_extra_state

from .adapters import plain_name
from .checkpoint import COMPLETE, DATA_MANIFEST, complete_tags, damaged_files, saved_run_config
from .configtools import from_dict


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: dict
    path: Path
    step: int
    weights: str  # "ema" or "raw"


def resolve_checkpoint(path: str | Path) -> Path:
    """A step dir as given (refused when its files are damaged), or the newest complete and
    undamaged checkpoint of a run dir or checkpoints dir (warning about each damaged newer one)."""
    path = Path(path)
    if (path / COMPLETE).is_file():
        damaged = damaged_files(path)
        if damaged:
            raise ValueError(f"checkpoint {path} is damaged (missing, cut or resized: {', '.join(damaged[:3])}): "
                             f"pass its checkpoints directory to use the newest intact one")
        return path
    tags = complete_tags(path)
    if not tags and (path / "checkpoints").is_dir():
        path = path / "checkpoints"
        tags = complete_tags(path)
    if not tags:
        raise FileNotFoundError(f"no complete checkpoint at '{path}': pass a run's checkpoints "
                                "directory or one of its stepNNNNNNNN directories")
    for tag in reversed(tags):
        damaged = damaged_files(path / tag)
        if not damaged:
            return path / tag
        print(f"warning: checkpoint {path / tag} is damaged ({', '.join(damaged[:3])}); trying the previous one",
              file=sys.stderr)
    raise ValueError(f"every complete checkpoint in '{path}' is damaged")


def resolve_device(name: str) -> torch.device:
    """--device: auto (cuda when available), cpu, cuda or cuda:N, checked before any weights load."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no usable CUDA GPU (torch {torch.__version__}): "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return device


PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def resolve_precision(name: str, device: torch.device, cuda_default: str) -> str:
    """--precision: fp32 (IEEE matmuls), tf32 (fp32 with TF32 tensor-core matmuls, CUDA only) or
    bf16 (autocast, as in training); auto is `cuda_default` on a GPU and fp32 on a CPU."""
    if name not in PRECISIONS:
        raise ValueError(f"--precision {name!r}: use one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return cuda_default if device.type == "cuda" else "fp32"
    if name == "tf32" and device.type != "cuda":
        raise ValueError("--precision tf32 needs a CUDA GPU (TF32 is a tensor-core format): use fp32 or bf16")
    return name


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device):
    """Runs the block with `precision` (see resolve_precision), restoring the TF32 switches after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def holds_weights(module_state: dict | None) -> bool:
    """False for ZeRO-3 model states: their tensors are empty placeholders (the weights live in
    the optimizer partitions)."""
    # Transformer Engine's _extra_state (its FP8 scaling state) is a non-empty tensor even there
    return bool(module_state) and any(t.numel() for t in strip_extra_state(module_state).values()
                                      if torch.is_tensor(t))


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
    # Transformer Engine's linears (fp8.backend=te) add FP8 scaling state the plain model has no
    # place for; ZeRO-3's consolidated names keep activation checkpointing's wrapper in their path
    model.load_state_dict({plain_name(k): v.float() for k, v in strip_extra_state(weights).items()})
    model.to(device).eval()
    return LoadedModel(model, config, ckpt, int(state.get("step", 0)), source)


def training_data(ckpt: Path, data_path: str | Path | None = None) -> tuple[dict, Path]:
    """(manifest, tokenizer.json) of the data the checkpoint was trained on: the copies inside the
    checkpoint, or (older checkpoints) those of its run's data.path, or of `data_path`."""
    import json

    from .data import load_manifest

    if (ckpt / DATA_MANIFEST).is_file() and (ckpt / "tokenizer" / "tokenizer.json").is_file():
        return json.loads((ckpt / DATA_MANIFEST).read_text()), ckpt / "tokenizer" / "tokenizer.json"
    if data_path is None:
        raise FileNotFoundError(f"{ckpt} holds no copy of its training data's manifest and tokenizer: pass the "
                                "data_prep output it was trained on (--data)")
    return load_manifest(data_path), Path(data_path) / "tokenizer" / "tokenizer.json"


def check_same_tokenizer(ckpt: Path, trained_on: dict, data_dir: str | Path, manifest: dict) -> list[str]:
    """Raise ValueError when `data_dir` was tokenized differently from the checkpoint's training
    data; returns warnings for differences that still allow evaluation (sequence length)."""
    a, b = trained_on["tokenizer"], manifest["tokenizer"]
    if a.get("files") != b.get("files") or a.get("vocab_size") != b.get("vocab_size"):
        raise ValueError(f"data '{data_dir}' was tokenized with {b.get('name')} (vocab {b.get('vocab_size')}, files "
                         f"{b.get('files')}), but {ckpt} was trained on {a.get('name')} (vocab {a.get('vocab_size')}, "
                         f"files {a.get('files')}): evaluate on data prepared with the checkpoint's tokenizer")
    if int(manifest["seq_len"]) != int(trained_on["seq_len"]):
        return [f"data '{data_dir}' holds sequences of {manifest['seq_len']} tokens; {ckpt} was trained on "
                f"{trained_on['seq_len']}"]
    return []


def checkpoint_run_config(ckpt: Path) -> dict:
    """The run config of a checkpoint, read without loading its weights (run_config.json, or the
    model states file memory-mapped for checkpoints written before it existed)."""
    saved = saved_run_config(ckpt)
    if saved is not None:
        return saved
    states = sorted(ckpt.glob("mp_rank_00_model_states.pt")) or sorted(ckpt.glob("*model_states.pt"))
    if not states:
        raise FileNotFoundError(f"{ckpt} has no DeepSpeed model states file")
    return torch.load(states[0], map_location="cpu", mmap=True, weights_only=False)["run_config"]
