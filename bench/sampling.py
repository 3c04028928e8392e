"""Sampling speed/quality frontier: MDLM (cached ancestral) across T against KV-cached AR decoding.

    python bench/sampling.py --mdlm MDLM_CKPT --ar AR_CKPT [--device cuda]
        [--steps 8,16,32,64,128,256,1024] [--num-samples N] [--length L]
        [--samplers cached[,confidence,ancestral,semi-ar]] [--output-dir DIR] [--mlflow-uri URI]

One run samples N sequences of L tokens per T with each MDLM sampler and once with the AR model
(KV cache, and without it unless --no-ar-uncached), and measures for each: gen-PPL under the judge
(default: the AR checkpoint itself; --judge takes another AR checkpoint or a Hugging Face directory),
unigram entropy, network calls (batched passes, rows evaluated, calls per sample) and wall-clock
(best of --repeats, after a warm-up). The real validation text of the same length scored by the
same judge is the reference row. Prints the frontier table with the T range where MDLM is faster
than AR decoding at the same length, writes DIR/sampling.json and DIR/sampling.png, and logs both to
MLflow when --mlflow-uri is given. Defaults suit a CPU and a tiny model (1 thread: shared cores).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from model.sampling import SAMPLERS, generate


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"every T must be an integer >= 1, got '{text}'")
    return sorted(set(values))


def _samplers(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in SAMPLERS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {bad or text!r}: choose from {', '.join(SAMPLERS)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/sampling.py", description=__doc__.splitlines()[0])
    p.add_argument("--mdlm", required=True, help="MDLM checkpoint (run dir, checkpoints dir or step dir)")
    p.add_argument("--ar", required=True, help="AR checkpoint: the baseline, and the default judge")
    p.add_argument("--judge", default="", help="judge for gen-PPL (default: --ar)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=_int_list, default=_int_list("8,16,32,64,128,256,1024"))
    p.add_argument("--samplers", type=_samplers, default=["cached"])
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--length", type=int, default=0, help="tokens per sample (default: the MDLM's seq_len)")
    p.add_argument("--block-size", type=int, default=0, help="semi-ar block size (default: length // 2)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per point; the fastest counts")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch default)")
    p.add_argument("--no-ar-uncached", action="store_true", help="skip AR decoding without the KV cache")
    p.add_argument("--no-reference", action="store_true", help="skip scoring real validation text")
    p.add_argument("--output-dir", default="bench_out/sampling")
    p.add_argument("--mlflow-uri", default="")
    p.add_argument("--experiment", default="sampling-bench")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.length < 0 or args.repeats < 1 or args.threads < 0:
        p.error("--num-samples and --repeats must be >= 1, --length and --threads >= 0")
    if not 0.0 < args.top_p <= 1.0:
        p.error(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.block_size == 1 or args.block_size < 0:
        p.error(f"--block-size must be >= 2 (got {args.block_size})")
    return args


def _timed(fn, repeats: int, device: str):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best, out = math.inf, None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return out, best


def _reference_tokens(config: dict, num: int, length: int) -> torch.Tensor | None:
    """The first `num` validation samples of the run's data, cropped to `length` (None if short)."""
    from pipeline.data import ShardStream

    rows = []
    for sample in ShardStream(config["data"]["path"], config["data"].get("eval_split", "val"),
                              shuffle=False, loop=False):
        if len(sample["tokens"]) >= length:
            rows.append(torch.as_tensor(sample["tokens"][:length].astype("int64")))
        if len(rows) == num:
            break
    return torch.stack(rows) if rows else None


def frontier(rows: list[dict], ar_wall: float | None, ar_ppl: float | None) -> dict:
    """Where MDLM beats KV-cached AR decoding: in wall-clock, and in gen-PPL."""
    out = {}
    for sampler in sorted({r["sampler"] for r in rows if r["model"] == "mdlm"}):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["steps"])
        faster = [r["steps"] for r in mine if ar_wall is not None and r["wall_s"] < ar_wall]
        better = [r["steps"] for r in mine if ar_ppl is not None and r["gen_ppl"] <= ar_ppl]
        out[sampler] = {
            "faster_than_ar_at_T": faster,
            "smallest_T_faster": min(faster) if faster else None,
            "largest_T_faster": max(faster) if faster else None,
            "smallest_T_gen_ppl_at_most_ar": min(better) if better else None,
            "faster_and_at_most_ar_gen_ppl_at_T": sorted(set(faster) & set(better)),
        }
    return out


def format_table(rows: list[dict], summary: dict, length: int, num: int) -> str:
    head = (f"{'model':<6} {'sampler':<11} {'T':>6} {'passes':>7} {'rows':>7} {'calls/seq':>9} "
            f"{'wall s':>9} {'tok/s':>9} {'gen-PPL':>9} {'entropy':>8}")
    lines = [f"Sampling frontier: {num} samples x {length} tokens (gen-PPL judge: {summary['judge']})", head,
             "-" * len(head)]
    for r in rows:
        t = str(r["steps"]) if r["steps"] else "-"
        calls = f"{r['rows_evaluated'] / num:.1f}" if r.get("rows_evaluated") is not None else "-"
        wall = f"{r['wall_s']:.3f}" if r.get("wall_s") is not None else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") is not None else "-"
        passes = str(r["network_calls"]) if r.get("network_calls") is not None else "-"
        rows_ev = str(r["rows_evaluated"]) if r.get("rows_evaluated") is not None else "-"
        lines.append(f"{r['model']:<6} {r['sampler']:<11} {t:>6} {passes:>7} {rows_ev:>7} {calls:>9} "
                     f"{wall:>9} {tps:>9} {r['gen_ppl']:>9.2f} {r['entropy']:>8.3f}")
    for sampler, f in summary["frontier"].items():
        if f["smallest_T_faster"] is None:
            lines.append(f"MDLM ({sampler}) is slower than KV-cached AR decoding at every T measured")
        else:
            lines.append(f"MDLM ({sampler}) beats KV-cached AR decoding in wall-clock at T = "
                         f"{', '.join(map(str, f['faster_than_ar_at_T']))} (smallest T {f['smallest_T_faster']}, "
                         f"largest {f['largest_T_faster']})")
        q = f["smallest_T_gen_ppl_at_most_ar"]
        lines.append(f"MDLM ({sampler}) gen-PPL <= AR's from T = {q}" if q is not None else
                     f"MDLM ({sampler}) gen-PPL stays above AR's at every T measured")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for sampler in sorted({r["sampler"] for r in rows if r["model"] == "mdlm"}):
        mine = sorted((r for r in rows if r["model"] == "mdlm" and r["sampler"] == sampler), key=lambda r: r["steps"])
        left.plot([r["wall_s"] for r in mine], [r["gen_ppl"] for r in mine], "o-", label=f"MDLM {sampler}")
        for r in mine:
            left.annotate(f"T={r['steps']}", (r["wall_s"], r["gen_ppl"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
        right.plot([r["steps"] for r in mine], [r["wall_s"] for r in mine], "o-", label=f"MDLM {sampler} wall s")
        right.plot([r["steps"] for r in mine], [r["rows_evaluated"] / r["num_samples"] for r in mine], "s--",
                   label=f"MDLM {sampler} calls/sample")
    for r in rows:
        if r["model"] == "ar":
            left.scatter([r["wall_s"]], [r["gen_ppl"]], marker="*", s=140, label=f"AR {r['sampler']}", zorder=3)
            right.axhline(r["wall_s"], linestyle=":", color="gray" if r["sampler"] == "ar" else "black",
                          label=f"AR {r['sampler']} wall s")
        elif r["model"] == "data":
            left.axhline(r["gen_ppl"], linestyle="--", color="green", label="validation text")
    left.set(xscale="log", xlabel="wall-clock (s, log)", ylabel="gen-PPL (judge)", title=title)
    right.set(xscale="log", yscale="log", xlabel="steps T", ylabel="seconds / calls per sample",
              title="cost against T")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_mlflow(uri: str, experiment: str, args: argparse.Namespace, result: dict, files: list[Path]) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="sampling-frontier") as run:
        mlflow.log_params({"mdlm": args.mdlm, "ar": args.ar, "judge": result["judge"], "device": args.device,
                           "num_samples": result["num_samples"], "length": result["length"],
                           "steps": ",".join(map(str, args.steps)), "samplers": ",".join(args.samplers),
                           "top_p": args.top_p, "seed": args.seed})
        for r in result["rows"]:
            key = f"{r['model']}_{r['sampler']}".replace("-", "_")
            metrics = {f"{key}/{m}": r[m] for m in ("gen_ppl", "entropy", "wall_s", "tokens_per_s",
                                                    "network_calls", "rows_evaluated")
                       if r.get(m) is not None}
            mlflow.log_metrics(metrics, step=int(r["steps"] or 0))
        for f in files:
            mlflow.log_artifact(str(f))
        return run.info.run_id


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from model.mdlm import MDLM, AutoregressiveLM
    from pipeline.data import load_manifest
    from pipeline.genppl import (
        ProjectJudge,
        evaluate_samples,
        load_judge,
        tokenizer_sha,
    )
    from pipeline.inference import load_checkpoint_model

    mdlm = load_checkpoint_model(args.mdlm, device=args.device)
    ar = load_checkpoint_model(args.ar, device=args.device)
    if not isinstance(mdlm.model, MDLM):
        raise SystemExit(f"error: --mdlm {args.mdlm} is not an MDLM checkpoint")
    if not isinstance(ar.model, AutoregressiveLM):
        raise SystemExit(f"error: --ar {args.ar} is not an AR checkpoint (model.objective=ar)")
    sha_m, sha_a = tokenizer_sha(mdlm.config), tokenizer_sha(ar.config)
    if sha_m and sha_a and sha_m != sha_a:
        raise SystemExit("error: the MDLM and AR checkpoints use different tokenizers: compare models "
                         "trained on the same data")
    judge = load_judge(args.judge, args.device) if args.judge else ProjectJudge(ar.model, str(ar.path), sha_a)
    if isinstance(judge, ProjectJudge) and sha_m and judge.tokenizer_sha and judge.tokenizer_sha != sha_m:
        raise SystemExit("error: the judge uses another tokenizer than the MDLM: pass a judge trained on the same data")
    manifest = load_manifest(mdlm.config["data"]["path"])
    length = args.length or int(manifest["seq_len"])
    if length < 2:
        raise SystemExit("error: --length must be >= 2 (gen-PPL scores tokens 1..L-1)")
    bos = int(manifest["tokenizer"]["bos_id"])
    num = args.num_samples
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(mdlm.config["data"]["path"]) / "tokenizer" / "tokenizer.json"))
    needs_text = not isinstance(judge, ProjectJudge)

    def score(tokens):
        texts = [tok.decode(r.tolist(), skip_special_tokens=True) for r in tokens] if needs_text else None
        return evaluate_samples(tokens.cpu(), judge, texts)

    # warm-up (allocator, kernels, lazy init) outside the timings, at the timed shapes: the KV-cached
    # AR run is every verdict's reference, so it must not be the first full-length decode
    generate(mdlm.model, num, length, sampler="cached", steps=2, generator=torch.Generator().manual_seed(0),
             device=args.device)
    generate(ar.model, num, length, bos_id=bos, generator=torch.Generator().manual_seed(0), device=args.device)

    rows: list[dict] = []

    def record(model_name, sampler, steps, result, wall):
        row = {"model": model_name, "sampler": sampler, "steps": steps, "num_samples": num, "length": length,
               **result.stats(), "wall_s": wall, "tokens_per_s": num * length / wall, **score(result.tokens)}
        rows.append(row)
        print(f"  {model_name:<5} {sampler:<11} T={steps or '-':<5} wall {wall:8.3f}s  passes {row['network_calls']:>5}"
              f"  gen-PPL {row['gen_ppl']:9.2f}  entropy {row['entropy']:.3f}", flush=True)

    block = args.block_size or max(2, length // 2)
    for sampler in args.samplers:
        for steps in args.steps:
            def run(sampler=sampler, steps=steps):
                return generate(mdlm.model, num, length, sampler=sampler, steps=steps, top_p=args.top_p,
                                block_size=block if sampler == "semi-ar" else None,
                                generator=torch.Generator().manual_seed(args.seed), device=args.device)
            result, wall = _timed(run, args.repeats, args.device)
            record("mdlm", sampler, steps, result, wall)
    ar_kinds = [("ar-kv", "cached")] + ([] if args.no_ar_uncached else [("ar", "ancestral")])
    for name, mode in ar_kinds:
        def run_ar(mode=mode):
            return generate(ar.model, num, length, sampler=mode, bos_id=bos, top_p=args.top_p,
                            generator=torch.Generator().manual_seed(args.seed), device=args.device,
                            banned_ids=(int(manifest["mask_token_id"]),))  # as pipeline/sample.py
        result, wall = _timed(run_ar, args.repeats, args.device)
        record("ar", name, 0, result, wall)
    if not args.no_reference:
        ref = _reference_tokens(mdlm.config, num, length)
        if ref is not None:
            rows.append({"model": "data", "sampler": "val-text", "steps": 0, "num_samples": len(ref),
                         "length": length, "network_calls": None, "rows_evaluated": None, "wall_s": None,
                         "tokens_per_s": None, **score(ref)})
    ar_kv = next(r for r in rows if r["sampler"] == "ar-kv")
    summary = {"judge": judge.name, "frontier": frontier([r for r in rows if r["model"] != "data"],
                                                         ar_kv["wall_s"], ar_kv["gen_ppl"])}
    table = format_table(rows, summary, length, num)
    print(table)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"mdlm": str(mdlm.path), "ar": str(ar.path), "weights": {"mdlm": mdlm.weights, "ar": ar.weights},
              "device": args.device, "threads": torch.get_num_threads(), "num_samples": num, "length": length,
              "top_p": args.top_p, "seed": args.seed, "repeats": args.repeats, "rows": rows, **summary,
              "table": table}
    json_path, png_path = out_dir / "sampling.json", out_dir / "sampling.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, png_path, f"{num} x {length} tokens on {args.device}")
    print(f"wrote {json_path} and {png_path}")
    if args.mlflow_uri:
        result["mlflow_run_id"] = log_mlflow(args.mlflow_uri, args.experiment, args, result, [json_path, png_path])
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"logged to MLflow run {result['mlflow_run_id']} at {args.mlflow_uri}")
    return result


if __name__ == "__main__":
    main()
