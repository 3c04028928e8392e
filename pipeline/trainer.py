"""The training loop: a DeepSpeed engine around the MDLM (or AR) model, streaming shards,
checkpointing everything stateful, evaluating and sampling, tracking to MLflow from rank 0."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from model.config import ModelConfig
from model.dit import count_parameters
from model.mdlm import MDLM, build_model
from model.noise import step_rows, stratified_times
from model.tensor_parallel import strip_extra_state

from . import metrics
from .adapters import (apply_activation_checkpointing, attention_backend, compile_blocks, fuse_bf16_grad_update,
                       guard_non_finite_steps, plain_name, zero3_leaf_blocks)
from .checkpoint import (DATA_MANIFEST, CheckpointManager, all_ranks_agree, complete_tags, config_differences,
                         lock_run_dir)
from .config import RunConfig, corpus_split
from .configtools import ConfigError, dump_yaml, flatten, to_dict
from .data import ShardStream, batches, load_manifest
from .ema import GATHER_ELEMENTS, make_ema
from .precision import apply_fp8, check_fp8, te_autocast
from .distributed import init_distributed
from .tracking import Tracker, default_tracking_uri, sqlite_artifact_dir

log = logging.getLogger("mdlm.trainer")


def resolve_vocab(model_cfg: ModelConfig, manifest: dict) -> None:
    """The data decides the vocabulary: model vocab = tokenizer vocab (+1 [MASK] when it has none)."""
    vocab = int(manifest["model_vocab_size"])
    mask_id = int(manifest["mask_token_id"])
    if model_cfg.vocab_size not in (0, vocab):
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} but the data's manifest says "
                          f"{vocab}; drop model.vocab_size to take it from the data")
    model_cfg.vocab_size = vocab
    model_cfg.mask_token_id = mask_id
    model_cfg.validate()


def lr_lambda(cfg: RunConfig):
    o, total = cfg.optim, cfg.train.max_steps

    def factor(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "cosine":
            progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = total - int(o.decay_fraction * total)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return 1.0 - (1.0 - o.min_lr_ratio) * progress

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices of linear layers only; embeddings, norms, biases and adaLN biases are exempt."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False}]


def _another_runs_checkpoint(resume: str | None, run_dir: Path) -> bool:
    """--resume names a step directory outside run_dir/checkpoints."""
    if resume in (None, "auto") or not Path(resume).is_dir():
        return False
    return Path(resume).resolve().parent != (run_dir / "checkpoints").resolve()


def apply_optim_config(scheduler, cfg: RunConfig, log_changes: bool = False) -> None:
    """After a resume: the optimizer state brings back the hyperparameters it was saved with, and
    the LR schedule its base learning rate. The config's own (optim.lr, weight_decay, betas, eps)
    apply from here on, at the restored position of the schedule; an unchanged config changes
    nothing. Which groups decay: param_groups marks them (checkpoints from before the mark: the
    first group, as param_groups orders them)."""
    o = cfg.optim
    changed = set()
    for i, group in enumerate(scheduler.optimizer.param_groups):
        want = {"initial_lr": o.lr, "betas": tuple(o.betas), "eps": o.eps,
                "weight_decay": o.weight_decay if group.get("decay", i == 0) else 0.0}
        for key, value in want.items():
            if key in group and (tuple(group[key]) if key == "betas" else group[key]) != value:
                changed.add(f"optim.{'lr' if key == 'initial_lr' else key}")
                group[key] = value
        if scheduler.base_lrs[i] != o.lr:
            changed.add("optim.lr")
            scheduler.base_lrs[i] = o.lr
        # the restored group LR is the old schedule's: a changed schedule (max_steps, warmup, ...)
        # must set the next step's LR too, not only the steps after it
        group["lr"] = scheduler.base_lrs[i] * scheduler.lr_lambdas[i](scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]  # what get_last_lr() tells
    if changed and log_changes:
        log.info("resumed with %s from the config (the checkpoint's optimizer had others)", ", ".join(sorted(changed)))


def offload_device(zero: dict, key: str) -> str | None:
    """'cpu' or 'nvme' when the ZeRO section offloads `key` (offload_optimizer / offload_param)."""
    device = (zero.get(key) or {}).get("device", "none")
    return None if device in (None, "none") else str(device)


def build_deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed JSON: an optional file from configs/deepspeed/ with the run's batch sizes,
    precision, clipping and ZeRO stage written over it."""
    t = cfg.train
    per_step = cfg.data.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"data.micro_batch_size x world size = {per_step}")
    ds: dict = {}
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed_config '{path}' does not exist")
        ds = json.loads(path.read_text())
    zero = dict(ds.get("zero_optimization", {}))
    if "stage" in zero and int(zero["stage"]) != t.zero_stage:
        raise ConfigError(f"train.deepspeed_config '{t.deepspeed_config}' sets zero_optimization.stage="
                          f"{zero['stage']} but train.zero_stage={t.zero_stage}: pass train.zero_stage="
                          f"{zero['stage']} (the stage is decided by train.zero_stage)")
    if offload_device(zero, "offload_param") and t.zero_stage != 3:
        raise ConfigError(f"train.deepspeed_config '{t.deepspeed_config}' offloads parameters "
                          f"(offload_param), which needs ZeRO-3: pass train.zero_stage=3")
    if offload_device(zero, "offload_optimizer") and t.zero_stage == 0:
        raise ConfigError(f"train.deepspeed_config '{t.deepspeed_config}' offloads the optimizer "
                          f"(offload_optimizer), which needs ZeRO 1-3: pass train.zero_stage=1, 2 or 3")
    zero["stage"] = t.zero_stage
    if t.precision in ("bf16", "fp8") and t.grad_precision == "fp32":  # the JSON's own choice wins
        ds.setdefault("communication_data_type", "fp32")
        if t.zero_stage >= 1:  # ZeRO-1: DeepSpeed's BF16_Optimizer; DeepSpeed has none for ZeRO-0
            ds["data_types"] = {"grad_accum_dtype": "fp32", **ds.get("data_types", {})}
    ds.update({
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {**ds.get("bf16", {}), "enabled": t.precision in ("bf16", "fp8")},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # bf16-mixed reduces (and ZeRO-3 gathers) in fp32 like DDP under autocast, unless the
        # JSON names lower_precision_safe_modules; DeepSpeed's default would pick every nn.Linear
        "torch_autocast": {"lower_precision_safe_modules": [], **ds.get("torch_autocast", {}),
                           "enabled": t.precision == "bf16-mixed", "dtype": "bfloat16"},
        "steps_per_print": 10**9,
    })
    return ds


def make_engine(model: torch.nn.Module, cfg: RunConfig, world_size: int, device: torch.device, mpu=None):
    """DeepSpeed engine with the project's AdamW (fused on GPU) and LR schedule. `world_size` is
    the data-parallel size; `mpu` (pipeline/parallel.py) hands DeepSpeed the TP x DP groups so
    ZeRO shards over the data-parallel group only."""
    import deepspeed

    ds_config = build_deepspeed_config(cfg, world_size)
    groups = param_groups(model, cfg.optim.weight_decay)
    hyper = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if offload_device(ds_config["zero_optimization"], "offload_optimizer"):
        # the fp32 master weights and moments live in host memory: DeepSpeed's vectorised CPU
        # AdamW steps them there (a torch optimizer is refused by ZeRO-Offload)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
    else:
        optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda", **hyper)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # DeepSpeed would otherwise bind LOCAL_RANK's GPU itself: wrong where each task sees one GPU
    index = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else None
    args = SimpleNamespace(device_rank=index) if device.type == "cuda" else None
    engine, _, _, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=ds_config, dist_init_required=False, mpu=mpu)
    if cfg.train.fuse_grad_update and fuse_bf16_grad_update(engine):
        log.info("fp32 gradients over bf16 weights: fused update (train.fuse_grad_update)")
    guard_non_finite_steps(engine)
    if cfg.train.precision == "bf16-mixed" and not getattr(engine, "torch_autocast_enabled", lambda: False)():
        raise ConfigError(f"train.precision=bf16-mixed needs DeepSpeed's torch_autocast (deepspeed "
                          f"{deepspeed.__version__} lacks it): upgrade deepspeed or use train.precision=bf16")
    return engine, scheduler


def te_linear_layout(config: dict) -> tuple[bool, bool]:
    """Which block projections of a run config are Transformer Engine modules, whose state
    includes an _extra_state entry: none, all, or all but the first and last block's. A resume
    loads strictly only between equal layouts."""
    fp8 = config.get("fp8", {})
    te = config.get("train", {}).get("precision") == "fp8" and fp8.get("backend") == "te"
    return te, te and bool(fp8.get("keep_first_last_block_bf16", False))


def _check_names(filled, targets: dict, source: str) -> None:
    missing, extra = sorted(set(targets) - set(filled)), sorted(set(filled) - set(targets))
    if missing or extra:
        raise RuntimeError(f"{source} does not match the evaluation model: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")


def _fill(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if target.shape != source.shape:
        raise RuntimeError(f"{name}: shape {tuple(source.shape)} where the evaluation model has {tuple(target.shape)}")
    target.copy_(source)


class Trainer:
    def __init__(self, cfg: RunConfig, resume: str | None = None):
        self.cfg = cfg
        # record SIGTERM/SIGUSR1 from the start: one that arrives while DeepSpeed initialises
        # (preemption, a requeue's time-limit warning) stops the run after its first step
        self.stop_signal: int | None = None
        self._run_dir_lock = None
        self._install_signal_handlers()
        try:
            self._start(cfg, resume)
        except BaseException:  # a failed start in a long-lived process (a notebook) frees the run_dir
            self._release()    # and gives the process its signal handlers back
            raise

    def _start(self, cfg: RunConfig, resume: str | None) -> None:
        if cfg.parallel.tensor > 1:
            # megatron-core's layers overlap their async tensor-parallel all-reduce with the weight
            # gradient only when the GPU has one hardware queue; read when the CUDA context starts
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        self.dist = init_distributed()
        self.rank, self.world = self.dist.rank, self.dist.world_size
        self.device = self.dist.device
        if self.device.type == "cuda":
            # fp32 work (evaluation, sampling, train.precision=fp32) on tensor cores, as bf16 runs do
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # tensor x data parallel: the data stream, the noise rows and ZeRO follow the data-parallel
        # rank; the ranks of one tensor-parallel group see the same samples
        self.tp, self.mpu = cfg.parallel.tensor, None
        self.dp_rank, self.dp_world = self.rank, self.world
        if self.tp > 1:
            from .parallel import MegatronMPU, initialize

            try:
                layout = initialize(self.tp)
            except ValueError as err:
                raise ConfigError(str(err)) from err
            self.dp_rank, self.dp_world, self.mpu = layout.data_rank, layout.data, MegatronMPU()
        self.run_dir = Path(cfg.run_dir)
        # before any model or engine is built: a second launch into a run_dir in use stops here
        self._run_dir_lock, held_by = lock_run_dir(self.run_dir) if self.rank == 0 else (None, None)
        if not all_ranks_agree(held_by is None, self.device):
            raise ConfigError(f"run_dir '{self.run_dir}' is in use by another training process "
                              f"({held_by or 'see rank 0'}): wait for it to end or stop it, or choose another run_dir")
        self._build(cfg, resume)

    def _build(self, cfg: RunConfig, resume: str | None) -> None:
        """Everything a start builds once it holds the run_dir: model, engine, data, checkpoint, MLflow."""
        existing = complete_tags(self.run_dir / "checkpoints")
        if not all_ranks_agree(not (existing and _another_runs_checkpoint(resume, self.run_dir)), self.device):
            # the same command again (a requeue) after this run_dir was started from another run's
            # checkpoint: it continues this run instead of starting over from that checkpoint
            if self.rank == 0:
                log.warning("--resume %s names another run's checkpoint, but run_dir %s already holds its own "
                            "(newest %s): continuing those (--resume auto)", resume, self.run_dir,
                            existing[-1] if existing else "on another rank")
            resume = "auto"
        if not all_ranks_agree(resume is not None or not existing, self.device):
            raise ConfigError(f"run_dir '{self.run_dir}' already holds checkpoints of a run (newest: "
                              f"{existing[-1] if existing else 'on another rank'}): pass --resume auto to "
                              f"continue it, or another run_dir to start a new run")
        self.manifest = load_manifest(cfg.data.path)
        resolve_vocab(cfg.model, self.manifest)
        self.seq_len = int(self.manifest["seq_len"])
        if cfg.sample.judge and cfg.sample.num_samples:  # before training, not at its end
            from .genppl import check_judge

            try:
                check_judge(cfg.sample.judge, self.manifest, warn=self.rank == 0)
            except (OSError, ValueError, RuntimeError) as err:
                raise ConfigError(f"sample.judge={cfg.sample.judge}: {err}") from err
        t = cfg.train
        if t.precision == "fp8":
            ar = cfg.model.objective == "ar"
            check_fp8(cfg.fp8, cfg.model.d_model, cfg.model.mlp_ratio,
                      cfg.data.micro_batch_size * (self.seq_len - 1 if ar else self.seq_len), self.device, self.tp,
                      autoregressive=ar)
            if cfg.fp8.backend == "torchao" and not t.compile and self.rank == 0:
                log.warning("fp8.backend=torchao without train.compile: its scaling and casts then run as "
                            "separate kernels, which can make FP8 slower than bf16; set train.compile=true")
        self.grad_accum = build_deepspeed_config(cfg, self.dp_world)["gradient_accumulation_steps"]

        torch.manual_seed(t.seed)  # identical initial weights on every rank (TP: shards of them)
        model = build_model(cfg.model, self._tp_layers(cfg) if self.tp > 1 else None)
        if t.precision == "fp8" and self.tp == 1:
            converted = apply_fp8(model, cfg.fp8, self.device)
            if self.rank == 0:
                log.info("fp8 (%s, %s) on %d block linears", cfg.fp8.backend, cfg.fp8.recipe, len(converted))
        self._fp8_context = (lambda: te_autocast(cfg.fp8)) if t.precision == "fp8" else contextlib.nullcontext
        if t.activation_checkpointing:
            apply_activation_checkpointing(model)
        if t.compile:
            compile_blocks(model)
            if t.zero_stage == 3:
                zero3_leaf_blocks(model)
        self.is_mdlm = isinstance(model, MDLM)
        if self.tp > 1:
            from model.tensor_parallel import full_parameter_counts, tp_layout

            # keyed like the state dict (activation checkpointing's wrappers leave no trace there)
            self.tp_layout = {plain_name(k): v for k, v in tp_layout(model).items()}
            self.n_params, n_matmul, n_conditioning = full_parameter_counts(model)
        else:
            self.tp_layout, self.n_params = {}, count_parameters(model)
            n_matmul, n_conditioning = metrics.matmul_params(model), metrics.conditioning_params(model)
        self.flops_per_token = metrics.model_flops_per_token(cfg.model, n_matmul, self.seq_len, n_conditioning)
        # Transformer Engine layers (megatron-core's, and apply_fp8's) reuse their FP8 weight copies
        # after a forward with is_first_microbatch=True until it is set again: set it at each
        # step's first micro-batch, or the blocks would compute with the first step's weights forever
        self._te_weight_caches = [m for m in model.modules() if hasattr(m, "is_first_microbatch")]
        self.engine, self.scheduler = make_engine(model, cfg, self.dp_world, self.device, mpu=self.mpu)
        # dropout streams differ per data-parallel rank and agree within a tensor-parallel group
        # (the residual stream is replicated there)
        torch.manual_seed(t.seed + 7919 * (self.dp_rank + 1))
        self.ema = make_ema(self.engine, t.zero_stage, t.ema) if t.ema > 0 else None
        if self.ema is not None and self.rank == 0:
            log.info("EMA (decay %g): %s", t.ema, self.ema.describe())

        self.stream = ShardStream(cfg.data.path, "train", self.dp_rank, self.dp_world, cfg.data.seed, cfg.data.shuffle,
                                  split_by=cfg.data.split_by, check_sha256=cfg.data.check_sha256,
                                  shuffle_window=cfg.data.shuffle_window)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", t.keep_last, self.rank, self.device)
        self.step = 0
        self.tokens_seen = 0
        self.bad_steps = 0
        self.skipped_steps = 0
        self.mlflow_run_id: str | None = None
        self.mlflow_run_token: str | None = None  # tags the MLflow run: found even if it opened after a save
        self._saved_step: int | None = None  # the step of the newest checkpoint this run holds
        self._parent_mlflow_run_id: str | None = None  # the run whose checkpoint started this one
        self._resume_changes: list[str] = []
        if resume:
            state = self.checkpoints.load(self.engine, resume, check=self._check_resumable)
            self._restore(state, own_run=self.checkpoints.loaded_from_own_folder)
            if state:
                apply_optim_config(self.scheduler, cfg, log_changes=self.rank == 0)
        if self.rank == 0:  # the resolved config of this start, with or without MLflow
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.run_dir / "config.yaml.tmp"
            tmp.write_text(dump_yaml(cfg))
            os.replace(tmp, self.run_dir / "config.yaml")
        self._batches = batches(self.stream, cfg.data.micro_batch_size)
        self._keys_file = None
        if t.record_sample_keys:
            (self.run_dir / "sample_keys").mkdir(parents=True, exist_ok=True)
            self._keys_file = open(self.run_dir / "sample_keys" / f"rank{self.rank}.tsv", "a")
        # Fault injection for tests of the non-finite guard: MDLM_INJECT_NAN_STEPS="5,6".
        self._inject_nan_steps = {int(s) for s in os.environ.get("MDLM_INJECT_NAN_STEPS", "").split(",") if s}
        # last: from here on train.py ends the MLflow run FAILED or KILLED if training does not finish
        self.tracker = self._start_tracking() if self.rank == 0 and cfg.tracking.enabled else None

    # ---- setup helpers -------------------------------------------------------------------
    def _tp_layers(self, cfg: RunConfig):
        from model.tensor_parallel import MegatronTPLayers, te_available

        use_te = False
        if cfg.train.precision == "fp8":
            if cfg.fp8.backend != "te" or not te_available():
                raise ConfigError("train.precision=fp8 with parallel.tensor > 1 needs fp8.backend=te and "
                                  "Transformer Engine importable (megatron-core's TE tensor-parallel layers)")
            use_te = True
        if cfg.train.precision == "bf16-mixed" and self.device.type != "cuda":
            raise ConfigError("train.precision=bf16-mixed with parallel.tensor > 1 needs a GPU: megatron-core's "
                              "tensor-parallel layers replay autocast in their backward for CUDA only; on a CPU "
                              "use train.precision=bf16 or fp32")
        return MegatronTPLayers(use_te=use_te, head_multiple=cfg.parallel.head_multiple)

    def end_tracking(self, status: str, timeout_s: float = 30.0) -> None:
        """Rank 0: deliver what MLflow has queued and close its run as `status` (FINISHED,
        KILLED after a stop signal, FAILED after an error; a resume reopens it as RUNNING)."""
        if self.tracker is not None and not self.tracker.closed:
            self.tracker.end(status, timeout_s=timeout_s)

    def close(self, status: str | None = None) -> None:
        """Deliver what MLflow still has queued (a run stopped by a signal skips finish()) and end
        its run as `status` if given, then leave the process groups (megatron-core's, then
        torch's) together with every rank."""
        from .distributed import shutdown_distributed

        if status:
            self.end_tracking(status, timeout_s=60.0)
        if self.tracker is not None and not self.tracker.closed and not self.tracker.flush(60.0):
            log.warning("MLflow: tracking calls still queued at exit were not delivered to %s", self.tracker.uri)
        if self.tp > 1:
            from .parallel import destroy

            destroy()
        shutdown_distributed()
        self._release()

    def _release(self) -> None:
        """What a start holds beyond its objects: the run_dir lock and the process's signal handlers."""
        if self._run_dir_lock is not None:
            self._run_dir_lock.close()
            self._run_dir_lock = None
        for sig, previous in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, previous)
        self._previous_handlers = {}

    @property
    def _eval_model_is_collective(self) -> bool:
        """Building the evaluation model takes every rank (TP shards, ZeRO-3 partitions or a
        partitioned EMA)."""
        ema_collective = self.ema is not None and self.ema.collective and self.cfg.eval.use_ema
        return self.tp > 1 or self.cfg.train.zero_stage == 3 or ema_collective

    @contextlib.contextmanager
    def _gathered(self):
        if self.cfg.train.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters())):
                yield
        else:
            yield

    @property
    def _unsaved_run_file(self) -> Path:
        """The MLflow run token of a start that has no checkpoint yet: a restart before the first
        checkpoint reopens that run (else it stays RUNNING and a second run begins)."""
        return self.run_dir / "mlflow_run.json"

    def _logged_metrics(self) -> dict[int, dict]:
        """metrics.jsonl up to the resumed step, {step: {name: value}}: the train and eval lines
        of a step merged, and of a metric logged twice at a step (an earlier restart ran the step
        again) the last line."""
        rows: dict[int, dict] = {}
        try:
            with open(self.run_dir / "metrics.jsonl") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except ValueError:  # a line cut by a kill
                        continue
                    step = row.pop("step", None) if isinstance(row, dict) else None
                    if isinstance(step, int) and 0 < step <= self.step:
                        rows.setdefault(step, {}).update(
                            (k, v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        except OSError:
            pass
        return rows

    def _start_tracking(self) -> Tracker | None:
        tc = self.cfg.tracking
        uri = tc.uri or default_tracking_uri(self.run_dir)
        restart = False  # a start over after a kill before this run_dir's first checkpoint
        if self._saved_step is None and self.mlflow_run_token is None and self._unsaved_run_file.is_file():
            try:
                self.mlflow_run_token = json.loads(self._unsaved_run_file.read_text())["run_token"]
                restart = True
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable: a new run
        try:
            artifacts = sqlite_artifact_dir(uri)
            tracker = Tracker(uri, tc.experiment, tc.run_name, run_id=self.mlflow_run_id,
                              run_token=self.mlflow_run_token, artifact_dir=artifacts,
                              system_metrics=tc.system_metrics, system_metrics_interval_s=tc.system_metrics_interval_s,
                              start_step=self.step)
        except Exception as err:
            log.warning("MLflow tracking unavailable at %s (%s): continuing without it", uri, err)
            return None
        # a new MLflow run (also a resume whose run is not in this store) gets the config; the run
        # may open only later, when a server that does not answer now comes back
        tracker.log_params(flatten(to_dict(self.cfg)), new_run_only=True)
        tracker.log_params({"derived.n_params": self.n_params, "derived.world_size": self.world,
                            "derived.grad_accum": self.grad_accum, "derived.seq_len": self.seq_len}, new_run_only=True)
        tracker.log_artifact(self.run_dir / "config.yaml", new_run_only=True)
        tracker.log_artifact(Path(self.cfg.data.path) / "manifest.json", new_run_only=True)
        if self.step or restart:  # a resume (or a restart): MLflow keeps the params of the run's
            # first start, so the config of this one goes beside them, with what changed (metrics
            # from the checkpoint's step on are logged again: MLflow keeps both values of a step)
            tracker.log_artifact(self.run_dir / "config.yaml", artifact_path=f"resumes/step{self.step:08d}")
            tags = {"mdlm.resumed_at_step": self.step}
            if self._resume_changes:
                tags[f"mdlm.resume.step{self.step:08d}.changed"] = "; ".join(self._resume_changes)[:4000]
            if self._parent_mlflow_run_id:
                tags["mdlm.parent_run_id"] = self._parent_mlflow_run_id
            tracker.set_tags(tags)
        if self.step:  # what an outage kept from MLflow before the checkpoint, if the process was killed
            tracker.backfill(self._logged_metrics())
        self.mlflow_run_id = tracker.run_id or self.mlflow_run_id
        self.mlflow_run_token = tracker.run_token
        if self._saved_step is None:  # a fresh start, or one from another run's checkpoint
            tmp = self._unsaved_run_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"run_token": tracker.run_token, "tracking_uri": uri}))
            os.replace(tmp, self._unsaved_run_file)
        return tracker

    # ---- checkpoint state ----------------------------------------------------------------
    def _gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def client_state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        per_rank = self._gather({"data": self.stream.state_dict(), "rng": rng})
        if self.rank == 0 and self.tracker is not None and self.tracker.run_id:  # it may have opened late
            self.mlflow_run_id = self.tracker.run_id
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "bad_steps": self.bad_steps,  # non-finite steps in a row: the abort counts across a resume
            "world_size": self.world,
            "per_rank": per_rank,
            "ema": self.ema.state_dict() if self.ema else None,
            "run_config": to_dict(self.cfg),
            "mlflow_run_id": self.mlflow_run_id,
            "mlflow_run_token": self.mlflow_run_token,
            # how the weights in this checkpoint's mp_rank_XX files are split (convert_tp reads it)
            "parallel": {"tensor": self.tp, "data": self.dp_world, "layout": self.tp_layout},
        }

    def _check_resumable(self, tag_dir: Path) -> bool:
        """Refuse a checkpoint this config cannot continue; True when its weights must match the
        model key for key (Transformer Engine's FP8 scaling state exists on one side only when
        switching between bf16 and fp8.backend=te)."""
        from .inference import checkpoint_run_config

        try:  # older checkpoints keep the config inside their model states only
            saved = checkpoint_run_config(tag_dir)
        except Exception:  # unreadable: the file check that follows reports it
            return True
        fixed, changed = config_differences(saved, to_dict(self.cfg))
        partitions = len(list(tag_dir.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
        if self.cfg.train.zero_stage >= 1 and partitions and partitions != self.dp_world:
            # DeepSpeed cannot re-partition ZeRO optimizer states over another number of ranks
            fixed.append(f"ZeRO optimizer states partitioned over {partitions} data-parallel ranks -> "
                         f"{self.dp_world} (resume with {partitions} data-parallel ranks)")
        if fixed:
            raise ConfigError(f"checkpoint {tag_dir} cannot be resumed with this config: "
                              f"{'; '.join(fixed)}. Resume with the checkpoint's settings, or start a new run_dir")
        self._resume_changes = changed
        if changed and self.rank == 0:
            log.warning("resuming %s with settings that differ from the checkpoint's: %s", tag_dir, "; ".join(changed))
        return te_linear_layout(saved) == te_linear_layout(to_dict(self.cfg))

    def _restore(self, state: dict | None, own_run: bool = True) -> None:
        """`own_run`: the checkpoint is this run_dir's (False: another run's started this one)."""
        if not state:
            return
        self.step = self._saved_step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_steps = int(state.get("bad_steps", 0))
        if own_run:
            self.mlflow_run_id = state.get("mlflow_run_id")
            self.mlflow_run_token = state.get("mlflow_run_token")
        else:  # another run's checkpoint starts this run_dir: its own MLflow run, not the other's
            self._saved_step = None
            self._parent_mlflow_run_id = state.get("mlflow_run_id")
            if self.rank == 0:
                log.info("started from another run's checkpoint: a new MLflow run (parent %s)",
                         self._parent_mlflow_run_id)
        if self.ema:  # (collective under ZeRO-3)
            self.ema.load_state_dict(state.get("ema"), self.device)
        per_rank = state.get("per_rank") or []
        if state.get("world_size") == self.world and len(per_rank) == self.world:
            mine = per_rank[self.rank]
            self.stream.load_state_dict(mine["data"])
            torch.set_rng_state(mine["rng"]["cpu"])
            if "cuda" in mine["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["rng"]["cuda"], self.device)
        elif per_rank:  # another data-parallel size: the position names it, and the epoch restarts
            self.stream.load_state_dict(per_rank[0]["data"])
        if self.rank == 0:
            log.info("resumed at step %d (%d tokens seen)", self.step, self.tokens_seen)

    def save(self) -> Path:
        self._saved_step = self.step
        data = Path(self.cfg.data.path)
        path = self.checkpoints.save(self.engine, self.step, self.client_state(), attach={
            DATA_MANIFEST: data / "manifest.json", "tokenizer": data / "tokenizer"})
        if self.rank == 0:
            log.info("checkpoint saved: %s", path)
            self._unsaved_run_file.unlink(missing_ok=True)  # the checkpoints carry the run from here
        return path

    # ---- the loop ------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self.stop_signal = signum

        first = []

        def interrupt(signum, _frame):  # Ctrl-C: a checkpoint and a stop, as SIGTERM; again: abort now
            if not first:
                first.append(time.monotonic())
                self.stop_signal = signum
                log.warning("interrupted: checkpointing and stopping after this step (Ctrl-C again to abort "
                            "without a checkpoint)")
            elif time.monotonic() - first[0] > 2.0:  # torchrun relays the terminal's Ctrl-C: the same one
                raise KeyboardInterrupt

        wanted = {signal.SIGTERM: handler, signal.SIGUSR1: handler, signal.SIGINT: interrupt}
        self._previous_handlers = {}
        for sig, new in wanted.items():
            previous = signal.getsignal(sig)
            if sig == signal.SIGINT and previous == signal.SIG_IGN:  # started in the background: keep it so
                continue
            self._previous_handlers[sig] = previous if previous is not None else signal.SIG_DFL
            signal.signal(sig, new)

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _step_noise(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Times stratified over the whole global batch and the masking uniforms for it, drawn
        from (seed, step) alone so they do not depend on the world size or on resuming."""
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + self.step)
        g = self.cfg.train.global_batch_size
        times = stratified_times(g, self.cfg.model.noise_eps, gen)
        uniforms = torch.rand(g, self.seq_len, generator=gen)
        return times, uniforms

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host batch -> device without waiting: a blocking copy to a GPU synchronises its stream,
        which would drain the queued backward before every micro-step."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _pad_loss_scale(self, valids: list) -> torch.Tensor | None:
        """With pad packing, micro-batches count different numbers of tokens, and DeepSpeed averages
        their per-micro-batch means over accumulation and ranks, which is not the step's loss (the
        sum over its tokens / their number). Backward then sees each loss sum times
        dp_world * accumulation / the step's token count, so the averaging gives the step's loss.
        None where every position counts (wrap packing): the plain mean is already exact."""
        if valids[0] is None:
            return None
        counted = sum(float((v if self.is_mdlm else v[:, 1:]).sum()) for v in valids)
        total = torch.tensor(counted, dtype=torch.float64, device=self.device)
        if self.world > 1:  # tensor-parallel ranks hold the same batch: count each once
            dist.all_reduce(total)
            total = total / self.tp
        return (self.dp_world * self.grad_accum / total.clamp_min(1.0)).float()

    def train_step(self) -> dict:
        lr = self.scheduler.optimizer.param_groups[0]["lr"]  # this step's; the schedule moves on at its end
        times, uniforms = self._step_noise() if self.is_mdlm else (None, None)
        mb = self.cfg.data.micro_batch_size
        # summed on the device: NCCL reduces no CPU tensors, and .cpu() per micro-step would sync
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        micro_batches = [next(self._batches) for _ in range(self.grad_accum)]
        scale = self._pad_loss_scale([valid for _, valid, _ in micro_batches])
        for micro, (x0, valid, keys) in enumerate(micro_batches):
            if self._keys_file is not None:
                self._keys_file.write("".join(f"{self.step + 1}\t{k}\n" for k in keys))
                self._keys_file.flush()
            rows = step_rows(micro, mb, self.dp_world, self.dp_rank)
            if micro == 0:
                for module in self._te_weight_caches:
                    module.is_first_microbatch = True
            kwargs = {"valid": self._to_device(valid) if valid is not None else None}
            with self._fp8_context():
                if self.is_mdlm:
                    kwargs["noise"] = self._to_device(uniforms[rows])
                    out = self.engine(self._to_device(x0), self._to_device(times[rows]), **kwargs)
                else:
                    out = self.engine(self._to_device(x0), **kwargs)
            loss = out.loss if scale is None else out.loss_sum * scale
            if self.step + 1 in self._inject_nan_steps:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += out.loss_sum.detach().double()
            tokens += out.num_tokens.detach().double()
        stats = torch.stack([loss_sum, tokens])
        if self.world > 1:
            dist.all_reduce(stats)
        loss_total, token_total = stats.tolist()
        loss = loss_total / token_total
        self.tokens_seen += int(self.cfg.train.global_batch_size * self.seq_len)
        self.step += 1
        # ZeRO's optimizer already refuses a step whose gradients are not finite (and keeps the
        # LR schedule where it was); count such steps and give up after K in a row.
        applied = self.engine.was_step_applied() and math.isfinite(loss)
        if not applied:
            self.bad_steps += 1
            self.skipped_steps += 1
            log.warning("step %d: non-finite loss or gradients (loss %s): update skipped (%d in a row)",
                        self.step, loss, self.bad_steps)
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise FloatingPointError(
                    f"loss or gradients were not finite for {self.bad_steps} steps in a row (last: step "
                    f"{self.step}); training stopped. Lower optim.lr, check the data, or resume from "
                    f"the last checkpoint in {self.checkpoints.root}")
        else:
            self.bad_steps = 0
            if self.ema:
                self.ema.update(self.engine.module)
        grad_norm = self.engine.get_global_grad_norm()
        return {"train/loss": loss, "train/lr": lr,
                "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "train/skipped_steps": self.skipped_steps, "train/epoch": self.stream.epochs_done()}

    def eval_model(self) -> torch.nn.Module:
        """The whole model in fp32 on this rank's device, from the EMA or the trained weights,
        written into it tensor by tensor (collective where they are partitioned): beside the
        training states it costs one fp32 model, never a second whole copy on the host or device."""
        with torch.device(self.device):  # initialised where it runs: no full fp32 model on the host
            model = build_model(self.cfg.model)
        targets = model.state_dict()  # views of the model's tensors: filled in place
        if self.tp > 1:  # gathered from the tensor-parallel shards
            self._fill_from_tp_shards(targets)
        elif self.ema and self.cfg.eval.use_ema:
            _check_names(self.ema.full_state(into=targets), targets, "the EMA")
        else:
            self._fill_from_engine(targets)
        return model.eval()

    def _fill_from_engine(self, targets: dict) -> None:
        state = strip_extra_state(self.engine.module.state_dict(keep_vars=True))
        _check_names({plain_name(n) for n in state}, targets, "the trained model")
        partitioned = [(n, t) for n, t in state.items() if hasattr(t, "ds_id")]  # ZeRO-3 parameters
        for n, t in state.items():
            if not hasattr(t, "ds_id"):
                _fill(targets[plain_name(n)], t.detach(), n)
        # a few ZeRO-3 parameters gathered at a time, not the whole model at once
        start = 0
        while start < len(partitioned):
            end, elements = start + 1, partitioned[start][1].ds_numel
            while end < len(partitioned) and elements + partitioned[end][1].ds_numel <= GATHER_ELEMENTS:
                elements += partitioned[end][1].ds_numel
                end += 1
            import deepspeed

            chunk = partitioned[start:end]
            with deepspeed.zero.GatheredParameters(list({id(t): t for _, t in chunk}.values())):
                for n, t in chunk:
                    _fill(targets[plain_name(n)], t.detach(), n)
            start = end

    def _fill_from_tp_shards(self, targets: dict) -> None:
        if self.ema and self.cfg.eval.use_ema:
            self._merge_tp_shards(self.ema.full_state(), targets)  # this rank's shard: 1/TP of the model
        else:
            with self._gathered():
                self._merge_tp_shards({plain_name(n): t.detach() for n, t in strip_extra_state(
                    self.engine.module.state_dict()).items() if torch.is_tensor(t)}, targets)

    def _merge_tp_shards(self, local: dict, targets: dict) -> None:
        """Tensor by tensor on the device (the shards of one tensor have the same shape on every
        rank; megatron-core pads the vocabulary): one tensor's gather at a time."""
        from model.tensor_parallel import merge_tensors

        from .parallel import tensor_group

        _check_names(local, targets, "the tensor-parallel shards")
        for name in sorted(local):
            mine = local[name].to(self.device, torch.float32).contiguous()
            parts = [torch.empty_like(mine) for _ in range(self.tp)]
            dist.all_gather(parts, mine, group=tensor_group())
            _fill(targets[name], merge_tensors(parts, self.tp_layout[name]) if name in self.tp_layout else parts[0],
                  name)

    def evaluate(self) -> dict:
        from .evaluate import UnreadableSplit, evaluate_likelihood

        e, model = self.cfg.eval, self.eval_model()

        def on(path: str, split: str) -> dict:
            return evaluate_likelihood(model, path, split, e.batch_size or self.cfg.data.micro_batch_size,
                                       e.time_samples, e.max_batches, e.seed, self.rank, self.world, self.device,
                                       check_sha256=self.cfg.data.check_sha256)

        result = on(self.cfg.data.path, self.cfg.data.eval_split)
        if e.corpora:
            result["corpora"] = {}
        for name, path in e.corpora.items():
            try:  # checked at start; gone since (an unmounted disk, a deleted folder): skipped, not fatal
                split = corpus_split(load_manifest(path))
            except (OSError, ValueError) as err:
                split, reason = None, f"{type(err).__name__}: {err}"
            else:
                reason = "no shards in its val or train split"
            if not all_ranks_agree(split is not None, self.device):
                if self.rank == 0:
                    log.warning("eval.corpora.%s (%s) is not readable on every rank (here: %s): skipped",
                                name, path, "readable" if split else reason)
                continue
            try:
                result["corpora"][name] = on(path, split)
            except UnreadableSplit as err:  # every rank raises it: the run goes on without this corpus
                if self.rank == 0 or err.__cause__ is not None:  # and a failing rank says why
                    log.warning("eval.corpora.%s: %s: skipped", name, err)
        return result

    def _evaluate_saving_first_on_failure(self) -> dict:
        """A periodic evaluation that fails (its split unreadable, or out of memory or a bug on some
        rank) stops the run on every rank at once, but not before the steps trained since the last
        checkpoint are saved."""
        from .evaluate import EvaluationFailed

        try:
            return self.evaluate()
        except EvaluationFailed:
            if self._saved_step != self.step:
                self.save()
            raise

    def sample(self, model: torch.nn.Module | None = None) -> tuple[list[str], torch.Tensor | None]:
        """(texts, token ids) of sample.num_samples samples from the model (rank 0)."""
        from tokenizers import Tokenizer

        from model.sampling import ar_sample, mdlm_ancestral

        s = self.cfg.sample
        if s.num_samples == 0:
            return [], None
        model = model if model is not None else self.eval_model()
        gen = torch.Generator().manual_seed(s.seed)
        length = s.length or self.seq_len
        # rank 0 samples while the other ranks wait in a collective: bf16 on a GPU keeps that wait
        # far inside the process-group timeout for large models
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.is_mdlm:
                result = mdlm_ancestral(model, s.num_samples, length, s.steps, generator=gen, top_p=s.top_p,
                                        temperature=s.temperature)
            else:
                result = ar_sample(model, s.num_samples, length, int(self.manifest["tokenizer"]["bos_id"]),
                                   generator=gen, top_p=s.top_p, temperature=s.temperature,
                                   banned_ids=(int(self.manifest["mask_token_id"]),))
        tok = Tokenizer.from_file(str(Path(self.cfg.data.path) / "tokenizer" / "tokenizer.json"))
        return [tok.decode(row.tolist(), skip_special_tokens=False) for row in result.tokens], result.tokens

    def sample_stats(self, tokens: torch.Tensor, texts: list[str]) -> dict:
        """Unigram entropy of the samples and, with sample.judge, their generative perplexity. A
        judge that fails here (out of memory, unloadable) is reported, not fatal: the run's
        summary and samples matter more than one metric."""
        from .genppl import gen_ppl, load_judge, unigram_entropy

        stats = unigram_entropy(tokens)
        if self.cfg.sample.judge:
            try:
                stats.update(gen_ppl(load_judge(self.cfg.sample.judge, device=self.device), tokens, texts,
                                     batch_size=8))
            except Exception as err:
                log.warning("sample.judge=%s could not score the samples: %s", self.cfg.sample.judge, err)
                stats["judge_error"] = f"{type(err).__name__}: {err}"
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return stats

    def _log(self, metrics_: dict) -> None:
        """Rank 0: MLflow, plus <run_dir>/metrics.jsonl (full precision, survives tracking outages)."""
        if self.rank != 0:
            return
        if self.tracker:
            self.tracker.log_metrics(metrics_, self.step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": self.step, **metrics_}) + "\n")

    def run(self) -> dict:
        """Train to train.max_steps (or a stop signal), then evaluate and sample; returns the summary."""
        backend = self.cfg.train.attention_backend
        if backend != "default" and self.device.type != "cuda" and self.rank == 0:
            log.warning("train.attention_backend=%s selects among GPU attention kernels; on %s it changes nothing",
                        backend, self.device.type)
        with attention_backend(backend):  # before the first forward, which traces compiled blocks
            return self._run()

    def _run(self) -> dict:
        t = self.cfg.train
        self.engine.train()
        window_start, window_tokens, paused = time.perf_counter(), 0, 0.0
        start_step, run_start = self.step, time.perf_counter()
        summary: dict = {}
        if self.step >= t.max_steps and self.rank == 0:
            log.warning("resumed at step %d, train.max_steps=%d: no step to train; evaluating and sampling "
                        "only (a larger train.max_steps trains on)", self.step, t.max_steps)
        while self.step < t.max_steps:
            stats = self.train_step()
            window_tokens += t.global_batch_size * self.seq_len
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                # training throughput: evaluations and checkpoint saves inside the window are left out
                elapsed = max(time.perf_counter() - window_start - paused, 1e-9)
                tps = window_tokens / elapsed
                stats["perf/tokens_per_s"] = tps
                stats["perf/mem_gb"] = metrics.memory_gb(self.device)
                if self.device.type == "cuda":  # the peak of each log window, not since the start
                    torch.cuda.reset_peak_memory_stats(self.device)
                peak = metrics.peak_flops(self.device)
                if peak:
                    stats["perf/mfu"] = tps * self.flops_per_token / (peak * self.world)
                done = self.step - start_step
                eta = (time.perf_counter() - run_start) / max(done, 1) * (t.max_steps - self.step)
                if self.rank == 0:
                    log.info("step %d/%d loss %.4f lr %.2e grad %.3f %.0f tok/s%s mem %.2f GB eta %.0fs",
                             self.step, t.max_steps, stats["train/loss"], stats["train/lr"],
                             stats["train/grad_norm"], tps,
                             f" mfu {stats['perf/mfu']:.1%}" if "perf/mfu" in stats else "",
                             stats["perf/mem_gb"], eta)
                self._log(stats)
                window_start, window_tokens, paused = time.perf_counter(), 0, 0.0
            aside = time.perf_counter()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                self._log_eval(self._evaluate_saving_first_on_failure())
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < t.max_steps:
                self.save()
            paused += time.perf_counter() - aside
            if self._stop_requested():
                if self.rank == 0:
                    log.warning("stop signal received: saving a checkpoint at step %d and exiting", self.step)
                if self._saved_step != self.step:  # not twice in the grace period
                    self.save()
                summary["stopped_by_signal"] = True
                return summary
        if self._saved_step != self.step:  # (a resume of a finished run keeps its last checkpoint)
            self.save()
        summary.update(self.finish())
        return summary

    def _log_eval(self, result: dict) -> None:
        metrics_ = {}
        for name, one in [("", result), *((f"{n}/", r) for n, r in result.get("corpora", {}).items())]:
            if self.rank == 0:
                log.info("eval step %d%s: nelbo %.4f ppl_bound %.2f (se %.4f, %d tokens)", self.step,
                         f" {name[:-1]} ({one['split']})" if name else "", one["nelbo"], one["ppl_bound"],
                         one["nelbo_se"], one["tokens"])
            metrics_.update({f"eval/{name}nelbo": one["nelbo"], f"eval/{name}ppl_bound": one["ppl_bound"],
                             f"eval/{name}nelbo_se": one["nelbo_se"]})
        self._log(metrics_)

    def finish(self) -> dict:
        """Final evaluation (bound and unigram baseline), samples, summary file, MLflow artifacts."""
        from .evaluate import conventions, unigram_perplexity

        result = self.evaluate()
        self._log_eval(result)
        summary = {"step": self.step, "eval": result}
        sample_model = self.eval_model() if self._eval_model_is_collective else None
        error = None  # rank 0's failure here must stop the others too, not leave them in close()
        if self.rank == 0:
            try:
                e = self.cfg.eval
                unigram = unigram_perplexity(self.cfg.data.path, self.cfg.data.eval_split, max_eval_samples=(
                    e.max_batches * (e.batch_size or self.cfg.data.micro_batch_size) * self.world),
                    check_sha256=self.cfg.data.check_sha256)
                texts, tokens = self.sample(sample_model)
                sample_model = None  # freed before a judge is loaded beside the training states
                stats = self.sample_stats(tokens, texts) if texts else {}
                self.run_dir.mkdir(parents=True, exist_ok=True)
                samples_path = self.run_dir / "samples.txt"
                if texts:
                    samples_path.write_text("\n\n=====\n\n".join(texts) + "\n")
                summary.update(unigram=unigram, conventions=conventions(self.manifest, self.cfg.model.objective),
                               samples=str(samples_path) if texts else None, sample_stats=stats,
                               checkpoints=str(self.checkpoints.root),
                               mlflow_run_id=(self.tracker and self.tracker.run_id) or self.mlflow_run_id,
                               tracking_uri=self.tracker.uri if self.tracker else None)
                self._log({"eval/unigram_ppl": unigram["unigram_ppl"],
                           **{f"sample/{k}": stats[k] for k in ("entropy", "gen_ppl") if k in stats}})
                out = self.run_dir / "final_eval.json"
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(summary, indent=2) + "\n")
                os.replace(tmp, out)
                if self.tracker:
                    if texts:
                        self.tracker.log_artifact(samples_path, "samples")
                    self.tracker.log_artifact(out)
                    self.tracker.end()
            except Exception as err:
                error = err
        failed = torch.tensor([1.0 if error else 0.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is not None:
            raise error
        if failed.item():
            raise RuntimeError("rank 0 failed while finishing the run (see its log); stopping this rank too")
        return summary
