"""Typed configuration of a data preparation job (built with pipeline.configtools)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pipeline.configtools import ConfigError, to_dict

# Fields that change how the job runs but never what it writes: they are left out of the
# manifest's "job" section and of the fingerprint that guards resuming, so that 1 or 2 workers
# (or another output folder) give byte-identical manifests, and a job that failed one of the
# limits reruns with a looser one, keeping its finished groups.
EXECUTION_ONLY = ("out", "num_workers", "overwrite", "progress_interval_s", "max_bad_fraction", "max_lost_inputs")

DEFAULT_TRAIN_VOCAB = 8192


@dataclass
class DataPrepConfig:
    # inputs: files or folders (.txt = one document per file; .jsonl/.jsonl.gz/.jsonl.zst; .parquet)
    input: list[str] = field(default_factory=list)
    out: str = ""
    # tokenizer SPEC: folder with tokenizer.json | tokenizer.json path | GPT-2 style folder
    # (vocab.json + merges.txt) | BERT vocab.txt | "train" / "train:N" (byte-level BPE trained here)
    tokenizer: str = "train"
    # vocabulary size for "train"; for an existing tokenizer, an optional check of its size
    vocab_size: int | None = None
    # names of special tokens, when the tokenizer's own cannot be guessed
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    mask_token: str | None = None
    # stop feeding the tokenizer trainer after this many characters (input order; deterministic)
    train_tokenizer_max_chars: int = 500_000_000
    seq_len: int = 1024
    packing: Literal["wrap", "pad"] = "wrap"
    # samples per shard; 0 = auto: ~256 MiB of tokens per shard, at least ~16 shards on small inputs
    samples_per_shard: int = 0
    val_fraction: float = 0.01
    # salt of the per-document split hash (change it to draw another split)
    split_salt: str = ""
    text_field: str = "text"
    # documents longer than this many characters are skipped as "too_long"
    max_doc_chars: int = 20_000_000
    dedup: bool = False
    # fail (without writing a manifest) when more than this fraction of the records is bad
    max_bad_fraction: float = 0.5
    # input files (or parts of one) that could not be read to their end ("read_error",
    # "truncated_input") tolerated before the job fails: 0 = every input must be read in full
    max_lost_inputs: int = 0
    # how many bad-record examples per reason go to errors.jsonl
    max_error_examples: int = 20
    # input bytes per work group (0 = auto: input size / 32, within 1 MiB .. 256 MiB). Each group is
    # packed and written by one worker on its own (one wrap tail dropped per group and split), so
    # this is part of the job's identity; the number of workers is not.
    group_bytes: int = 0
    # execution only (not part of the job's identity)
    num_workers: int | None = None
    overwrite: bool = False
    progress_interval_s: float = 2.0

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input: give at least one input file or folder (--input PATH)")
        if not self.out:
            raise ConfigError("out: give an output folder (--out DIR)")
        if self.seq_len < 3:
            raise ConfigError(f"seq_len: must be at least 3 (BOS + token + EOS), got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_lost_inputs < 0:
            raise ConfigError(f"max_lost_inputs: must be >= 0, got {self.max_lost_inputs}")
        if self.samples_per_shard < 0:
            raise ConfigError(f"samples_per_shard: must be >= 0, got {self.samples_per_shard}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError(f"num_workers: must be >= 1, got {self.num_workers}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"vocab_size: must be positive, got {self.vocab_size}")
        if self.max_doc_chars < 1:
            raise ConfigError(f"max_doc_chars: must be positive, got {self.max_doc_chars}")
        if self.group_bytes < 0:
            raise ConfigError(f"group_bytes: must be >= 0 (0 = auto), got {self.group_bytes}")
        if not self.text_field:
            raise ConfigError("text_field: must not be empty")
        spec = self.tokenizer
        if spec == "train" or spec.startswith("train:"):
            if spec.startswith("train:"):
                try:
                    n = int(spec.split(":", 1)[1])
                except ValueError:
                    raise ConfigError(f"tokenizer: '{spec}' should look like train:N with N an integer") from None
                if self.vocab_size is not None and self.vocab_size != n:
                    raise ConfigError(f"tokenizer '{spec}' and vocab_size={self.vocab_size} disagree")
                if n < 260:
                    raise ConfigError(f"tokenizer: a byte-level BPE needs a vocabulary of at least 260, got {n}")
            elif self.vocab_size is not None and self.vocab_size < 260:
                raise ConfigError(f"vocab_size: a byte-level BPE needs at least 260, got {self.vocab_size}")

    # ------------------------------------------------------------------
    def train_vocab_size(self) -> int | None:
        """Vocabulary size to train, or None when an existing tokenizer is named."""
        if self.tokenizer.startswith("train:"):
            return int(self.tokenizer.split(":", 1)[1])
        if self.tokenizer == "train":
            return self.vocab_size or DEFAULT_TRAIN_VOCAB
        return None

    def job_dict(self) -> dict:
        """The resolved config minus execution-only fields: what defines the output."""
        data = to_dict(self)
        for key in EXECUTION_ONLY:
            data.pop(key, None)
        return data


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(DataPrepConfig)]
