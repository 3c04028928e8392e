"""`verify` catches damaged shards and reports them precisely."""
from __future__ import annotations

import shutil
import subprocess
import sys

from data_prep.verify import verify_dir
from dp_helpers import REPO


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_intact_dataset_verifies_via_cli(wrap_out):
    proc = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(wrap_out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def _shard(out, split, i):
    from data_prep.manifest import load_manifest

    return load_manifest(out)["splits"][split]["shards"][i]["name"]


def test_truncated_shard_is_reported(wrap_out, tmp_path):
    out = _copy(wrap_out, tmp_path / "t")
    name = _shard(out, "train", 1)
    stem = name.split("/")[1][:-4]
    shard = out / name
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    problems, _ = verify_dir(out)
    text = "\n".join(problems)
    assert f"{name}: sha256 mismatch" in text
    assert f"{name}: unreadable tar" in text or "samples read, manifest says" in text
    assert all(stem in p for p in problems)
    proc = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "FAILED" in proc.stdout and name in proc.stdout


def test_bit_flip_is_reported(wrap_out, tmp_path):
    out = _copy(wrap_out, tmp_path / "b")
    name = _shard(out, "val", 0)
    shard = out / name
    data = bytearray(shard.read_bytes())
    data[512 + 128 + 10] ^= 0x01  # a token of the first sample (after tar header + npy header)
    shard.write_bytes(bytes(data))
    problems, _ = verify_dir(out)
    assert problems and problems[0].startswith(f"{name}: sha256 mismatch")


def test_missing_and_stray_shards_and_tokenizer_change(wrap_out, tmp_path):
    out = _copy(wrap_out, tmp_path / "m")
    name = _shard(out, "train", 0)
    (out / name).rename(out / "train" / "shard-000099-0000.tar")
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    text = "\n".join(verify_dir(out)[0])
    assert f"{name}: missing" in text
    assert "train/shard-000099-0000.tar: shard file not listed" in text
    assert "tokenizer/tokenizer.json: sha256 mismatch" in text


def test_a_sample_with_ids_outside_the_vocabulary_is_reported_even_with_a_matching_checksum(wrap_out, tmp_path):
    """The per-sample checks, on a shard whose manifest sha256 was updated with the damage (as a
    buggy writer would have produced it): only the ids themselves give it away."""
    import hashlib
    import io
    import json
    import tarfile

    import numpy as np

    out = _copy(wrap_out, tmp_path / "ids")
    name = _shard(out, "train", 0)
    with tarfile.open(out / name) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    first = next(i for i, (m, _) in enumerate(members) if m.name.endswith("tokens.npy"))
    tokens = np.load(io.BytesIO(members[first][1]))
    tokens[5] = 60000  # the tokenizer has 400 ids
    buf = io.BytesIO()
    np.save(buf, tokens)
    with tarfile.open(out / name, "w") as tar:
        for i, (m, raw) in enumerate(members):
            raw = buf.getvalue() if i == first else raw
            m.size = len(raw)
            tar.addfile(m, io.BytesIO(raw))
    manifest = json.loads((out / "manifest.json").read_text())
    entry = next(s for s in manifest["splits"]["train"]["shards"] if s["name"] == name)
    entry["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    text = "\n".join(verify_dir(out)[0])
    assert "sha256 mismatch" not in text
    assert f"token ids 0..60000 outside 0..{manifest['tokenizer']['vocab_size'] - 1}" in text, text[:2000]
