"""Input discovery, work units and document reading with per-record error accounting.

A *unit* is the input of one Ray task: a run of consecutive .txt files, or one jsonl / parquet
file. Units only decide parallelism: documents come out in input order whatever the units are,
and packing happens over that order, so the output does not depend on how work is split.

Documents are (doc_id, text). doc ids are stable: `<input name>/<relative path>` for files found
in a folder, `<file name>` for a file given directly, plus `:<line>` (jsonl, 1-based) or
`:<row>` (parquet, 0-based).
"""
from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipeline.configtools import ConfigError

TEXT_EXTS = (".txt",)
JSONL_EXTS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".jsonl.zstd")
PARQUET_EXTS = (".parquet",)


def file_kind(path: str) -> str | None:
    name = path.lower()
    if name.endswith(TEXT_EXTS):
        return "txt"
    if name.endswith(JSONL_EXTS):
        return "jsonl"
    if name.endswith(PARQUET_EXTS):
        return "parquet"
    return None


@dataclass
class InputFile:
    path: str      # path to open
    file_id: str   # stable id used in doc ids and error reports
    kind: str
    size: int


def discover(inputs: list[str]) -> list[InputFile]:
    """Expand inputs (files/folders) into a sorted, de-duplicated file list; fail early on problems."""
    files: list[InputFile] = []
    seen_ids: dict[str, str] = {}
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise ConfigError(f"input '{raw}' does not exist")
        found: list[tuple[Path, str]] = []
        if p.is_dir():
            base = p.resolve().name or "input"
            for root, dirs, names in os.walk(p, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    if name.startswith("."):
                        continue
                    fp = Path(root) / name
                    if file_kind(name) is None:
                        continue
                    rel = fp.relative_to(p).as_posix()
                    found.append((fp, f"{base}/{rel}"))
            if not found:
                raise ConfigError(
                    f"input folder '{raw}' holds no supported files (.txt, .jsonl[.gz|.zst], .parquet)")
            found.sort(key=lambda t: t[1])
        else:
            if file_kind(p.name) is None:
                raise ConfigError(
                    f"input '{raw}': unsupported file type (use .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet)")
            found.append((p, p.name))
        for fp, fid in found:
            if fid in seen_ids:
                raise ConfigError(
                    f"inputs '{seen_ids[fid]}' and '{fp}' both get the document id prefix '{fid}'; "
                    "rename one or pass their common parent folder")
            seen_ids[fid] = str(fp)
            files.append(InputFile(str(fp), fid, file_kind(fp.name), fp.stat().st_size))
    return files


def _jsonl_ranges(path: str, task_bytes: int) -> list[tuple[int, int, int]]:
    """Cut a plain (uncompressed) jsonl file into line-aligned byte ranges of ~task_bytes:
    [(start, end, number of the first line)]. Reads the file once to count lines."""
    size = os.path.getsize(path)
    ranges = []
    start, line = 0, 1
    with open(path, "rb") as fh:
        while start < size:
            end = size
            if start + task_bytes < size:
                fh.seek(start + task_bytes)
                fh.readline()  # to the end of the line the cut falls in
                end = fh.tell()
            fh.seek(start)
            count = fh.read(end - start).count(b"\n")
            ranges.append((start, end, line))
            line += count
            start = end
    return ranges


def _parquet_ranges(path: str, task_bytes: int) -> list[tuple[list[int], int]]:
    """Group a parquet file's row groups into ~task_bytes units: [(row group indices, first row)]."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # damaged file: one unit, the reader reports it
        return []
    out, groups, size, row, first = [], [], 0, 0, 0
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        groups.append(i)
        size += rg.total_byte_size
        row += rg.num_rows
        if size >= task_bytes:
            out.append((groups, first))
            groups, size, first = [], 0, row
    if groups:
        out.append((groups, first))
    return out


def plan_units(files: list[InputFile], task_bytes: int) -> list[dict]:
    """Group files into task units: runs of .txt files up to ~task_bytes, line-aligned byte ranges
    of plain .jsonl files, runs of parquet row groups, one unit per compressed jsonl file.
    Units only decide parallelism; the output does not depend on them."""
    units: list[dict] = []
    run: list[InputFile] = []
    run_bytes = 0

    def flush():
        nonlocal run, run_bytes
        if run:
            units.append({"kind": "txt", "files": [(f.path, f.file_id) for f in run], "bytes": run_bytes})
            run, run_bytes = [], 0

    for f in files:
        if f.kind == "txt":
            run.append(f)
            run_bytes += f.size
            if run_bytes >= task_bytes:
                flush()
        else:
            flush()
            unit = {"kind": f.kind, "files": [(f.path, f.file_id)], "bytes": f.size}
            if f.kind == "jsonl" and f.path.lower().endswith(".jsonl") and f.size > 2 * task_bytes:
                for start, end, line in _jsonl_ranges(f.path, task_bytes):
                    units.append(dict(unit, bytes=end - start, range=[start, end, line]))
            elif f.kind == "parquet" and f.size > 2 * task_bytes:
                ranges = _parquet_ranges(f.path, task_bytes)
                for groups, first_row in ranges:
                    units.append(dict(unit, bytes=f.size // max(len(ranges), 1), row_groups=[groups, first_row]))
                if not ranges:
                    units.append(unit)
            else:
                units.append(unit)
    flush()
    for i, u in enumerate(units):
        u["index"] = i
    return units


def clean_text(text: str) -> str:
    """Normalise newlines, drop NUL characters, strip surrounding whitespace."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\x00" in text:
        text = text.replace("\x00", "")
    return text.strip()


@dataclass
class BadRecords:
    """Counts of skipped records by reason, with a few examples each (file:line, detail)."""
    max_examples: int = 20
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def add(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        n = self.counts.get(reason, 0)
        self.counts[reason] = n + count
        if n < self.max_examples:
            self.examples.append({"reason": reason, "where": where, "detail": detail[:300]})

    def merge(self, other: "BadRecords | dict") -> None:
        counts = other.counts if isinstance(other, BadRecords) else other["counts"]
        examples = other.examples if isinstance(other, BadRecords) else other["examples"]
        for ex in examples:
            if sum(1 for e in self.examples if e["reason"] == ex["reason"]) < self.max_examples:
                self.examples.append(ex)
        for reason, n in counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": list(self.examples)}


def _check_doc(text: str, where: str, max_chars: int, bad: BadRecords) -> str | None:
    if len(text) > max_chars:
        bad.add("too_long", where, f"{len(text)} characters > max_doc_chars={max_chars}")
        return None
    text = clean_text(text)
    if not text:
        bad.add("empty", where, "empty after cleaning")
        return None
    return text


def _iter_txt(path: str, file_id: str, max_chars: int, bad: BadRecords) -> Iterator[tuple[str, str]]:
    try:
        size = os.path.getsize(path)
        if size > 4 * max_chars:  # cannot fit under the limit even at 1 byte per character
            bad.add("too_long", file_id, f"{size} bytes > 4 * max_doc_chars={max_chars}")
            return
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        bad.add("read_error", file_id, str(err))
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad.add("invalid_utf8", file_id, f"byte {err.start}: {err.reason}")
        return
    if text.startswith("\ufeff"):
        text = text[1:]
    text = _check_doc(text, file_id, max_chars, bad)
    if text is not None:
        yield file_id, text


def _open_binary(path: str):
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        return _ZstdLines(path)
    return open(path, "rb")


class _ZstdLines:
    """Lines of a (multi-frame) zstd file; raises EOFError when the file ends inside a frame
    (zstandard's stream reader silently returns EOF on truncated input)."""

    def __init__(self, path: str, chunk: int = 1 << 20):
        self.fh = open(path, "rb")
        self.chunk = chunk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def __iter__(self):
        import zstandard

        dctx = zstandard.ZstdDecompressor()
        dobj, fed = dctx.decompressobj(), False
        pending = b""
        while True:
            data = self.fh.read(self.chunk)
            if not data:
                break
            out = []
            while data:
                out.append(dobj.decompress(data))
                fed = True
                if dobj.eof:
                    data = dobj.unused_data
                    dobj, fed = dctx.decompressobj(), False
                else:
                    data = b""
            lines = (pending + b"".join(out)).split(b"\n")
            pending = lines.pop()
            for line in lines:
                yield line + b"\n"
        if fed:  # the cut line is dropped with the rest of the frame
            raise EOFError("zstd stream ends inside a frame (truncated file)")
        if pending:
            yield pending


def _iter_jsonl(path: str, file_id: str, cfg: dict, bad: BadRecords,
                byte_range: list[int] | None = None) -> Iterator[tuple[str, str]]:
    text_field, max_chars = cfg["text_field"], cfg["max_doc_chars"]
    lineno = 0
    try:
        fh = _open_binary(path)
    except OSError as err:
        bad.add("read_error", file_id, str(err))
        return
    lines = fh
    if byte_range is not None:
        start, end, first_line = byte_range
        fh.seek(start)
        lineno = first_line - 1
        lines = io.BytesIO(fh.read(end - start))
    try:
        with fh:
            for raw in lines:
                lineno += 1
                where = f"{file_id}:{lineno}"
                if not raw.strip():
                    continue  # blank lines are not records
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad.add("invalid_utf8", where, f"byte {err.start}: {err.reason}")
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as err:
                    bad.add("invalid_json", where, str(err))
                    continue
                if not isinstance(rec, dict):
                    bad.add("not_an_object", where, f"a JSON {type(rec).__name__}, not an object")
                    continue
                if text_field not in rec or rec[text_field] is None:
                    bad.add("missing_field", where, f"no '{text_field}' field (keys: {', '.join(list(rec)[:8])})")
                    continue
                value = rec[text_field]
                if not isinstance(value, str):
                    bad.add("wrong_type", where, f"'{text_field}' is a {type(value).__name__}, not a string")
                    continue
                text = _check_doc(value, where, max_chars, bad)
                if text is not None:
                    yield where, text
    except Exception as err:  # EOFError / BadGzipFile (gzip), ZstdError, OSError: damaged stream
        bad.add("truncated_input", f"{file_id}:{lineno + 1}", f"{type(err).__name__}: {err}")


def _iter_parquet(path: str, file_id: str, cfg: dict, bad: BadRecords,
                  row_groups: list | None = None) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    text_field, max_chars = cfg["text_field"], cfg["max_doc_chars"]
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for damaged files
        bad.add("read_error", file_id, f"{type(err).__name__}: {err}")
        return
    names = pf.schema_arrow.names
    groups, row = None, 0
    if row_groups is not None:
        groups, row = row_groups
    if text_field not in names:
        n = (sum(pf.metadata.row_group(i).num_rows for i in groups) if groups is not None
             else pf.metadata.num_rows)
        if n:
            bad.add("missing_field", file_id, f"{n} rows: no column '{text_field}' "
                    f"(columns: {', '.join(names[:8])})", count=n)
        return
    try:
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096, row_groups=groups):
            for value in batch.column(0).to_pylist():
                where = f"{file_id}:{row}"
                row += 1
                if value is None:
                    bad.add("missing_field", where, f"'{text_field}' is null")
                    continue
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError as err:
                        bad.add("invalid_utf8", where, f"byte {err.start}: {err.reason}")
                        continue
                if not isinstance(value, str):
                    bad.add("wrong_type", where, f"'{text_field}' is a {type(value).__name__}, not a string")
                    continue
                text = _check_doc(value, where, max_chars, bad)
                if text is not None:
                    yield where, text
    except Exception as err:
        bad.add("truncated_input", f"{file_id}:{row}", f"{type(err).__name__}: {err}")


def iter_unit_documents(unit: dict, cfg: dict, bad: BadRecords) -> Iterator[tuple[str, str]]:
    """Yield (doc_id, cleaned text) for a unit in input order; bad records go to `bad`."""
    for path, file_id in unit["files"]:
        if unit["kind"] == "txt":
            yield from _iter_txt(path, file_id, cfg["max_doc_chars"], bad)
        elif unit["kind"] == "jsonl":
            yield from _iter_jsonl(path, file_id, cfg, bad, unit.get("range"))
        elif unit["kind"] == "parquet":
            yield from _iter_parquet(path, file_id, cfg, bad, unit.get("row_groups"))
        else:  # pragma: no cover - discover() only makes the kinds above
            raise ValueError(f"unknown unit kind {unit['kind']}")
