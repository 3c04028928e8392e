"""The data preparation job: plan groups -> (train) tokenizer -> one Ray task per group -> manifest.

Scale-out: the input is cut into work groups by a plan that depends only on the input files and
the config (sources.plan_units). Each group is processed entirely inside one Ray task (1 CPU; the
worker process keeps the tokenizer between tasks): read, clean, split, tokenize, pack, and write
that group's shards `<split>/shard-<group>-<n>.tar`. The driver only
plans, collects one small record per group and writes the manifest (shards in group order), so no
token passes through it. Shards, keys and the manifest depend only on the inputs and the job
config: 1 or many workers give byte-identical output. In wrap mode each group drops its own tail
(< seq_len - 2 tokens per split), counted in `dropped_tail_tokens`.

Why Ray tasks and not Ray Data's map over a dataset of group descriptors: measured on the 2-core
box, Ray Data's task pool started one task first and left ~0.1-0.2 s between a task's end and the
next start (10 x 1 s tasks on 2 slots: 6.7 s; plain tasks with a small queue: 5.0 s), which
with ~0.5 s groups cost a third of the throughput. Progress is shown by a tqdm bar on a TTY and by
periodic log lines otherwise (as under `ray job submit`).

Dedup (optional) is global and deterministic: a first pass of tasks returns the content hashes
of every group's documents, the driver keeps the first occurrence in input order and tells each
group which of its documents to skip.

Resuming: a finished group leaves `_work/groups/<group>.json`; a rerun with the same job skips
such groups whose shards are intact, redoes the others (keeping complete shards whose bytes are
already right). The output folder remembers its job in _work/job.json while running and in
manifest.json when done; a different job is refused unless --overwrite is given.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.configtools import ConfigError  # noqa: F401  (re-exported for callers)

from . import manifest as mf
from .config import DataPrepConfig
from .shards import SHARD_PATTERN
from .sources import BadRecords, discover, iter_unit_documents, plan_units
from .tokenizer import TokenizerInfo, is_train_spec, load_tokenizer
from .worker import content_hash, is_val

SHARD_TARGET_BYTES = 256 << 20
MIN_SHARDS = 16
GROUP_MIN_BYTES = 1 << 20
GROUP_MAX_BYTES = 256 << 20
AUTO_GROUPS = 32
NOT_BAD = ("duplicate",)  # skipped on purpose, not bad input


class JobFailed(RuntimeError):
    """The job stopped on purpose (too much bad input, conflicting output folder)."""


def log(msg: str) -> None:
    print(f"[data_prep] {msg}", file=sys.stderr, flush=True)


def worker_cfg(cfg: DataPrepConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("text_field", "max_doc_chars", "val_fraction",
                                          "split_salt", "max_error_examples")}


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000.0
    return f"{n:.1f}T"


def prepare_out_dir(cfg: DataPrepConfig, out: Path) -> None:
    job = cfg.job_dict()
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    man_path = out / mf.MANIFEST_NAME
    job_path = out / "_work" / "job.json"
    if man_path.is_file():
        try:
            previous = json.loads(man_path.read_text()).get("job")
        except ValueError:
            previous = "unreadable"
    elif job_path.is_file():
        try:
            previous = json.loads(job_path.read_text())
        except ValueError:
            previous = "unreadable"
    elif any((out / s).is_dir() and any((out / s).iterdir()) for s in mf.SPLITS) and not cfg.overwrite:
        raise JobFailed(f"output folder '{out}' already holds train/ or val/ data of unknown origin; "
                        "choose another --out or pass --overwrite")
    produced = any((out / s).is_dir() and any((out / s).iterdir()) for s in mf.SPLITS) or \
        any((out / "_work" / "groups").glob("*.json"))
    if previous is not None and previous != job and not man_path.is_file() and not produced:
        # a start that failed before any group was written (a wrong --tokenizer or --text-field):
        # nothing of it is worth keeping, so the corrected command is not refused
        log(f"output folder '{out}' holds only the start of another job, which wrote no data: replacing it")
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        shutil.rmtree(out / "_work", ignore_errors=True)
        previous = None
    if previous is not None and previous != job:
        if not cfg.overwrite:
            old = previous if isinstance(previous, dict) else {}
            diff = sorted(k for k in set(job) | set(old) if not isinstance(previous, dict) or old.get(k) != job.get(k))
            said = ", ".join(f"{k}: {old[k]} -> {job.get(k)}" if k in old else k for k in diff)
            raise JobFailed(f"output folder '{out}' holds a different job (differs in: {said}); "
                            "choose another --out or pass --overwrite to replace it")
    if cfg.overwrite and previous != job:
        for name in ("train", "val", "tokenizer", "_work"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (mf.MANIFEST_NAME, "errors.jsonl"):
            (out / name).unlink(missing_ok=True)
    mf.atomic_write_text(job_path, json.dumps(job, indent=2, sort_keys=True))
    # the folder is finished again only when this run writes its manifest: until then an old
    # manifest would vouch for a tokenizer and shards that this run is replacing
    man_path.unlink(missing_ok=True)


def _training_texts(cfg: DataPrepConfig, units: list[dict], bad: BadRecords, counter: dict):
    """Cleaned train-split documents in input order, up to train_tokenizer_max_chars (the driver
    stops reading there: at web scale it never reads the whole input)."""
    wcfg = worker_cfg(cfg)
    seen: set[bytes] = set()
    total = 0
    for unit in units:
        for _doc_id, text in iter_unit_documents(unit, wcfg, bad):
            counter["docs"] += 1
            h = content_hash(text)
            if cfg.dedup:
                if h in seen:
                    continue
                seen.add(h)
            if is_val(h, cfg.split_salt, cfg.val_fraction):
                continue
            total += len(text)
            yield text
            if total >= cfg.train_tokenizer_max_chars:
                return


def write_errors(out: Path, bad: BadRecords) -> None:
    """DIR/errors.jsonl: a few examples per reason ({reason, where: file:line, detail})."""
    examples = sorted(bad.examples, key=lambda e: e["reason"])  # stable: input order within a reason
    mf.atomic_write_text(out / "errors.jsonl",
                         "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples))


def check_bad_fraction(cfg: DataPrepConfig, counts: dict[str, int], good_docs: int, stage: str) -> None:
    bad = sum(n for r, n in counts.items() if r not in NOT_BAD)
    seen = bad + good_docs
    if seen and bad / seen > cfg.max_bad_fraction:
        worst = ", ".join(f"{r}={n}" for r, n in sorted(counts.items(), key=lambda t: -t[1]) if r not in NOT_BAD)
        hint = ""
        if counts.get("missing_field", 0) > bad / 2:
            hint = f" Most records lack the field '{cfg.text_field}': is --text-field right?"
        raise JobFailed(f"{bad} of {seen} input records are bad ({bad / seen:.1%} > max_bad_fraction="
                        f"{cfg.max_bad_fraction}) [{stage}]: {worst}.{hint} See errors.jsonl for examples; "
                        "no manifest was written.")


LOST_INPUT = ("read_error", "truncated_input")  # a whole file, or the rest of one, could not be read


def check_lost_inputs(cfg: DataPrepConfig, bad: BadRecords, stage: str) -> None:
    """A file that could not be read to its end loses all of its remaining documents but counts
    once among the records, so max_bad_fraction cannot see it: such losses have their own limit."""
    lost = sum(bad.counts.get(r, 0) for r in LOST_INPUT)
    if lost <= cfg.max_lost_inputs:
        return
    named = [f"{e['where']} ({e['reason']}: {e['detail']})" for e in bad.examples if e["reason"] in LOST_INPUT][:5]
    more = f" and {lost - len(named)} more" if lost > len(named) else ""
    raise JobFailed(f"{lost} input file(s) or part(s) could not be read to their end [{stage}]: "
                    f"{'; '.join(named)}{more}. Their remaining documents would be missing from the "
                    f"dataset: repair or remove them (a rerun redoes only the groups whose inputs changed), "
                    f"or pass --max-lost-inputs {lost} to go on without them. No manifest was written.")


def check_shards_present(out: Path, records: dict) -> None:
    """Each group's shards are written by whichever node ran it: before the manifest lists them,
    the driver checks it sees every one at its size (an --out that is not shared storage)."""
    missing = []
    for rec in records.values():
        for name, size in rec.get("bytes", {}).items():
            try:
                if os.path.getsize(out / name) == size:
                    continue
            except OSError:
                pass
            missing.append(name)
    if missing:
        raise JobFailed(f"{len(missing)} shard(s) written by the Ray workers are missing or incomplete in "
                        f"{out} as this driver sees it (e.g. {', '.join(sorted(missing)[:3])}): --out must be "
                        f"storage that every node of the Ray cluster mounts at the same path. No manifest "
                        f"was written.")


def check_cluster_paths(cfg: DataPrepConfig) -> None:
    """Under `ray job submit --working-dir`, the driver runs in a temporary copy of the working
    directory on the head node: a relative --out would be written there (and lost), and a
    relative --input resolves to paths that the other nodes do not have."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job:
        return
    try:
        working_dir = (json.loads(job).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return
    if not working_dir:
        return
    relative = [f"--out {cfg.out}"] if not Path(cfg.out).expanduser().is_absolute() else []
    relative += [f"--input {p}" for p in cfg.input if not Path(p).expanduser().is_absolute()]
    if relative:
        raise ConfigError(f"{', '.join(relative)}: a relative path under `ray job submit --working-dir` "
                          f"points into the job's temporary copy of the working directory on one node; "
                          f"give absolute paths on storage every node mounts (e.g. /shared/...)")


def inputs_signature(files) -> str:
    """Identity of the input files as they are now (ids, sizes, modification times)."""
    h = hashlib.sha256()
    for f in files:
        h.update(_file_stat(f.path, f.file_id).encode("utf-8"))
    return h.hexdigest()


def _file_stat(path: str, file_id: str) -> str:
    st = os.stat(path)
    return f"{file_id}\0{st.st_size}\0{st.st_mtime_ns}\n"


def auto_group_bytes(total_bytes: int) -> int:
    """About AUTO_GROUPS groups, each 1 MiB .. 256 MiB of input: depends on the input size only."""
    return int(min(GROUP_MAX_BYTES, max(GROUP_MIN_BYTES, total_bytes // AUTO_GROUPS)))


def get_tokenizer(cfg: DataPrepConfig, out: Path, units: list[dict], signature: str) -> TokenizerInfo:
    tok_path = out / "tokenizer" / "tokenizer.json"
    sig_path = out / "_work" / "tokenizer-inputs.sha256"
    if is_train_spec(cfg.tokenizer):
        if tok_path.is_file() and sig_path.is_file() and sig_path.read_text().strip() == signature:
            # resumed job on unchanged inputs: reuse the tokenizer trained by the interrupted run
            # (training is deterministic, this only saves the time)
            from tokenizers import Tokenizer

            from .tokenizer import describe

            info = describe(Tokenizer.from_file(str(tok_path)), f"bpe-bytelevel-{cfg.train_vocab_size()}",
                            cfg, cfg.tokenizer)
            info.json = tok_path.read_text(encoding="utf-8")
            log(f"reusing tokenizer {tok_path}")
            return info
        t0 = time.time()
        bad = BadRecords(cfg.max_error_examples)
        counter = {"docs": 0}
        info = load_tokenizer(cfg.tokenizer, cfg, _training_texts(cfg, units, bad, counter))
        log(f"trained byte-level BPE, vocab {info.vocab_size}, in {time.time() - t0:.1f}s")
        write_errors(out, bad)
        check_lost_inputs(cfg, bad, "while reading for tokenizer training")
        check_bad_fraction(cfg, bad.counts, counter["docs"], "while reading for tokenizer training")
        mf.atomic_write_text(tok_path, info.json)
        mf.atomic_write_text(sig_path, signature + "\n")
        return info
    info = load_tokenizer(cfg.tokenizer, cfg)
    mf.atomic_write_text(tok_path, info.json)
    return info


def _connect_ray(cfg: DataPrepConfig):
    import ray

    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            log(f"connecting to the Ray cluster at {os.environ['RAY_ADDRESS']}")
            ray.init(log_to_driver=True)
        else:
            n = cfg.num_workers or None  # None: Ray counts the CPUs, within a container's cgroup limits
            pkg_root = str(Path(__file__).resolve().parents[1])
            pypath = os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)
            ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": {"PYTHONPATH": pypath}})
        started = True
    cpus = int(ray.cluster_resources().get("CPU", 1))
    workers = max(1, min(cfg.num_workers or cpus, cpus))
    return ray, started, workers


def auto_samples_per_shard(input_bytes: int, seq_len: int, dtype: str, group_bytes: int | None = None) -> int:
    """About 256 MiB of tokens per shard, but at least ~MIN_SHARDS train shards for small inputs
    (estimated from the input size, ~4 bytes of text per token), so that every loader worker and
    rank gets shards, and not much more than a group holds (groups write their own shards). A
    multiple of 64; depends only on the inputs and the config."""
    by_size = SHARD_TARGET_BYTES // (seq_len * np.dtype(dtype).itemsize)
    est_samples = input_bytes / 4 / seq_len
    by_count = int(est_samples / MIN_SHARDS)
    if group_bytes:
        by_count = min(by_count, int(group_bytes / 4 / seq_len))
    return max(64, min(by_size, by_count) // 64 * 64)


def plan_groups(cfg: DataPrepConfig, files) -> tuple[list[dict], int]:
    total = sum(f.size for f in files)
    group_bytes = cfg.group_bytes or auto_group_bytes(total)
    return plan_units(files, group_bytes), group_bytes




def run_job(cfg: DataPrepConfig) -> dict:
    """Run a data preparation job; returns the manifest. Raises ConfigError / JobFailed."""
    t_start = time.time()
    check_cluster_paths(cfg)
    out = Path(cfg.out).expanduser().resolve()
    files = discover(cfg.input, exclude=out)
    groups, group_bytes = plan_groups(cfg, files)
    total_bytes = sum(f.size for f in files)
    log(f"{len(files)} input files ({total_bytes / 1e6:.1f} MB) in {len(groups)} groups of ~"
        f"{group_bytes / 1e6:.1f} MB -> {out}")
    lock, owner = mf.lock_folder(out, "a data_prep job")
    if lock is None:
        raise JobFailed(f"output folder '{out}' is in use by another data_prep job ({owner}): wait for it to end "
                        f"or choose another --out")
    try:
        return _run_locked(cfg, out, files, groups, group_bytes, total_bytes, t_start)
    finally:
        lock.close()


def _run_locked(cfg: DataPrepConfig, out: Path, files, groups, group_bytes: int, total_bytes: int,
                t_start: float) -> dict:
    prepare_out_dir(cfg, out)
    info = get_tokenizer(cfg, out, groups, inputs_signature(files))
    spp = cfg.samples_per_shard or auto_samples_per_shard(total_bytes, cfg.seq_len, info.dtype, group_bytes)

    ray, started, workers = _connect_ray(cfg)
    t_work = time.time()
    try:
        if cfg.dedup:
            _mark_duplicates(ray, cfg, groups)
        ctx = dict(worker_cfg(cfg), out=str(out), seq_len=cfg.seq_len, packing=cfg.packing,
                   samples_per_shard=spp, dtype=info.dtype, bos_id=info.bos_id, eos_id=info.eos_id,
                   pad_id=info.pad_id)
        job_key = json.dumps({"job": cfg.job_dict(), "tokenizer": info.sha256(), "spp": spp}, sort_keys=True)
        for g in groups:
            stats = "".join(_file_stat(path, fid) for path, fid in g["files"])
            g["fingerprint"] = hashlib.sha256(
                (job_key + json.dumps(g, sort_keys=True) + stats).encode("utf-8")).hexdigest()
        records = _process_groups(ray, cfg, groups, ctx, info)
    finally:
        if started:
            ray.shutdown()
    t_ray = time.time() - t_work

    bad = BadRecords(cfg.max_error_examples)
    splits = {s: {"shards": [], "documents": 0, "samples": 0, "tokens": 0} for s in mf.SPLITS}
    dropped = truncated = tokens_in = reused = kept = 0
    for g in groups:  # input order
        rec = records[g["index"]]
        bad.merge(rec["bad"])
        for s in mf.SPLITS:
            r, sp = rec["splits"][s], splits[s]
            sp["shards"].extend(r["shards"])
            for k in ("documents", "samples", "tokens"):
                sp[k] += r[k]
        dropped += rec["dropped_tail_tokens"]
        truncated += rec["truncated_tokens"]
        tokens_in += rec["tokens_in"]
        reused += bool(rec.get("reused"))
        kept += rec.get("kept_shards", 0)
    good = sum(splits[s]["documents"] for s in mf.SPLITS)
    write_errors(out, bad)
    if good == 0:
        raise JobFailed(f"no document of the input could be used ({sum(bad.counts.values())} skipped: "
                        f"{', '.join(f'{r}={n}' for r, n in sorted(bad.counts.items())) or 'the input is empty'}); "
                        f"see {out / 'errors.jsonl'}")
    if sum(splits[s]["samples"] for s in mf.SPLITS) == 0:
        raise JobFailed(f"{good} document(s) gave {tokens_in} tokens, fewer than one sequence of seq_len "
                        f"{cfg.seq_len} per group: lower --seq-len or add text")
    check_lost_inputs(cfg, bad, "after processing")
    check_bad_fraction(cfg, bad.counts, good + bad.counts.get("duplicate", 0), "after processing")
    check_shards_present(out, records)

    listed = {sh["name"] for s in mf.SPLITS for sh in splits[s]["shards"]}
    for s in mf.SPLITS:
        (out / s).mkdir(parents=True, exist_ok=True)
        _remove_stale_shards(out / s, listed)
    manifest = {
        "format_version": mf.FORMAT_VERSION,
        "tokenizer": {"name": info.name, "vocab_size": info.vocab_size, "bos_id": info.bos_id,
                      "eos_id": info.eos_id, "pad_id": info.pad_id, "mask_id": info.mask_id,
                      "files": {"tokenizer.json": info.sha256()}},
        "model_vocab_size": info.model_vocab_size,
        "mask_token_id": info.mask_token_id,
        "seq_len": cfg.seq_len,
        "packing": cfg.packing,
        "dtype": info.dtype,
        "samples_per_shard": spp,
        "groups": len(groups),
        "group_bytes": group_bytes,
        "splits": splits,
        "dropped_tail_tokens": dropped,
        "truncated_tokens": truncated,
        "skipped": {r: bad.counts[r] for r in sorted(bad.counts)},
        "job": cfg.job_dict(),
    }
    mf.write_manifest(out, manifest)
    shutil.rmtree(out / "_work", ignore_errors=True)

    elapsed = time.time() - t_start
    tokens = sum(splits[s]["tokens"] for s in mf.SPLITS)
    lines = [f"done in {elapsed:.1f}s with {workers} worker(s), {len(groups)} groups: {out}"]
    for s in mf.SPLITS:
        sp = splits[s]
        lines.append(f"  {s:5s}: {sp['documents']} documents, {sp['samples']} samples, {sp['tokens']} tokens, "
                     f"{len(sp['shards'])} shards")
    lines.append(f"  tokens/s: {_human(tokens / max(elapsed, 1e-9))} overall, "
                 f"{_human(tokens_in / max(t_ray, 1e-9))} in the Ray stage ({t_ray:.1f}s)")
    share = dropped / max(tokens_in + good, 1)
    lines.append(f"  dropped tail tokens: {dropped} ({share:.3%} of the tokenized stream, one tail per group "
                 "and split)" + (f", truncated tokens: {truncated}" if cfg.packing == "pad" else ""))
    if share > 0.02:
        lines.append(f"  note: {share:.1%} of the tokens were dropped as group tails; fewer, larger groups "
                     f"(group_bytes={group_bytes} now) drop fewer")
    skipped = ", ".join(f"{r}={n}" for r, n in manifest["skipped"].items()) or "none"
    lines.append(f"  skipped: {skipped}" + (" (examples in errors.jsonl)" if bad.examples else ""))
    if reused or kept:
        lines.append(f"  resumed: {reused} group(s) already done were skipped, {kept} complete shard(s) kept")
    for line in lines:
        log(line)
    return manifest


def _task_window(ray, workers: int | None) -> int:
    """Tasks in flight: `workers` (--num-workers) where the cluster has more CPUs, else the
    cluster's CPUs, read anew, plus as many queued so that a free CPU never waits for the driver."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return workers if workers is not None and workers < cpus else 2 * cpus


def _run_tasks(ray, fn, groups: list[dict], args: tuple, workers: int | None, desc: str,
               on_result=None, interval: float = 2.0) -> dict[int, object]:
    """Run fn(group, *args) as one Ray task (1 CPU) per group, at most `workers` at a time (None:
    as many as the cluster has CPUs, nodes joining while it runs included), in plan order; returns
    {group index: result}.
    A progress bar (a TTY) or progress lines (logs) show groups done, tokens and the rate."""
    remote = ray.remote(num_cpus=1)(fn)
    window, checked = _task_window(ray, workers), time.time()
    results: dict[int, object] = {}
    inflight: dict = {}
    todo = list(groups)
    tokens = 0
    bar = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(groups), desc=desc, unit="group", file=sys.stderr)
        except ImportError:
            bar = None
    t0 = last = time.time()
    while todo or inflight:
        if time.time() - checked > 5.0:  # nodes that join a running cluster take work too
            window, checked = _task_window(ray, workers), time.time()
        while todo and len(inflight) < window:
            g = todo.pop(0)
            inflight[remote.remote(g, *args)] = g["index"]
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            index = inflight.pop(ref)
            res = ray.get(ref)
            results[index] = res
            if on_result is not None:
                tokens += on_result(res)
            if bar is not None:
                bar.update(1)
                if tokens:
                    bar.set_postfix_str(f"{_human(tokens)} tokens, {_human(tokens / max(time.time() - t0, 1e-9))}/s")
        now = time.time()
        if bar is None and (now - last >= interval or not (todo or inflight)):
            last = now
            extra = f"  tokens {_human(tokens)} ({_human(tokens / max(now - t0, 1e-9))} tokens/s)" if tokens else ""
            log(f"{desc}: {len(results)}/{len(groups)} groups{extra}")
    if bar is not None:
        bar.close()
    return results


def _mark_duplicates(ray, cfg: DataPrepConfig, groups: list[dict]) -> None:
    """Global exact dedup: the first occurrence (in input order) of a text is kept."""
    from .worker import hash_task

    hashes = _run_tasks(ray, hash_task, groups, (worker_cfg(cfg),), cfg.num_workers, "dedup pass",
                        interval=cfg.progress_interval_s)
    arrays = [np.frombuffer(hashes[g["index"]], dtype="S16") for g in groups]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype="S16")
    _, first = np.unique(flat, return_index=True)
    dup = np.ones(len(flat), dtype=bool)
    dup[first] = False
    start = 0
    for g, a in zip(groups, arrays):
        g["duplicates"] = np.flatnonzero(dup[start:start + len(a)]).tolist()
        start += len(a)
    log(f"dedup: {int(dup.sum())} of {len(flat)} documents repeat an earlier one")


def _process_groups(ray, cfg: DataPrepConfig, groups: list[dict], ctx: dict,
                    info: TokenizerInfo) -> dict[int, dict]:
    from .worker import group_task

    tok_box = [ray.put(info.json)]  # fetched once per worker process (see worker.worker_tokenizer)
    return _run_tasks(ray, group_task, groups, (ctx, info.sha256(), tok_box), cfg.num_workers, "processing",
                      on_result=lambda rec: rec["tokens_in"], interval=cfg.progress_interval_s)


def _remove_stale_shards(split_dir: Path, listed: set[str]) -> None:
    """Remove shard files this job does not list (left by an earlier, different job) and temp files."""
    split = split_dir.name
    for p in split_dir.iterdir():
        if SHARD_PATTERN.match(p.name) and f"{split}/{p.name}" not in listed:
            p.unlink()
        elif p.name.startswith(".shard-") and ".partial-" in p.name:
            p.unlink()
