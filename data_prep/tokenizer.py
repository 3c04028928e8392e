"""Tokenizer loading (tokenizer.json, GPT-2 vocab.json+merges.txt, BERT vocab.txt) and training.

Whatever the source, the tokenizer is saved as one Hugging Face `tokenizers` JSON file, which the
trainer loads with `tokenizers.Tokenizer.from_file`. Special ids come from the tokenizer itself
(known names) or from the config (`bos_token`, ...).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipeline.configtools import ConfigError

ENDOFTEXT = "<|endoftext|>"

BOS_NAMES = ("<|endoftext|>", "<s>", "[CLS]", "<bos>", "<|begin_of_text|>", "<|bos|>")
EOS_NAMES = ("<|endoftext|>", "</s>", "[SEP]", "<eos>", "<|end_of_text|>", "<|eos|>")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
MASK_NAMES = ("<mask>", "[MASK]", "<|mask|>")


@dataclass
class TokenizerInfo:
    name: str
    json: str          # the tokenizer in HF tokenizers JSON
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    mask_id: int | None

    @property
    def model_vocab_size(self) -> int:
        return self.vocab_size if self.mask_id is not None else self.vocab_size + 1

    @property
    def mask_token_id(self) -> int:
        return self.mask_id if self.mask_id is not None else self.vocab_size

    @property
    def dtype(self) -> str:
        return "uint16" if self.model_vocab_size <= 65535 else "int32"

    def sha256(self) -> str:
        return hashlib.sha256(self.json.encode("utf-8")).hexdigest()

    def tokenizer(self):
        return make_encoder(self.json)


def make_encoder(tok_json: str):
    """A Tokenizer from JSON that treats special-token text inside documents as plain text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    tok.encode_special_tokens = True  # "<|endoftext|>" written in a document is not the EOS id
    return tok


def _special_id(tok, explicit: str | None, names: tuple[str, ...], what: str, spec: str) -> int | None:
    vocab = tok.get_vocab(with_added_tokens=True)
    if explicit is not None:
        if explicit not in vocab:
            raise ConfigError(f"{what}_token '{explicit}' is not in the vocabulary of tokenizer '{spec}'")
        return vocab[explicit]
    for name in names:
        if name in vocab:
            return vocab[name]
    return None


def _from_gpt2_files(vocab_json: Path, merges_txt: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    bpe = models.BPE.from_file(str(vocab_json), str(merges_txt))
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
    if ENDOFTEXT in vocab:
        tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tok


def _from_bert_vocab(vocab_txt: Path, lowercase: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    wp = models.WordPiece.from_file(str(vocab_txt), unk_token="[UNK]")
    tok = Tokenizer(wp)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    vocab = tok.get_vocab()
    specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab]
    tok.add_special_tokens(specials)
    if "[CLS]" in vocab and "[SEP]" in vocab:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE with `<|endoftext|>` (id 0) as BOS = EOS, as GPT-2; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[ENDOFTEXT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def is_train_spec(spec: str) -> bool:
    return spec == "train" or spec.startswith("train:")


def load_tokenizer(spec: str, cfg, train_texts: Iterable[str] | None = None) -> TokenizerInfo:
    """Resolve a tokenizer SPEC (see DataPrepConfig.tokenizer) into a TokenizerInfo."""
    from tokenizers import Tokenizer

    if is_train_spec(spec):
        from .config import DEFAULT_TRAIN_VOCAB

        n = int(spec.split(":", 1)[1]) if ":" in spec else (cfg.vocab_size or DEFAULT_TRAIN_VOCAB)
        if train_texts is None:
            raise ValueError("training a tokenizer needs the input texts")
        tok = train_bpe(train_texts, n)
        name = f"bpe-bytelevel-{n}"
    else:
        p = Path(spec).expanduser()
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                tok = Tokenizer.from_file(str(p / "tokenizer.json"))
            elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
                tok = _from_gpt2_files(p / "vocab.json", p / "merges.txt")
            elif (p / "vocab.txt").is_file():
                tok = _from_bert_vocab(p / "vocab.txt", lowercase=_bert_lowercase(p))
            else:
                raise ConfigError(
                    f"tokenizer folder '{spec}' has none of tokenizer.json, vocab.json + merges.txt, vocab.txt")
            name = p.resolve().name
        elif p.is_file():
            if p.name.endswith(".json") and p.name != "vocab.json":
                tok = Tokenizer.from_file(str(p))
            elif p.name == "vocab.txt":
                tok = _from_bert_vocab(p, lowercase=_bert_lowercase(p.parent))
            elif p.name == "vocab.json" and (p.parent / "merges.txt").is_file():
                tok = _from_gpt2_files(p, p.parent / "merges.txt")
            else:
                raise ConfigError(f"tokenizer file '{spec}' is neither a tokenizer.json nor a BERT vocab.txt")
            name = p.resolve().parent.name if p.name in ("tokenizer.json", "vocab.txt", "vocab.json") else p.stem
        else:
            raise ConfigError(f"tokenizer '{spec}' is not a folder, a file or train:N")
    return describe(tok, name, cfg, spec)


def _bert_lowercase(folder: Path) -> bool:
    for cfg_name in ("tokenizer_config.json",):
        f = folder / cfg_name
        if f.is_file():
            try:
                return bool(json.loads(f.read_text()).get("do_lower_case", True))
            except ValueError:
                pass
    return "cased" not in folder.name or "uncased" in folder.name


def describe(tok, name: str, cfg, spec: str) -> TokenizerInfo:
    bos = _special_id(tok, cfg.bos_token, BOS_NAMES, "bos", spec)
    eos = _special_id(tok, cfg.eos_token, EOS_NAMES, "eos", spec)
    if bos is None and eos is not None:
        bos = eos
    if eos is None and bos is not None:
        eos = bos
    if eos is None:
        raise ConfigError(
            f"tokenizer '{spec}' has no recognisable BOS/EOS token; name one with bos_token=... eos_token=...")
    pad = _special_id(tok, cfg.pad_token, PAD_NAMES, "pad", spec)
    if pad is None:
        pad = eos  # GPT-2 style tokenizers have no pad token; the mask array marks padding anyway
    mask = _special_id(tok, cfg.mask_token, MASK_NAMES, "mask", spec)
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # ids may have holes
    if cfg.vocab_size is not None and not is_train_spec(spec) and cfg.vocab_size != vocab_size:
        raise ConfigError(f"vocab_size={cfg.vocab_size} but tokenizer '{spec}' has {vocab_size} tokens")
    return TokenizerInfo(name=name, json=tok.to_str(), vocab_size=vocab_size, bos_id=bos, eos_id=eos,
                         pad_id=pad, mask_id=mask)
