"""Shards in the data_prep format from a synthetic Markov source with a known entropy rate.

Written directly with webdataset (no Ray) so pipeline tests do not depend on data_prep."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds


def markov_chain(vocab: int, seed: int = 0, concentration: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(vocab, concentration), size=vocab)


def entropy_rate(transition: np.ndarray) -> float:
    """Nats per token of the stationary chain."""
    vals, vecs = np.linalg.eig(transition.T)
    stationary = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
    stationary = stationary / stationary.sum()
    row_entropy = -(transition * np.log(np.clip(transition, 1e-300, None))).sum(axis=1)
    return float(stationary @ row_entropy)


def sample_chain(transition: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    vocab = transition.shape[0]
    out = np.empty(length, dtype=np.int64)
    state = rng.integers(vocab)
    cdf = transition.cumsum(axis=1)
    for i in range(length):
        state = min(int(np.searchsorted(cdf[state], rng.random())), vocab - 1)
        out[i] = state
    return out


def write_tokenizer(path: Path, vocab: int) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


def write_markov_shards(out: Path, vocab: int = 16, seq_len: int = 32, train_samples: int = 256,
                        val_samples: int = 64, samples_per_shard: int = 64, seed: int = 0,
                        padded: bool = False) -> dict:
    """A data_prep-shaped directory: train/ and val/ shards, tokenizer/, manifest.json.

    Token ids 0..vocab-1 come from the chain; the tokenizer has no mask, so the model vocab is
    vocab + 1 with [MASK] = vocab. `padded`: pad packing, each sample one document of seq_len/4 to
    seq_len tokens followed by pad id 0, with its `mask.npy` (1 = a real token)."""
    out = Path(out)
    transition = markov_chain(vocab, seed)
    rng = np.random.default_rng(seed + 1)
    splits = {}
    for split, count in (("train", train_samples), ("val", val_samples)):
        (out / split).mkdir(parents=True, exist_ok=True)
        shards = []
        for shard_id, start in enumerate(range(0, count, samples_per_shard)):
            name = f"{split}/shard-{shard_id:06d}.tar"
            n = min(samples_per_shard, count - start)
            with wds.TarWriter(str(out / name)) as sink:
                for i in range(n):
                    tokens = sample_chain(transition, seq_len, rng).astype(np.uint16)
                    item = {"__key__": f"{split}-{start + i:08d}"}
                    if padded:
                        mask = (np.arange(seq_len) < rng.integers(seq_len // 4, seq_len + 1)).astype(np.uint8)
                        tokens[mask == 0] = 0
                        buf = io.BytesIO()
                        np.save(buf, mask)
                        item["mask.npy"] = buf.getvalue()
                    buf = io.BytesIO()
                    np.save(buf, tokens)
                    item["tokens.npy"] = buf.getvalue()
                    sink.write(item)
            digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
            shards.append({"name": name, "samples": n, "tokens": n * seq_len, "sha256": digest})
        splits[split] = {"shards": shards, "documents": count, "samples": count, "tokens": count * seq_len}
    write_tokenizer(out / "tokenizer" / "tokenizer.json", vocab)
    manifest = {
        "format_version": 1,
        "tokenizer": {"name": "synthetic-markov", "vocab_size": vocab, "bos_id": 0, "eos_id": 0,
                      "pad_id": 0 if padded else None, "mask_id": None, "files": {}},
        "model_vocab_size": vocab + 1, "mask_token_id": vocab, "seq_len": seq_len,
        "packing": "pad" if padded else "wrap", "dtype": "uint16", "splits": splits, "dropped_tail_tokens": 0,
        "skipped": {}, "job": {"source": "markov", "seed": seed},
        "entropy_rate_nats": entropy_rate(transition),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
