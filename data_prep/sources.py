"""Input discovery, the plan of work groups and document reading with per-record error accounting.

A *group* is the unit of work of one worker: a run of consecutive whole files (of any kind), or
a piece of a file too large for one group: a line-aligned byte range of a plain .jsonl file, a
run of parquet row groups or Arrow record batches. The plan depends only on the input files and
`group_bytes`, never on the number of workers or on how Ray schedules them; each group is packed
and written on its own, so the output is a function of the inputs and the job config.

Inputs: .txt (one document per file), .jsonl / .jsonl.gz / .jsonl.zst, .parquet, and Hugging Face
datasets saved with `save_to_disk` (a folder with state.json + *.arrow files, or a DatasetDict
folder with dataset_dict.json and one such folder per split, of which the 'train' split is read). The saved Arrow files are read with
pyarrow; the `datasets` package is not needed.

Documents are (doc_id, text). doc ids are stable: `<input name>/<relative path>` for files found
in a folder, `<file name>` for a file given directly, plus `:<line>` (jsonl, 1-based) or
`:<row>` (parquet / arrow, 0-based).
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from pipeline.configtools import ConfigError

TEXT_EXTS = (".txt",)
JSONL_EXTS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".jsonl.zstd")
PARQUET_EXTS = (".parquet",)
HF_STATE = "state.json"
HF_DICT = "dataset_dict.json"


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


def _hf_dataset_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a Hugging Face dataset saved with save_to_disk, in their order, or None
    when the folder is not one. Of a DatasetDict, its 'train' split only: its validation and test
    splits are held-out text, which must not end up in the training shards (the val split here
    comes from --val-fraction; pass a split's own folder to prepare that split)."""
    if (folder / HF_DICT).is_file():
        try:
            splits = list(json.loads((folder / HF_DICT).read_text(encoding="utf-8"))["splits"])
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{folder / HF_DICT}: not a readable dataset_dict.json ({err})") from None
        if "train" not in splits:
            raise ConfigError(f"{folder} is a saved DatasetDict without a 'train' split (splits: "
                              f"{', '.join(map(str, splits)) or 'none'}): pass the folder of the split to "
                              f"prepare, e.g. --input {folder / str(splits[0]) if splits else folder}")
        files = _hf_dataset_files(folder / "train")
        if files is None:
            raise ConfigError(f"{folder}: split 'train' listed in {HF_DICT} is not a saved dataset folder")
        others = [str(split) for split in splits if split != "train"]
        if others:
            logging.getLogger(__name__).warning(
                "%s is a DatasetDict: reading its 'train' split only, not %s (held-out text; pass a split's "
                "folder as --input to prepare it)", folder, ", ".join(others))
        return files
    if (folder / HF_STATE).is_file():
        try:
            state = json.loads((folder / HF_STATE).read_text(encoding="utf-8"))
            names = [d["filename"] for d in state["_data_files"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{folder / HF_STATE}: not a readable datasets state.json ({err})") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ConfigError(f"{folder}: Arrow file(s) listed in {HF_STATE} are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    return None


def discover(inputs: list[str], exclude: Path | None = None) -> list[InputFile]:
    """Expand inputs (files/folders) into a sorted, de-duplicated file list; fail early on problems.
    Paths are made absolute: a Ray worker may run in another directory. `exclude` (the output
    folder, when it lies inside an input folder) is not read: its errors.jsonl is no input."""
    excluded = exclude.resolve() if exclude is not None else None
    files: list[InputFile] = []
    seen_ids: dict[str, str] = {}
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise ConfigError(f"input '{raw}' does not exist")
        found: list[tuple[Path, str, str]] = []  # (path, file id, sort key)
        if p.is_dir() and _hf_dataset_files(p) is not None:  # the input itself is a saved dataset
            base = p.resolve().name or "input"
            found = [(fp, f"{base}/{fp.relative_to(p).as_posix()}", f"{i:09d}")
                     for i, fp in enumerate(_hf_dataset_files(p))]
            if not found:
                raise ConfigError(f"input '{raw}': the saved dataset lists no Arrow files")
        elif p.is_dir():
            base = p.resolve().name or "input"
            for root, dirs, names in os.walk(p, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                                 and (Path(root) / d).resolve() != excluded)
                hf = _hf_dataset_files(Path(root))
                if hf is not None:  # a saved HF dataset: its Arrow files, nothing else below it
                    dirs[:] = []
                    root_id = f"{base}/{Path(root).relative_to(p).as_posix()}".rstrip("/.")
                    found.extend((fp, f"{base}/{fp.relative_to(p).as_posix()}", f"{root_id}/{i:09d}")
                                 for i, fp in enumerate(hf))
                    continue
                for name in sorted(names):
                    if name.startswith("."):
                        continue
                    fp = Path(root) / name
                    if file_kind(name) is None:
                        continue
                    rel = fp.relative_to(p).as_posix()
                    found.append((fp, f"{base}/{rel}", f"{base}/{rel}"))
            if not found:
                raise ConfigError(
                    f"input folder '{raw}' holds no supported files (.txt, .jsonl[.gz|.zst], .parquet, "
                    "a saved Hugging Face dataset)")
            # sorted by path; the Arrow files of a saved dataset keep their own (listed) order
            found.sort(key=lambda t: t[2])
        else:
            if file_kind(p.name) is None:
                raise ConfigError(
                    f"input '{raw}': unsupported file type (use .txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet)")
            found.append((p, p.name, p.name))
        for fp, fid, _ in found:
            if fid in seen_ids:
                raise ConfigError(
                    f"inputs '{seen_ids[fid]}' and '{fp}' both get the document id prefix '{fid}'; "
                    "rename one or pass their common parent folder")
            seen_ids[fid] = str(fp)
            kind = "arrow" if fp.suffix == ".arrow" else file_kind(fp.name)
            files.append(InputFile(str(fp.absolute()), fid, kind, fp.stat().st_size))
    return files


def _jsonl_ranges(path: str, group_bytes: int) -> list[tuple[int, int, int]]:
    """Cut a plain (uncompressed) jsonl file into line-aligned byte ranges of ~group_bytes:
    [(start, end, number of the first line)]. Reads the file once to count lines."""
    size = os.path.getsize(path)
    ranges = []
    start, line = 0, 1
    with open(path, "rb") as fh:
        while start < size:
            end = size
            if start + group_bytes < size:
                fh.seek(start + group_bytes)
                fh.readline()  # to the end of the line the cut falls in
                end = fh.tell()
            fh.seek(start)
            count = fh.read(end - start).count(b"\n")
            ranges.append((start, end, line))
            line += count
            start = end
    return ranges


def _parquet_ranges(path: str, group_bytes: int) -> list[tuple[list[int], int]]:
    """Group a parquet file's row groups into ~group_bytes units: [(row group indices, first row)]."""
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
        if size >= group_bytes:
            out.append((groups, first))
            groups, size, first = [], 0, row
    if groups:
        out.append((groups, first))
    return out


def _open_arrow(path: str):
    """(schema, iterator of record batches) of an Arrow IPC file: the stream format written by
    `datasets`, or the random-access file format."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(path))
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))


def _arrow_ranges(path: str, group_bytes: int) -> list[tuple[int, int, int]]:
    """Cut an Arrow file into runs of record batches of ~group_bytes: [(first batch, batches, first row)]."""
    try:
        _, batches = _open_arrow(path)
        sizes = [(b.nbytes, b.num_rows) for b in batches]
    except Exception:  # damaged file: one group, the reader reports it
        return []
    out, first, n, size, row, first_row = [], 0, 0, 0, 0, 0
    for i, (nbytes, rows) in enumerate(sizes):
        n += 1
        size += nbytes
        row += rows
        if size >= group_bytes:
            out.append((first, n, first_row))
            first, n, size, first_row = i + 1, 0, 0, row
    if n:
        out.append((first, n, first_row))
    return out


def plan_units(files: list[InputFile], group_bytes: int) -> list[dict]:
    """The plan of work groups, in input order: runs of consecutive whole files (any kinds) up to
    ~group_bytes, and the pieces of files too large for one group: line-aligned byte ranges of
    plain .jsonl files, runs of parquet row groups or Arrow record batches. Every group packs on
    its own and drops its last partial sequence, so small files are never groups of their own.
    Depends only on the files and group_bytes: the plan (not the number of workers) decides the
    output. A group of one kind of file says so in "kind"; a mixed one lists "kinds" per file."""
    units: list[dict] = []
    run: list[InputFile] = []
    run_bytes = 0

    def flush():
        nonlocal run, run_bytes
        if run:
            unit = {"kind": run[0].kind, "files": [(f.path, f.file_id) for f in run], "bytes": run_bytes}
            if any(f.kind != run[0].kind for f in run):
                unit.update(kind="mixed", kinds=[f.kind for f in run])
            units.append(unit)
            run, run_bytes = [], 0

    for f in files:
        unit = {"kind": f.kind, "files": [(f.path, f.file_id)], "bytes": f.size}
        pieces: list[dict] = []
        if f.size > 2 * group_bytes:
            if f.kind == "jsonl" and f.path.lower().endswith(".jsonl"):
                pieces = [dict(unit, bytes=end - start, range=[start, end, line])
                          for start, end, line in _jsonl_ranges(f.path, group_bytes)]
            elif f.kind == "parquet":
                ranges = _parquet_ranges(f.path, group_bytes)
                pieces = [dict(unit, bytes=f.size // len(ranges), row_groups=[groups, first_row])
                          for groups, first_row in ranges]
            elif f.kind == "arrow":
                ranges = _arrow_ranges(f.path, group_bytes)
                pieces = [dict(unit, bytes=f.size // len(ranges), batches=[first, n, first_row])
                          for first, n, first_row in ranges]
        if pieces:
            flush()
            units.extend(pieces)
            continue
        run.append(f)  # whole: a small file, a compressed jsonl, or one that cannot be cut
        run_bytes += f.size
        if run_bytes >= group_bytes:
            flush()
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


def _text_value(value, where: str, text_field: str, max_chars: int, bad: BadRecords) -> str | None:
    """A record's text field as a cleaned document, or None after counting why it was skipped."""
    if not isinstance(value, str):
        bad.add("wrong_type", where, f"'{text_field}' is a {type(value).__name__}, not a string")
        return None
    return _check_doc(value, where, max_chars, bad)


def _check_doc(text: str, where: str, max_chars: int, bad: BadRecords) -> str | None:
    if len(text) > max_chars:
        bad.add("too_long", where, f"{len(text)} characters > max_doc_chars={max_chars}")
        return None
    try:  # JSON "\ud800" escapes decode to lone surrogates, which no UTF-8 tokenizer accepts
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad.add("invalid_utf8", where, f"character {err.start}: lone surrogate U+{ord(text[err.start]):04X}")
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
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark (Windows editors) is no JSON
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
                    bad.add("invalid_json", where, f"{type(err).__name__}: {err}")
                    continue
                if not isinstance(rec, dict):
                    bad.add("not_an_object", where, f"a JSON {type(rec).__name__}, not an object")
                    continue
                if text_field not in rec or rec[text_field] is None:
                    bad.add("missing_field", where, f"no '{text_field}' field (keys: {', '.join(list(rec)[:8])})")
                    continue
                text = _text_value(rec[text_field], where, text_field, max_chars, bad)
                if text is not None:
                    yield where, text
    except Exception as err:  # EOFError / BadGzipFile (gzip), ZstdError, OSError: damaged stream
        bad.add("truncated_input", f"{file_id}:{lineno + 1}", f"{type(err).__name__}: {err}")


def _iter_parquet(path: str, file_id: str, cfg: dict, bad: BadRecords,
                  row_groups: list | None = None) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    text_field = cfg["text_field"]
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
    yield from _iter_column(pf.iter_batches(columns=[text_field], batch_size=4096, row_groups=groups),
                            0, file_id, row, cfg, bad)


def _iter_column(batches, col, file_id: str, row: int, cfg: dict, bad: BadRecords) -> Iterator[tuple[str, str]]:
    """Documents of one text column of Arrow record batches (parquet / Arrow inputs)."""
    text_field, max_chars = cfg["text_field"], cfg["max_doc_chars"]
    try:
        for batch in batches:
            for value in batch.column(col).to_pylist():
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
                text = _text_value(value, where, text_field, max_chars, bad)
                if text is not None:
                    yield where, text
    except Exception as err:
        bad.add("truncated_input", f"{file_id}:{row}", f"{type(err).__name__}: {err}")


def _iter_arrow(path: str, file_id: str, cfg: dict, bad: BadRecords,
                batches: list | None = None) -> Iterator[tuple[str, str]]:
    """Rows of an Arrow file of a saved Hugging Face dataset (all batches, or [first, n, first row])."""
    import itertools

    text_field = cfg["text_field"]
    try:
        schema, it = _open_arrow(path)
    except Exception as err:
        bad.add("read_error", file_id, f"{type(err).__name__}: {err}")
        return
    row = 0
    if batches is not None:
        first, n, row = batches
        it = itertools.islice(it, first, first + n)
    if text_field not in schema.names:
        try:
            n_rows = sum(b.num_rows for b in it)
        except Exception:
            n_rows = 0
        if n_rows:
            bad.add("missing_field", file_id, f"{n_rows} rows: no column '{text_field}' "
                    f"(columns: {', '.join(schema.names[:8])})", count=n_rows)
        return
    yield from _iter_column(it, schema.names.index(text_field), file_id, row, cfg, bad)


def iter_unit_documents(unit: dict, cfg: dict, bad: BadRecords) -> Iterator[tuple[str, str]]:
    """Yield (doc_id, cleaned text) for a unit in input order; bad records go to `bad`."""
    kinds = unit.get("kinds") or [unit["kind"]] * len(unit["files"])
    for (path, file_id), kind in zip(unit["files"], kinds):
        if kind == "txt":
            yield from _iter_txt(path, file_id, cfg["max_doc_chars"], bad)
        elif kind == "jsonl":
            yield from _iter_jsonl(path, file_id, cfg, bad, unit.get("range"))
        elif kind == "parquet":
            yield from _iter_parquet(path, file_id, cfg, bad, unit.get("row_groups"))
        elif kind == "arrow":
            yield from _iter_arrow(path, file_id, cfg, bad, unit.get("batches"))
        else:  # pragma: no cover - discover() only makes the kinds above
            raise ValueError(f"unknown file kind {kind}")
