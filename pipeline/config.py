"""The resolved configuration of a training run (one dataclass per component)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from model.config import ModelConfig, expand_preset

from .configtools import ConfigError, load_config
from .precision import FP8Config


@dataclass
class DataConfig:
    path: str = ""                 # a data_prep output directory (holds manifest.json)
    micro_batch_size: int = 8
    shuffle: bool = True
    # consecutive shards of the epoch's seeded order whose samples are permuted together (a block
    # shuffle, deterministic and resumable; data_prep's auto shard holds ~256 MiB of tokens and a
    # rank holds two windows: the one it trains on and the next, read ahead)
    shuffle_window: int = 4
    seed: int = 1234
    eval_split: str = "val"
    # "shard": each rank reads its own 1/W contiguous part of each epoch (scales); "sample": every
    # rank reads every shard and keeps every W-th sample, so the global batches do not depend on
    # the world size.
    split_by: Literal["shard", "sample"] = "shard"
    check_sha256: bool = True      # each shard's bytes against the manifest's sha256 as it is read

    def validate(self) -> None:
        if self.micro_batch_size < 1:
            raise ConfigError("data.micro_batch_size must be >= 1")
        if self.shuffle_window < 1:
            raise ConfigError(f"data.shuffle_window must be >= 1 shard, got {self.shuffle_window}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_steps: int = 2500
    min_lr_ratio: float = 0.1      # cosine / wsd floor as a fraction of lr
    decay_fraction: float = 0.2    # wsd: share of max_steps spent decaying
    grad_clip: float = 1.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps must be >= 0")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    global_batch_size: int = 512   # sequences per optimizer step over all ranks
    seed: int = 42
    # bf16: bf16 weights, fp32 master copy in the optimizer (DeepSpeed bf16). bf16-mixed: fp32
    # weights under torch.autocast (the MDLM reference's recipe; DeepSpeed torch_autocast).
    # fp8: bf16 everywhere + FP8 block matmuls.
    precision: Literal["bf16", "bf16-mixed", "fp32", "fp8"] = "bf16"
    # under bf16/fp8 weights: gradients accumulated over micro-batches and reduced over ranks in
    # fp32 (as Megatron and torchtitan do; at ZeRO-0 only the reduction: DeepSpeed accumulates
    # in bf16 there) or in bf16 (half the traffic and gradient memory, rounded at every
    # micro-batch and every reduction hop)
    grad_precision: Literal["fp32", "bf16"] = "fp32"
    # fp32 gradients over bf16 weights (DeepSpeed's BF16_Optimizer, ZeRO-1): one mixed-dtype add
    # per parameter and micro-batch instead of DeepSpeed's zero fill + add + cast + add, the bf16
    # gradients freed after it (pipeline/adapters.fuse_bf16_grad_update; the same sums bit for bit)
    fuse_grad_update: bool = True
    zero_stage: int = 2
    deepspeed_config: str = ""     # optional JSON merged under the generated DeepSpeed config
    ema: float = 0.9999            # 0 disables EMA
    log_every: int = 10
    eval_every: int = 0            # 0 = only at the end
    checkpoint_every: int = 0      # 0 = only at the end
    keep_last: int = 3
    max_bad_steps: int = 5         # non-finite losses in a row before aborting
    # exit status after SIGTERM/SIGUSR1 and the checkpoint it triggers: 0 where the launcher
    # decides about restarting (SLURM requeue), non-zero (e.g. 143) where only a failed process is
    # restarted (Kubernetes restartPolicy OnFailure), else the stopped job would count as finished
    exit_code_on_signal: int = 0
    activation_checkpointing: bool = False
    compile: bool = False          # torch.compile each transformer block
    # scaled_dot_product_attention's preferred kernel on GPUs: default (torch's order: flash
    # first) | cudnn (cuDNN's fused attention) | flash | efficient; the others stay as fallbacks
    attention_backend: Literal["default", "cudnn", "flash", "efficient"] = "default"
    record_sample_keys: bool = False  # append "step<TAB>key" per rank to <run_dir>/sample_keys/

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.max_steps < 1 or self.global_batch_size < 1:
            raise ConfigError("train.max_steps and train.global_batch_size must be >= 1")
        if not 0.0 <= self.ema < 1.0:
            raise ConfigError("train.ema must be in [0, 1)")
        if self.log_every < 1 or self.max_bad_steps < 1:
            raise ConfigError(f"train.log_every={self.log_every} and train.max_bad_steps={self.max_bad_steps} "
                              f"must be >= 1")
        for name in ("eval_every", "checkpoint_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0 (0: "
                                  f"{'keep every checkpoint' if name == 'keep_last' else 'only at the end'})")
        if not 0 <= self.exit_code_on_signal <= 255:
            raise ConfigError(f"train.exit_code_on_signal={self.exit_code_on_signal} must be an exit status in [0, 255]")


@dataclass
class ParallelConfig:
    tensor: int = 1                # tensor-parallel size (megatron-core layers); data parallel = world / tensor
    sequence_parallel: bool = False
    # the output head's rows padded to a multiple of this x tensor, so every rank's matmuls are
    # aligned (model/tensor_parallel.py); 1 pads to a multiple of tensor only, as checkpoints
    # written before this setting did (they resume with parallel.head_multiple=1)
    head_multiple: int = 128

    def validate(self) -> None:
        if self.tensor < 1:
            raise ConfigError(f"parallel.tensor={self.tensor} must be >= 1")
        if self.head_multiple < 1:
            raise ConfigError(f"parallel.head_multiple={self.head_multiple} must be >= 1")
        if self.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel=true is not implemented yet; "
                              "use tensor parallelism without it")


@dataclass
class EvalConfig:
    time_samples: int = 4          # K Monte Carlo times per sequence for the NELBO
    max_batches: int = 0           # 0 = the whole split
    batch_size: int = 0            # 0 = data.micro_batch_size
    use_ema: bool = True
    seed: int = 0
    # name -> a data_prep output directory, evaluated beside data.eval_split and logged as
    # eval/<name>/...: its val split, or its train split where it has no val shards (a corpus
    # prepared for evaluation alone); same tokenizer and seq_len as data.path
    corpora: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        for name in self.corpora:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ConfigError(f"eval.corpora: the name {name!r} becomes MLflow metrics eval/{name}/... and a "
                                  "key of dotted overrides: use letters, digits, '_' and '-' only")
        if self.time_samples < 2:
            raise ConfigError(f"eval.time_samples={self.time_samples}: the bound's standard error needs at "
                              "least 2 Monte Carlo times per sequence; use 2 or more")


@dataclass
class SampleConfig:
    num_samples: int = 4
    steps: int = 128
    length: int = 0                # 0 = the data's seq_len
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    # an AR checkpoint of this project (same tokenizer) or a Hugging Face causal-LM directory:
    # the final samples' generative perplexity, logged as sample/gen_ppl ("" = entropy only)
    judge: str = ""

    def validate(self) -> None:  # checked at start, not after the whole training run
        if not 0.0 < self.temperature < float("inf"):
            raise ConfigError(f"sample.temperature={self.temperature}: must be > 0")
        if self.num_samples < 0:
            raise ConfigError(f"sample.num_samples={self.num_samples}: use 0 (no samples) or more")
        if self.steps < 1:
            raise ConfigError(f"sample.steps={self.steps}: the reverse process needs at least 1 step")
        if self.length < 0:
            raise ConfigError(f"sample.length={self.length}: use 0 (the data's seq_len) or a positive length")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sample.top_p={self.top_p}: must be in (0, 1]")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""                  # "" = $MLFLOW_TRACKING_URI or sqlite:///<run_dir>/mlflow.db
    experiment: str = "mdlm-pretrain"
    run_name: str = ""
    # rank 0's node under MLflow's system/ names: CPU, memory, and per-GPU utilisation, memory
    # and power through NVML (nvidia-ml-py) on GPU nodes
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0

    def validate(self) -> None:
        if self.system_metrics_interval_s <= 0:
            raise ConfigError("tracking.system_metrics_interval_s must be > 0")


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        if not self.data.path:
            raise ConfigError("data.path is required: the directory written by `python -m data_prep`")
        if not (Path(self.data.path) / "manifest.json").is_file():
            raise ConfigError(f"data.path '{self.data.path}' has no manifest.json; run "
                              "`python -m data_prep --out <dir> ...` first or fix the path")
        self._check_splits()
        self._check_corpora()
        if self.train.precision == "fp8" and self.fp8.backend == "te" and self.train.activation_checkpointing:
            raise ConfigError("train.activation_checkpointing with fp8.backend=te is not supported: torch's "
                              "checkpoint recomputes the blocks outside TE's fp8_autocast, so their backward "
                              "would not be FP8; use fp8.backend=torchao or turn activation checkpointing off")
        tp = self.parallel.tensor
        if tp > 1 and self.train.precision == "fp8" and self.fp8.keep_first_last_block_bf16:
            raise ConfigError("fp8.keep_first_last_block_bf16 applies with parallel.tensor=1 only: megatron-core's "
                              "Transformer Engine layers run every block in FP8; drop the setting or use "
                              "parallel.tensor=1")
        if tp > 1:
            m = self.model
            if m.n_heads % tp or (m.mlp_ratio * m.d_model) % tp:
                raise ConfigError(f"parallel.tensor={tp} must divide model.n_heads={m.n_heads} and the "
                                  f"MLP width {m.mlp_ratio * m.d_model}")
        if tp > 1 and self.train.zero_stage == 0 and self.train.precision in ("bf16", "fp8"):
            # DeepSpeed's optimizer for bf16 weights at ZeRO-0 sums the gradient norm over the
            # tensor-parallel shards of rank 0 only: clipping and train/grad_norm would be wrong
            raise ConfigError(f"train.precision={self.train.precision} with parallel.tensor > 1 needs "
                              f"train.zero_stage >= 1 (at ZeRO-0 DeepSpeed's gradient norm misses the other "
                              f"tensor-parallel ranks' shards): use train.zero_stage=1")


    def _check_splits(self) -> None:
        """Training reads the train split and every evaluation the eval split: both must hold shards
        before any work (an empty eval split would otherwise fail hours in, at the first eval)."""
        try:
            splits = json.loads((Path(self.data.path) / "manifest.json").read_text()).get("splits", {})
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.path '{self.data.path}': manifest.json is unreadable ({err})") from err
        usable = sorted(name for name, split in splits.items() if split.get("shards"))
        for name, fix in (("train", "rerun data_prep on a corpus with text in it"),
                          (self.data.eval_split, f"set data.eval_split to one of {usable} or rerun data_prep "
                                                 "with --val-fraction > 0 (each document goes to val with that "
                                                 "probability: a small corpus may need a larger one)")):
            if name not in usable:
                raise ConfigError(f"data.path '{self.data.path}' has no shards in split '{name}' "
                                  f"(splits with shards: {', '.join(usable) or 'none'}): {fix}")


    def _check_corpora(self) -> None:
        """Each extra evaluation corpus holds shards and was tokenized like the training data (its
        token ids must mean the same), at the same sequence length."""
        train = json.loads((Path(self.data.path) / "manifest.json").read_text())
        for name, path in self.eval.corpora.items():
            where = f"eval.corpora.{name} ({path})"
            try:
                manifest = json.loads((Path(path) / "manifest.json").read_text())
            except (OSError, ValueError) as err:
                raise ConfigError(f"{where}: no readable manifest.json ({err}); point it at a `python -m "
                                  "data_prep` output") from err
            if corpus_split(manifest) is None:
                raise ConfigError(f"{where} has no shards in its val or train split")
            mine, theirs = train.get("tokenizer", {}), manifest.get("tokenizer", {})
            identity = ("files", "bos_id", "eos_id")
            if ([mine.get(k) for k in identity], train.get("mask_token_id"), train.get("model_vocab_size")) != (
                    [theirs.get(k) for k in identity], manifest.get("mask_token_id"), manifest.get("model_vocab_size")):
                raise ConfigError(f"{where} was tokenized with {theirs.get('name')!r} (vocab "
                                  f"{theirs.get('vocab_size')}), the training data with {mine.get('name')!r} (vocab "
                                  f"{mine.get('vocab_size')}): prepare it with the training data's tokenizer "
                                  f"(`python -m data_prep --tokenizer {Path(self.data.path) / 'tokenizer'} ...`)")
            if manifest.get("seq_len") != train.get("seq_len"):
                raise ConfigError(f"{where} has seq_len {manifest.get('seq_len')}, the training data "
                                  f"{train.get('seq_len')}: prepare it with --seq-len {train.get('seq_len')}")


def corpus_split(manifest: dict) -> str | None:
    """The split an extra evaluation corpus is evaluated on: val, or train where val has no shards."""
    splits = manifest.get("splits", {})
    return next((name for name in ("val", "train") if splits.get(name, {}).get("shards")), None)


def _prepare(raw: dict) -> dict:
    if isinstance(raw.get("model"), dict):
        raw["model"] = expand_preset(raw["model"])
    return raw


def load_run_config(path: str | None, overrides: list[str] | None = None) -> RunConfig:
    return load_config(RunConfig, path, overrides, prepare=_prepare)
