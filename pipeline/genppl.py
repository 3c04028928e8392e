"""Generative evaluation of samples: perplexity under a judge AR model, and unigram entropy.

Judges:
- the project's own AR checkpoint (`load_checkpoint_model`, EMA weights): scores the token ids as
  they are, so it must share the samples' tokenizer;
- a Hugging Face causal-LM directory (config.json + weights), when `transformers` is installed:
  the samples are decoded to text and re-tokenized with the judge's tokenizer.

Convention (recorded in every result): the first token of each sample is context only; the judge
scores tokens 1..L-1 of each sample, so an AR sample (BOS + L-1 generated tokens) and an MDLM sample
of the same length are scored on the same number of tokens. With a prompt or suffix only the
generated tokens are scored (given everything before them): the given text is no sample quality.
Gen-PPL = exp(total NLL / scored tokens). Entropy: the unigram entropy (nats) of each sample's
generated tokens, averaged over samples (low-temperature or degenerate samplers lower it together
with gen-PPL), and the entropy of all samples pooled.

Samples written by `python -m pipeline.sample` are scored again, e.g. under another judge, with
    python -m pipeline.genppl PREFIX.json --judge AR_CKPT_OR_HF_DIR [--device auto] [--output FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

JUDGE_CONVENTION = ("tokens 1..L-1 of each sample scored given the tokens before them (token 0 is context); "
                    "with a prompt or suffix, the generated tokens only")


def unigram_entropy(tokens: torch.Tensor, scored: torch.Tensor | None = None) -> dict:
    """Mean per-sample unigram entropy and the pooled entropy, in nats (of the `scored` tokens only
    where given)."""
    tokens = torch.as_tensor(tokens).long().cpu()
    if tokens.dim() == 1:
        tokens = tokens[None]
    if scored is not None:
        rows = [row[keep] for row, keep in zip(tokens, scored.bool().cpu())]
        per = [_entropy(row) for row in rows]
        return {"entropy": sum(per) / len(per), "entropy_pooled": _entropy(torch.cat(rows))}

    per = [_entropy(row) for row in tokens] if tokens.numel() else [0.0]
    return {"entropy": sum(per) / len(per), "entropy_pooled": _entropy(tokens.reshape(-1)) if tokens.numel() else 0.0}


def _entropy(row: torch.Tensor) -> float:
    if not row.numel():
        return 0.0
    counts = torch.bincount(row).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def scored_mask(tokens: torch.Tensor, positions: list[int] | None) -> torch.Tensor | None:
    """(N, L) bool of the positions a judge scores: the generated ones (None: all but token 0)."""
    if positions is None:
        return None
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, [p for p in positions if 0 < p < tokens.shape[1]]] = True
    return mask


class ProjectJudge:
    """An AutoregressiveLM from this project scoring token ids directly."""

    kind = "project"

    def __init__(self, model, name: str = "", tokenizer_sha: str | None = None):
        from model.mdlm import AutoregressiveLM

        if not isinstance(model, AutoregressiveLM):
            raise TypeError(f"the judge must be an autoregressive model (model.objective=ar), "
                             f"got {type(model).__name__}")
        self.model, self.name, self.tokenizer_sha = model, name, tokenizer_sha

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor, texts: list[str] | None = None, batch_size: int = 32,
            scored: torch.Tensor | None = None, pieces: list[tuple[str, str]] | None = None) -> tuple[float, int]:
        from model.likelihood import ar_nll
        from model.mdlm import model_device

        tokens = torch.as_tensor(tokens).long()
        if tokens.shape[1] < 2:
            raise ValueError("gen-PPL needs samples of at least 2 tokens")
        vocab = self.model.cfg.vocab_size
        if int(tokens.max()) >= vocab:
            raise ValueError(f"sample token id {int(tokens.max())} is outside the judge's vocabulary ({vocab}): "
                             "the judge must use the samples' tokenizer")
        device = model_device(self.model)
        total = 0.0
        for i in range(0, tokens.shape[0], batch_size):
            valid = scored[i:i + batch_size].to(device) if scored is not None else None
            total += float(ar_nll(self.model, tokens[i:i + batch_size].to(device), valid).sum())
        count = int(scored[:, 1:].sum()) if scored is not None else tokens.shape[0] * (tokens.shape[1] - 1)
        return total, count


class HFJudge:
    """A Hugging Face causal LM directory; needs `transformers` (optional dependency)."""

    kind = "huggingface"

    def __init__(self, path: str | Path, device="cpu"):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as err:
            raise RuntimeError(f"judge '{path}' is a Hugging Face model directory, but `transformers` is not "
                               "installed: pip install transformers, or judge with an AR checkpoint of this "
                               "project") from err
        self.name = str(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path)).to(device).eval()
        self.device = device

    @torch.no_grad()
    def nll(self, tokens: torch.Tensor, texts: list[str] | None = None, batch_size: int = 8,
            scored: torch.Tensor | None = None, pieces: list[tuple[str, str]] | None = None) -> tuple[float, int]:
        """Scores decoded texts; with `scored` (a prompt or suffix), `pieces` gives each sample as
        (the text before its first generated token, the generated text through its last), and
        the judge scores the second given the first. Re-tokenized text has no positions: fixed
        tokens between two generated ones (infilling inside a prompt) are scored here too, where
        the project judge scores the generated positions only."""
        if scored is not None and pieces is None:
            raise ValueError("a Hugging Face judge scores the generated text of prompted samples from their "
                             "context and generated pieces, which these samples lack: sample them again")
        if scored is None and texts is None:
            raise ValueError("a Hugging Face judge scores decoded texts: pass texts")
        total, count = 0.0, 0
        max_len = getattr(self.model.config, "max_position_embeddings", None)
        for item in (pieces if scored is not None else texts):
            if scored is not None:
                context = self.tokenizer(item[0]).input_ids if item[0] else []
                target = self.tokenizer(item[1], add_special_tokens=False).input_ids
                ids, first = context + target, max(len(context), 1)
            else:
                ids, first = self.tokenizer(item).input_ids, 1
            ids = ids[:max_len] if max_len else ids
            if len(ids) <= first:
                continue
            ids = torch.tensor([ids], device=self.device)
            logits = self.model(ids).logits[:, first - 1:-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             ids[:, first:].reshape(-1), reduction="sum"))
            count += ids.shape[1] - first
        return total, count


def is_hf_directory(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "checkpoints").is_dir() \
        and not any(path.glob("*model_states.pt"))


def tokenizer_sha(config: dict) -> str | None:
    """sha256 of the run's tokenizer.json, from its data manifest (None when unknown)."""
    try:
        from .data import load_manifest

        manifest = load_manifest(config["data"]["path"])
        return manifest["tokenizer"]["files"].get("tokenizer.json") or manifest["tokenizer"].get("name")
    except (OSError, KeyError, TypeError, ValueError):
        return None


def check_judge(path: str | Path, samples_manifest: dict, warn: bool = True) -> None:
    """Before sampling: the judge exists, is autoregressive, and (a project checkpoint) shares the
    samples' tokenizer, since it scores their token ids as they are. Raises with the reason; `warn`
    prints what could not be checked (one rank of a run says it)."""
    import sys

    if is_hf_directory(path):
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            raise RuntimeError("a Hugging Face model directory, but `transformers` is not installed: "
                               "pip install transformers, or judge with an AR checkpoint of this project")
        return
    from .inference import checkpoint_run_config, resolve_checkpoint, training_data

    ckpt = resolve_checkpoint(path)
    config = checkpoint_run_config(ckpt)
    objective = config["model"].get("objective", "mdlm")
    tensor = int((config.get("parallel") or {}).get("tensor", 1))
    if tensor > 1:
        raise ValueError(f"{ckpt} is a tensor-parallel checkpoint (parallel.tensor={tensor}): merge it for the "
                         f"judge with `python -m pipeline.convert_tp --checkpoint {ckpt} --out DIR`")
    if objective != "ar":
        raise ValueError(f"{ckpt} is a model.objective={objective} checkpoint; the judge must be autoregressive "
                         "(train one with model.objective=ar, or pass a Hugging Face causal-LM directory)")
    try:
        judge_manifest, _ = training_data(ckpt, config["data"]["path"])
    except FileNotFoundError:
        if warn:
            print(f"warning: the judge {ckpt} holds no copy of its training data's manifest: its tokenizer could "
                  "not be checked against the samples'", file=sys.stderr)
        return
    mine, theirs = samples_manifest["tokenizer"], judge_manifest["tokenizer"]
    if mine.get("files") != theirs.get("files") or mine.get("vocab_size") != theirs.get("vocab_size"):
        raise ValueError(f"{ckpt} was trained with tokenizer {theirs.get('name')} (vocab {theirs.get('vocab_size')}), "
                         f"the samples use {mine.get('name')} (vocab {mine.get('vocab_size')}): a project judge "
                         "scores token ids, so it needs the samples' tokenizer")


def load_judge(path: str | Path, device="cpu", use_ema: bool = True):
    """A ProjectJudge from an AR checkpoint (run dir, checkpoints dir or step dir) or an HFJudge
    from a Hugging Face model directory."""
    if is_hf_directory(path):
        return HFJudge(path, device)
    from .inference import load_checkpoint_model

    loaded = load_checkpoint_model(path, use_ema=use_ema, device=device)
    return ProjectJudge(loaded.model, str(loaded.path), tokenizer_sha(loaded.config))


def gen_ppl(judge, tokens: torch.Tensor, texts: list[str] | None = None, batch_size: int = 32,
            scored: torch.Tensor | None = None, pieces: list[tuple[str, str]] | None = None) -> dict:
    """`scored` (N, L): the generated positions (None: all but token 0); `pieces`: see HFJudge.nll."""
    total, count = judge.nll(tokens, texts, batch_size, scored=scored, pieces=pieces)
    if count == 0:
        raise ValueError("no tokens to score")
    return {"gen_ppl": math.exp(total / count), "gen_nll": total / count, "judge_tokens": count,
            "judge": judge.name, "judge_kind": judge.kind, "judge_convention": JUDGE_CONVENTION}


def evaluate_samples(tokens: torch.Tensor, judge=None, texts: list[str] | None = None, batch_size: int = 32,
                     scored: torch.Tensor | None = None, pieces: list[tuple[str, str]] | None = None) -> dict:
    out = unigram_entropy(tokens, scored)
    if judge is not None:
        out.update(gen_ppl(judge, tokens, texts, batch_size, scored=scored, pieces=pieces))
    return out


def sample_pieces(rows: list[dict]) -> list[tuple[str, str]] | None:
    """(context text, generated text) of each sample row, where pipeline.sample wrote them."""
    if not rows or any("generated_text" not in row for row in rows):
        return None
    return [(str(row["context_text"]), str(row["generated_text"])) for row in rows]


def read_samples(path: str | Path) -> tuple[dict, torch.Tensor, list[str], list[dict]]:
    """(stats, token ids (N, L), texts, rows) of the samples behind PREFIX, PREFIX.json or PREFIX.jsonl."""
    from .sample import output_prefix

    prefix = output_prefix(str(path))
    stats_file, rows_file = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".jsonl")
    if not stats_file.is_file():
        raise FileNotFoundError(f"{stats_file} not found: pass the PREFIX.json that python -m pipeline.sample wrote")
    if not rows_file.is_file():
        raise FileNotFoundError(f"{rows_file} not found: it holds the samples' token ids, which pipeline.sample "
                                "writes next to PREFIX.json (samples from before it need sampling again)")
    stats = json.loads(stats_file.read_text())
    tokens, texts, rows = [], [], []
    for number, line in enumerate(rows_file.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            tokens.append([int(t) for t in row["tokens"]])
            texts.append(str(row["text"]))
            rows.append(row)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{rows_file} line {number} is not a sample ({{\"tokens\": [...], \"text\": ...}}): "
                             f"{type(err).__name__}: {err}") from err
    if not tokens:
        raise ValueError(f"{rows_file} holds no samples")
    if len({len(row) for row in tokens}) != 1:
        raise ValueError(f"{rows_file}: samples of different lengths; score each pipeline.sample output on its own")
    return stats, torch.tensor(tokens, dtype=torch.long), texts, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.genppl",
                                description="Gen-PPL and entropy of samples written by python -m pipeline.sample")
    p.add_argument("samples", help="the --output of a pipeline.sample run: its PREFIX (or PREFIX.json/.jsonl/.txt)")
    p.add_argument("--judge", default="", help="AR checkpoint of this project or a Hugging Face causal-LM "
                                               "directory (without it: entropy only)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-ema", action="store_true", help="judge with the raw weights of a project checkpoint")
    p.add_argument("--output", default="", help="also write the result to this JSON file")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1 (got {args.batch_size})")
    from .inference import resolve_device

    try:
        device = resolve_device(args.device)
        stats, tokens, texts, rows = read_samples(args.samples)
        if args.judge:
            if "tokenizer" not in stats:
                raise ValueError(f"{args.samples} names no tokenizer: pass the PREFIX.json that pipeline.sample wrote")
            check_judge(args.judge, stats)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        p.error(str(err))
    output = Path(args.output) if args.output else None
    if output is not None:
        from .sample import output_prefix

        samples_prefix = output_prefix(args.samples)
        if output.resolve() in {samples_prefix.with_name(samples_prefix.name + e).resolve() for e in (".json", ".jsonl", ".txt")}:
            p.error(f"--output {output} is one of the samples' own files: name another file")
        if output.is_dir():
            p.error(f"--output {output} is a directory: name a JSON file")
    judge = None
    if args.judge:
        judge = HFJudge(args.judge, device) if is_hf_directory(args.judge) else None
        if judge is None:
            from .inference import load_checkpoint_model

            loaded = load_checkpoint_model(args.judge, use_ema=not args.no_ema, device=device)
            judge = ProjectJudge(loaded.model, str(loaded.path), tokenizer_sha(loaded.config))
    result = {"samples": str(args.samples), "num_samples": tokens.shape[0], "length": tokens.shape[1],
              **evaluate_samples(tokens, judge, texts, args.batch_size,
                                 scored=scored_mask(tokens, stats.get("generated_positions")), pieces=sample_pieces(rows))}
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, output)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
