"""DeepSpeed checkpoints with completeness markers, `latest`, retention and fallback on resume.

A checkpoint directory <root>/step00000123/ is complete once every rank finished writing, each
node fsynced the checkpoint's files, rank 0 saw every rank's files (a run_dir that is not shared
storage stops here, by name) and wrote COMPLETE into it with their names and sizes; only then is
<root>/latest (re)written, atomically. Resume picks the newest complete checkpoint and falls back
to older ones if a file is missing, cut short or unloadable; rank 0 chooses and every rank loads
the same one. Checkpoints newer than the one resumed (an explicit older tag, or newer ones that
failed) are moved to <root>/abandoned/, so a later `--resume auto` and the retention of the last
k follow the resumed line. Each checkpoint also holds its run's config as run_config.json, so a
resume with a different model is refused by name before any weights are read.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def lock_run_dir(run_dir: Path):
    """(the held lock file, None), or (None, who holds it): one training process per run_dir, so
    two launches into one folder cannot interleave saves, pruning and `latest`."""
    from data_prep.manifest import lock_folder

    return lock_folder(run_dir, "a training")
TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE = "COMPLETE"
RUN_CONFIG = "run_config.json"
DATA_MANIFEST = "data_manifest.json"  # the training data's manifest (tokenizer identity, seq_len)
ABANDONED = "abandoned"
VISIBILITY_WAIT_S = 30.0  # how long rank 0 waits for other nodes' files to show on shared storage
# settings a checkpoint cannot be resumed under with others: they change the weights' shapes or
# meaning (model), how they are split (parallel.tensor) or how the optimizer states are laid out
RESUME_FIXED = ("model.objective", "model.vocab_size", "model.mask_token_id", "model.n_layers", "model.d_model",
                "model.n_heads", "model.mlp_ratio", "model.cond_dim", "model.time_conditioning",
                "parallel.tensor", "parallel.head_multiple", "train.zero_stage",
                # ZeRO-1 + bf16: fp32 gradients switch DeepSpeed to another optimizer and state layout
                "train.grad_precision")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def all_ranks_agree(ok: bool, device: torch.device | str = "cpu") -> bool:
    """True when `ok` holds on every rank (one all-reduce on the rank's device)."""
    if not _distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def config_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(fixed, changed): 'key: saved -> current' for the flattened settings that differ, split into
    those a resume cannot change (RESUME_FIXED) and the others."""
    from .configtools import flatten

    old, new = flatten(saved), flatten(current)
    old.setdefault("train.grad_precision", "bf16")  # checkpoints from before the setting reduced in bf16
    old.setdefault("parallel.head_multiple", 1)      # ... and padded the TP head to a multiple of TP
    if "sample.judge" in new:
        old.setdefault("sample.judge", "")           # ... and judged no samples
    if "data.shuffle_window" in new:
        old.setdefault("data.shuffle_window", 1)     # ... and read one shard at a time
    if "train.fuse_grad_update" in new:
        old.setdefault("train.fuse_grad_update", False)  # ... and ran DeepSpeed's own gradient update
    unshuffled = False in (old.get("data.shuffle"), new.get("data.shuffle"))
    for flat in (old, new):
        if unshuffled:  # unshuffled data is read a shard at a time whatever the window
            flat.pop("data.shuffle_window", None)
        if flat.get("train.precision") not in ("bf16", "fp8"):  # they only mean something under bf16/fp8 weights
            flat.pop("train.grad_precision", None)
            flat.pop("train.fuse_grad_update", None)
        if flat.get("parallel.tensor", 1) == 1:  # no TP: the head's weight is never padded
            flat.pop("parallel.head_multiple", None)
    fixed, changed = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            (fixed if key in RESUME_FIXED else changed).append(f"{key}: {a} -> {b}")
    return fixed, changed


def listed_files(tag_dir: Path) -> dict[str, int] | None:
    """name -> size of every file the ranks wrote, as recorded in COMPLETE (None for checkpoints
    written before COMPLETE carried the list)."""
    try:
        return json.loads((Path(tag_dir) / COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def damaged_files(tag_dir: Path) -> list[str]:
    """The checkpoint's files that are missing or have another size than when it was written
    (COMPLETE's list), and its torch files that are empty or truncated (a torch.save file is a zip
    whose directory sits at its end: opening it reads only that directory, not the tensors)."""
    import zipfile

    damaged = []
    for name, size in sorted((listed_files(tag_dir) or {}).items()):
        try:
            if (Path(tag_dir) / name).stat().st_size == size:
                continue
        except OSError:
            pass
        damaged.append(name)
    for path in sorted(Path(tag_dir).glob("*.pt")):
        if path.name in damaged:
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (OSError, zipfile.BadZipFile):
            damaged.append(path.name)
    return damaged


def saved_run_config(tag_dir: Path) -> dict | None:
    path = Path(tag_dir) / RUN_CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_files(tag_dir: Path) -> None:
    """fsync every torch file of tag_dir from this node (a no-op for files it did not write), and
    the folder itself."""
    if not tag_dir.is_dir():
        return
    for path in tag_dir.glob("*.pt"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(tag_dir)


def _write_atomic(path: Path, text: str) -> None:
    """Written, flushed to storage, then renamed into place (and the rename made durable)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sizes(tag_dir: Path) -> dict[str, int]:
    """name -> size of the torch files in tag_dir (what DeepSpeed's ranks write), as this rank
    sees them."""
    out = {}
    with os.scandir(tag_dir) as entries:
        for entry in entries:
            if entry.name.endswith(".pt") and entry.is_file():
                out[entry.name] = entry.stat().st_size
    return out


@contextlib.contextmanager
def _writes_recorded(engine, rank: int):
    """While DeepSpeed saves, a failed write or folder creation (full disk, I/O error; torch.save
    raises RuntimeError) is recorded instead of raised, and later writes are skipped: DeepSpeed
    then runs its collectives (barriers, ZeRO-3's gathers) on every rank as usual, and every
    rank learns of the failure afterwards instead of waiting for the process-group timeout."""
    errors: list[str] = []
    storage = getattr(engine, "checkpoint_engine", None)
    if storage is None:  # not a DeepSpeed engine
        yield errors
        return
    # every file DeepSpeed 0.19 writes in save_checkpoint goes through one of these
    targets = [(storage, "save"), (storage, "makedirs"), (engine, "_copy_recovery_script")]
    targets = [(obj, name) for obj, name in targets if callable(getattr(obj, name, None))]
    shadowed = [(obj, name, vars(obj).get(name)) for obj, name in targets]

    def recorded(name: str, original):
        def call(*args, **kwargs):
            if errors:
                return None
            try:
                return original(*args, **kwargs)
            except (OSError, RuntimeError) as err:
                target = kwargs.get("path", kwargs.get("name", args[-1] if args else ""))
                errors.append(f"rank {rank}: {name}({target}): {err}")
                return None
        return call

    for obj, name in targets:
        object.__setattr__(obj, name, recorded(name, getattr(obj, name)))
    try:
        yield errors
    finally:
        for obj, name, own in shadowed:
            if own is not None:
                object.__setattr__(obj, name, own)
            else:
                object.__delattr__(obj, name)


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3, rank: int = 0, device: torch.device | str = "cpu"):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.device = device
        self.loaded: Path | None = None  # the step directory the last load() took
        self.loaded_from_own_folder = True  # False: another run's checkpoint started this run

    def save(self, engine, step: int, client_state: dict, attach: dict[str, Path] | None = None) -> Path:
        """`attach`: name -> file or folder copied into the checkpoint by rank 0 (the data's
        manifest and tokenizer, so evaluation and sampling need nothing else)."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if self.rank == 0 and (tag_dir / COMPLETE).is_file():
            (tag_dir / COMPLETE).unlink()  # rewritten in place: not complete until done again
        _barrier()
        with _writes_recorded(engine, self.rank) as write_errors:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        write_error = "; ".join(write_errors)
        if write_error:
            log.error("checkpoint %s: %s", tag_dir, write_error)
        _barrier()
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            _fsync_files(tag_dir)  # this node's writes reach storage before COMPLETE vouches for them
        files, write_errors = self._files_everyone_wrote(tag_dir, write_error)
        error = write_error
        if self.rank == 0:
            try:
                if write_errors:
                    raise RuntimeError("; ".join(write_errors))
                if files is None:
                    raise RuntimeError(
                        f"checkpoint {tag_dir}: files written by other ranks are not visible to rank 0 after "
                        f"{VISIBILITY_WAIT_S:.0f} s: run_dir must be storage that every node mounts (shared "
                        f"filesystem), not a node-local disk")
                if client_state.get("run_config") is not None:
                    _write_atomic(tag_dir / RUN_CONFIG, json.dumps(client_state["run_config"], indent=1))
                for name, src in (attach or {}).items():
                    dst = tag_dir / name
                    if Path(src).is_dir():
                        shutil.copytree(src, dst, dirs_exist_ok=True)
                    elif Path(src).is_file():
                        shutil.copyfile(src, dst)
                _write_atomic(tag_dir / COMPLETE, json.dumps({"step": step, "files": files}, indent=1) + "\n")
                _write_atomic(self.root / "latest", tag)
            except (OSError, RuntimeError) as err:  # e.g. a full disk: the previous checkpoint stays
                error = str(err)
                (tag_dir / COMPLETE).unlink(missing_ok=True)
                shutil.rmtree(tag_dir, ignore_errors=True)
            if not error:
                try:  # the new checkpoint is complete: failing to remove old ones must not cost it
                    self._prune()
                except OSError as err:
                    log.warning("checkpoint %s saved, but older ones could not be removed (keep_last=%d): %s",
                                tag, self.keep_last, err)
        # every rank learns the outcome (rank 0's failure must not leave the others in a barrier)
        if not all_ranks_agree(not error, self.device):
            newest = complete_tags(self.root)
            cause = error or "failed on another rank: rank 0's log names it"
            raise RuntimeError(f"checkpoint {tag} was not written ({cause}); "
                               f"newest complete: {newest[-1] if newest else 'none'}")
        return tag_dir

    def _files_everyone_wrote(self, tag_dir: Path, write_error: str) -> tuple[dict[str, int] | None, list[str]]:
        """On rank 0: (name -> size of the files of tag_dir that any rank sees, once rank 0 sees
        them all at those sizes (shared storage may show other nodes' writes late), or None when
        it still does not after VISIBILITY_WAIT_S; the ranks' write errors). Collective."""
        mine = (_sizes(tag_dir) if tag_dir.is_dir() else {}, write_error)
        views = [mine]
        if _distributed():
            views = [None] * dist.get_world_size()
            dist.all_gather_object(views, mine)
        if self.rank != 0:
            return None, []
        errors = [error for _, error in views if error]
        if errors:
            return None, errors
        wanted = {}
        for view, _ in views:
            wanted.update(view)
        deadline = time.monotonic() + VISIBILITY_WAIT_S
        while True:
            seen = _sizes(tag_dir) if tag_dir.is_dir() else {}
            if all(seen.get(name) == size for name, size in wanted.items()):
                return wanted, []
            if time.monotonic() > deadline:
                missing = sorted(n for n, size in wanted.items() if seen.get(n) != size)
                log.error("checkpoint %s: not visible to rank 0: %s", tag_dir, ", ".join(missing[:5]))
                return None, []
            time.sleep(1.0)

    def is_complete(self, step: int) -> bool:
        return (self.root / tag_for(step) / COMPLETE).is_file()

    def _prune(self) -> None:
        tags = complete_tags(self.root)
        for old in tags[:-self.keep_last] if self.keep_last > 0 else []:
            (self.root / old / COMPLETE).unlink(missing_ok=True)  # an interrupted prune leaves no "complete" remains
            shutil.rmtree(self.root / old, ignore_errors=True)

    def _abandon_newer(self, tag: str) -> None:
        """Rank 0: move the complete checkpoints newer than `tag`, the one resumed, out of the
        step namespace, so `--resume auto` and keep_last follow the resumed line from now on."""
        newer = [t for t in complete_tags(self.root) if t > tag]
        if not newer:
            return
        target = self.root / ABANDONED
        target.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for t in newer:
            os.replace(self.root / t, target / f"{t}-{stamp}")
        log.warning("resumed from %s: the newer checkpoints %s were moved to %s", tag, ", ".join(newer), target)

    def _newest_first(self) -> list[str]:
        """Rank 0's view of the complete checkpoints, newest first, on every rank (a node whose
        shared-filesystem cache lags must not pick another step)."""
        tags = [list(reversed(complete_tags(self.root))) if self.rank == 0 else None]
        if _distributed():
            dist.broadcast_object_list(tags, src=0)
        return tags[0]

    def load(self, engine, which: str = "auto", check: Callable[[Path], bool] | None = None) -> dict | None:
        """Load `which` ('auto' = newest complete, or a tag / path); returns the client state.
        `check(tag_dir)` runs first and may refuse the checkpoint (it raises); it returns whether
        the weights must match the model key for key (False lets FP8 scaling state differ)."""
        # where to load from; saves, pruning and `latest` stay under self.root (this run's folder)
        src = self.root
        self.loaded, self.loaded_from_own_folder = None, True
        if which == "auto":
            candidates = self._newest_first()
            if not candidates:
                log.info("no complete checkpoint under %s: starting from scratch", self.root)
                return None
        else:
            path = Path(which)
            root, tag = (path.parent, path.name) if path.is_dir() else (self.root, which)
            if not (root / tag / COMPLETE).is_file():
                from .configtools import ConfigError

                tags = complete_tags(root)
                raise ConfigError(f"--resume {which}: no complete checkpoint of that name in {root} (complete: "
                                  f"{', '.join(tags[-5:]) or 'none'}); pass one of them, a step directory, or auto")
            src, candidates = root, [tag]
        for i, tag in enumerate(candidates):
            # files are checked before any rank starts DeepSpeed's load: under ZeRO-3 that load
            # ends in collectives, which a rank that failed half-way would never join
            damaged = damaged_files(src / tag)
            if not all_ranks_agree(not damaged, self.device):
                log.warning("checkpoint %s could not be loaded (%s)", src / tag,
                            f"missing or damaged: {', '.join(damaged)}" if damaged
                            else "a file is missing or damaged on another rank")
                if which != "auto":
                    raise RuntimeError(f"checkpoint {src / tag} could not be loaded")
                continue
            strict = check(src / tag) if check is not None else True
            try:
                load_path, client_state = engine.load_checkpoint(str(src), tag=tag, load_module_strict=strict)
            except Exception as err:
                load_path, client_state = None, None
                log.warning("checkpoint %s could not be loaded on rank %d (%s)", src / tag, self.rank, err)
            # every rank resumes from the same step: one rank's unreadable file sends all to the next
            if all_ranks_agree(load_path is not None, self.device):
                if i > 0 and self.rank == 0:
                    log.warning("resumed from %s: newer checkpoints were unreadable", tag)
                self.loaded, self.loaded_from_own_folder = src / tag, src.resolve() == self.root.resolve()
                if self.rank == 0 and self.loaded_from_own_folder:
                    self._abandon_newer(tag)
                _barrier()
                return client_state
            if which != "auto":
                raise RuntimeError(f"checkpoint {src / tag} could not be loaded")
        raise RuntimeError(f"no loadable checkpoint under {src}")
