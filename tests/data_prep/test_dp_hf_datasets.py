"""Hugging Face datasets saved with save_to_disk are read from their Arrow files (no `datasets`
package needed). With `datasets` installed the folders are made by it; otherwise the same on-disk
layout (state.json + dataset_info.json + Arrow stream files; dataset_dict.json for a DatasetDict)
is written here with pyarrow."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from data_prep.sources import BadRecords, discover, iter_unit_documents, plan_units
from data_prep.verify import verify_dir
from pipeline.configtools import ConfigError
from dp_helpers import make_docs, run

try:  # pragma: no cover - depends on the environment
    import datasets as hf_datasets
except ImportError:
    hf_datasets = None

WCFG = {"text_field": "text", "max_doc_chars": 10_000_000}


def _save_dataset(folder: Path, table: pa.Table, n_files: int = 2, batch_rows: int = 5) -> None:
    """A Dataset.save_to_disk folder: data-0000i-of-0000n.arrow (IPC stream) + state.json + info."""
    if hf_datasets is not None:
        hf_datasets.Dataset(table).save_to_disk(str(folder), num_shards=n_files)
        return
    folder.mkdir(parents=True)
    per = -(-table.num_rows // n_files)
    names = []
    for i in range(n_files):
        name = f"data-{i:05d}-of-{n_files:05d}.arrow"
        part = table.slice(i * per, per)
        with pa.OSFile(str(folder / name), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                for batch in part.to_batches(max_chunksize=batch_rows):
                    writer.write_batch(batch)
        names.append(name)
    features = {c: {"dtype": "string" if pa.types.is_string(t) else "int64", "_type": "Value"}
                for c, t in zip(table.column_names, table.schema.types)}
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0" * 16,
        "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None}))


def _save_dataset_dict(folder: Path, tables: dict[str, pa.Table]) -> None:
    if hf_datasets is not None:
        hf_datasets.DatasetDict({k: hf_datasets.Dataset(t) for k, t in tables.items()}).save_to_disk(str(folder))
        return
    folder.mkdir(parents=True)
    for split, table in tables.items():
        _save_dataset(folder / split, table)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(tables)}))


@pytest.fixture(scope="module")
def hf_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf") / "corpus"
    docs = make_docs(60, seed=31)
    texts = docs[:40]
    texts[7] = None                                   # missing_field (null)
    _save_dataset(root / "single", pa.table({"text": texts, "n": list(range(40))}))
    _save_dataset_dict(root / "dict", {"train": pa.table({"text": docs[40:55]}),
                                       "validation": pa.table({"text": docs[55:]})})
    (root / "notes.txt").write_text(docs[0])
    return root, docs


def test_saved_datasets_are_discovered_in_order(hf_corpus, caplog):
    root, docs = hf_corpus
    with caplog.at_level("WARNING", logger="data_prep.sources"):
        files = discover([str(root)])
    assert "reading its 'train' split only, not validation" in caplog.text
    ids = [f.file_id for f in files]
    arrow = [f for f in files if f.kind == "arrow"]
    assert len(arrow) >= 4 and ids[-1] == "corpus/single/" + Path(arrow[-1].path).name
    assert ids.index("corpus/notes.txt") > max(i for i, f in enumerate(files) if "/dict/" in f.file_id)
    # of the DatasetDict, its train split only: its validation split is held-out text
    dict_ids = [i for i in ids if "/dict/" in i]
    assert dict_ids and all(i.startswith("corpus/dict/train/") for i in dict_ids)
    bad = BadRecords()
    got = []
    for unit in plan_units(files, 10_000_000):
        got.extend(iter_unit_documents(unit, WCFG, bad))
    texts = [t for _, t in got]
    assert texts[:15] == [d.strip() for d in docs[40:55]]
    assert texts[15] == docs[0].strip()  # notes.txt
    assert texts[16:] == [d.strip() for i, d in enumerate(docs[:40]) if i != 7]
    assert bad.counts == {"missing_field": 1}
    first_file = next(f.file_id for f in files if f.file_id.startswith("corpus/single/"))
    assert [(e["reason"], e["where"]) for e in bad.examples] == [("missing_field", f"{first_file}:7")]


def test_a_split_of_a_dataset_dict_is_prepared_by_passing_its_folder(hf_corpus, tmp_path):
    root, docs = hf_corpus
    bad = BadRecords()
    got = [t for u in plan_units(discover([str(root / "dict" / "validation")]), 10_000_000)
           for _, t in iter_unit_documents(u, WCFG, bad)]
    assert got == [d.strip() for d in docs[55:]]
    _save_dataset_dict(tmp_path / "no-train", {"validation": pa.table({"text": docs[:3]}),
                                               "test": pa.table({"text": docs[3:5]})})
    with pytest.raises(ConfigError, match=r"without a 'train' split \(splits: validation, test\): pass the "
                                          r"folder of the split to prepare, e.g. --input .*no-train/validation"):
        discover([str(tmp_path / "no-train")])


def test_a_saved_dataset_folder_as_input_and_batch_groups(hf_corpus, tmp_path, ray_session):
    root, docs = hf_corpus
    files = discover([str(root / "single")])
    assert all(f.kind == "arrow" and f.file_id.startswith("single/") for f in files)
    groups = plan_units(files, 800)
    assert any("batches" in g for g in groups) and len(groups) > len(files)
    bad = BadRecords()
    texts = [t for g in groups for _, t in iter_unit_documents(g, WCFG, bad)]
    assert texts == [d.strip() for i, d in enumerate(docs[:40]) if i != 7]
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"o{workers}"
        man = run(["--input", root / "single", "--out", out, "--tokenizer", "train:300", "--seq-len", 48,
                   "--val-fraction", 0.1, "--num-workers", workers, "group_bytes=800"])
        outs.append(out)
    assert man["skipped"] == {"missing_field": 1}
    assert man["splits"]["train"]["documents"] + man["splits"]["val"]["documents"] == 39
    assert verify_dir(outs[0])[0] == []
    assert (outs[0] / "manifest.json").read_bytes() == (outs[1] / "manifest.json").read_bytes()


def test_wrong_text_field_of_a_saved_dataset_is_counted(hf_corpus, tmp_path, ray_session):
    from data_prep.run import JobFailed

    root, _ = hf_corpus
    with pytest.raises(JobFailed, match="is --text-field right"):
        run(["--input", root / "dict", "--out", tmp_path / "o", "--tokenizer", "train:300",
             "--text-field", "content"])
