"""DeepSpeed checkpoints with completeness markers, `latest`, retention and fallback on resume.

A checkpoint directory <root>/step00000123/ is complete once every rank finished writing and
rank 0 wrote COMPLETE into it; only then is <root>/latest (re)written, atomically. Resume picks
the newest complete checkpoint and falls back to older ones if loading fails.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 3, rank: int = 0):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank

    def save(self, engine, step: int, client_state: dict) -> Path:
        tag = tag_for(step)
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        _barrier()
        if self.rank == 0:
            _write_atomic(self.root / tag / COMPLETE, f"{step}\n")
            _write_atomic(self.root / "latest", tag)
            self._prune()
        _barrier()
        return self.root / tag

    def _prune(self) -> None:
        tags = complete_tags(self.root)
        for old in tags[:-self.keep_last] if self.keep_last > 0 else []:
            shutil.rmtree(self.root / old, ignore_errors=True)

    def load(self, engine, which: str = "auto") -> dict | None:
        """Load `which` ('auto' = newest complete, or a tag / path); returns the client state."""
        if which == "auto":
            candidates = list(reversed(complete_tags(self.root)))
            if not candidates:
                log.info("no complete checkpoint under %s: starting from scratch", self.root)
                return None
        else:
            path = Path(which)
            root, tag = (path.parent, path.name) if path.is_dir() else (self.root, which)
            if not (root / tag / COMPLETE).is_file():
                raise FileNotFoundError(f"checkpoint '{which}' is missing or incomplete (no {COMPLETE} marker)")
            self.root, candidates = root, [tag]
        for i, tag in enumerate(candidates):
            try:
                load_path, client_state = engine.load_checkpoint(str(self.root), tag=tag)
            except Exception as err:
                load_path, client_state = None, None
                log.warning("checkpoint %s could not be loaded (%s)", self.root / tag, err)
            if load_path is not None:
                if i > 0:
                    log.warning("resumed from %s: newer checkpoints were unreadable", tag)
                return client_state
            if which != "auto":
                raise RuntimeError(f"checkpoint {self.root / tag} could not be loaded")
        raise RuntimeError(f"no loadable checkpoint under {self.root}")
