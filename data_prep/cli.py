"""Command line: `python -m data_prep [run] ...`, `python -m data_prep verify DIR`,
`python -m data_prep fetch-demo-corpus [--cache DIR]`.

Config precedence (lowest first): DataPrepConfig defaults < --config YAML < flags < key=value.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.configtools import ConfigError, apply_overrides, load_config, read_yaml

from .config import DataPrepConfig

COMMANDS = ("run", "verify", "fetch-demo-corpus")

# flag dest -> config key (all flags default to None so that only given ones override)
_FLAGS = {
    "input": "input", "out": "out", "tokenizer": "tokenizer", "vocab_size": "vocab_size",
    "seq_len": "seq_len", "packing": "packing", "samples_per_shard": "samples_per_shard",
    "val_fraction": "val_fraction", "text_field": "text_field",
    "num_workers": "num_workers", "dedup": "dedup", "max_bad_fraction": "max_bad_fraction",
    "max_lost_inputs": "max_lost_inputs",
    "max_doc_chars": "max_doc_chars", "overwrite": "overwrite", "group_bytes": "group_bytes",
}


def build_run_parser(prog: str = "python -m data_prep [run]") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Tokenize and pack a text corpus into webdataset shards with Ray.",
        epilog="Extra arguments key=value override any DataPrepConfig field (e.g. max_doc_chars=1000000). "
               "Uses the Ray cluster named by RAY_ADDRESS (as `ray job submit` sets it), else a local one.")
    p.add_argument("--input", nargs="+", metavar="PATH", help="input files or folders (.txt, .jsonl[.gz|.zst], .parquet, "
                        "Hugging Face datasets saved with save_to_disk)")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--tokenizer", metavar="SPEC",
                   help="folder with tokenizer.json | tokenizer.json | GPT-2 folder (vocab.json+merges.txt) | "
                        "BERT vocab.txt | train[:N] (default: train)")
    p.add_argument("--vocab-size", type=int, dest="vocab_size", help="vocabulary size for --tokenizer train")
    p.add_argument("--seq-len", type=int, dest="seq_len", help="tokens per sample (default 1024)")
    p.add_argument("--packing", choices=("wrap", "pad"), help="wrap (default) or pad")
    p.add_argument("--samples-per-shard", type=int, dest="samples_per_shard",
                   help="samples per shard (default: ~256 MiB of tokens, >= ~16 shards for small inputs, "
                        "at most ~one group's worth; each group's last shard may be smaller)")
    p.add_argument("--val-fraction", type=float, dest="val_fraction", help="fraction of documents for val (0.01)")
    p.add_argument("--text-field", dest="text_field", help="text field of jsonl/parquet records (text)")
    p.add_argument("--num-workers", type=int, dest="num_workers",
                   help="parallel Ray workers (default: all CPUs); never changes the output")
    p.add_argument("--group-bytes", type=int, dest="group_bytes",
                   help="input bytes per work group, each packed and written by one worker "
                        "(default 0 = auto: input size / 32 within 1 MiB..256 MiB)")
    p.add_argument("--dedup", action="store_true", default=None, help="drop exact duplicate documents")
    p.add_argument("--max-bad-fraction", type=float, dest="max_bad_fraction",
                   help="fail when more than this fraction of the records is bad (0.5)")
    p.add_argument("--max-lost-inputs", type=int, dest="max_lost_inputs",
                   help="input files (or parts) that could not be read to their end (damaged, "
                        "truncated, unreadable) to go on without (default 0: fail)")
    p.add_argument("--max-doc-chars", type=int, dest="max_doc_chars", help="skip longer documents")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the output of a different job in --out")
    p.add_argument("--config", metavar="YAML", help="YAML file of DataPrepConfig fields")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def config_from_args(ns: argparse.Namespace) -> DataPrepConfig:
    base = read_yaml(ns.config) if ns.config else {}
    flags = {key: getattr(ns, dest) for dest, key in _FLAGS.items() if getattr(ns, dest, None) is not None}
    for text in ns.overrides:
        if "=" not in text:
            raise ConfigError(f"unexpected argument '{text}': overrides look like key=value")

    def prepare(kv: dict) -> dict:
        merged = dict(base)
        merged.update(flags)
        return apply_overrides(merged, list(ns.overrides))

    return load_config(DataPrepConfig, None, [], prepare=prepare)


def parse_run_args(argv: list[str]) -> DataPrepConfig:
    """CLI arguments of `run` (without the command word) -> validated DataPrepConfig."""
    return config_from_args(build_run_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m data_prep [run] --input PATH... --out DIR [options] [key=value ...]\n"
              "       python -m data_prep verify DIR\n"
              "       python -m data_prep fetch-demo-corpus [--cache DIR]\n\n"
              "`python -m data_prep run --help` lists the options.")
        return 0
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    if command == "verify":
        p = argparse.ArgumentParser(prog="python -m data_prep verify",
                                    description="Check every shard against the manifest.")
        p.add_argument("dir")
        from .verify import main as verify_main

        return verify_main(p.parse_args(argv).dir)
    if command == "fetch-demo-corpus":
        p = argparse.ArgumentParser(prog="python -m data_prep fetch-demo-corpus",
                                    description="Fetch the State of the Union demo corpus; print its folder.")
        p.add_argument("--cache", help="cache folder (default $MDLM_CACHE or ~/.cache/mdlm-pretrain)")
        from .corpus import CorpusError, fetch_demo_corpus

        try:
            print(fetch_demo_corpus(p.parse_args(argv).cache))
        except CorpusError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0

    from .run import JobFailed, run_job

    try:
        cfg = parse_run_args(argv)
        run_job(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
