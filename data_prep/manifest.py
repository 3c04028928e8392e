"""manifest.json: the description of a prepared dataset, and a small reader for the trainer.

Fields (format_version 1):
  format_version, tokenizer {name, vocab_size, bos_id, eos_id, pad_id, mask_id, files {name: sha256}},
  model_vocab_size, mask_token_id, seq_len, packing, dtype, samples_per_shard, groups, group_bytes,
  splits {train|val: {shards [{name, samples, tokens, sha256}], documents, samples, tokens}},
  dropped_tail_tokens, truncated_tokens, skipped {reason: count}, job {resolved config}.
Shards are named <split>/shard-<group>-<n>.tar (each work group writes its own) and listed in
group order; readers take the names from the manifest.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")


class ManifestError(ValueError):
    """manifest.json is missing, unreadable or of an unsupported format."""


def lock_folder(folder: Path, who: str):
    """(the held lock file, None), or (None, who holds it): an exclusive lock on folder/.lock for
    as long as this process keeps the file open; it ends with the process, also on kill -9. A
    filesystem without locks is warned about, not refused. `who`: the holder, for the warning."""
    folder.mkdir(parents=True, exist_ok=True)
    fh = open(folder / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        owner = fh.read().strip() or "owner unknown"
        fh.close()
        return None, owner
    except OSError as err:
        logging.getLogger(__name__).warning("%s cannot be locked (%s): a second job started into it while %s runs "
                                            "would not be refused", folder, err, who)
        return fh, None
    fh.seek(0)
    fh.truncate()
    fh.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    return fh, None


def partial_path(path: Path) -> Path:
    """Where `path` is written before its atomic rename: unique per call, so two nodes (equal pids
    on a shared filesystem) or a retried task beside a not-quite-dead one never share it."""
    return path.with_name(f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_text(path, dumps(manifest))
    return path


def load_manifest(out_dir: str | Path) -> dict:
    """Read DIR/manifest.json (or a manifest path) and check its format version."""
    p = Path(out_dir)
    path = p if p.is_file() else p / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} does not exist: is '{out_dir}' the output folder of a finished "
                            "data_prep job?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ManifestError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise ManifestError(f"{path} has no format_version: not a data_prep manifest")
    version = data["format_version"]
    if version != FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version {version!r}; this code reads version "
                            f"{FORMAT_VERSION}: re-run data_prep or use a matching version of the code")
    for key in ("tokenizer", "seq_len", "packing", "dtype", "splits", "model_vocab_size", "mask_token_id"):
        if key not in data:
            raise ManifestError(f"{path} lacks the field '{key}'")
    return data


def shard_paths(out_dir: str | Path, manifest: dict, split: str) -> list[Path]:
    """Absolute paths of the shards of a split, in order."""
    return [Path(out_dir) / s["name"] for s in manifest["splits"].get(split, {}).get("shards", [])]
