"""The sample CLI, gen-PPL and the sampling bench on tiny checkpoints trained by the real trainer
(one bare process each, shared by every test of this module)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.synthetic import write_markov_shards

from .conftest import ROOT, run_single

STEPS = 20


@pytest.fixture(scope="module")
def ckpts(markov_data, tmp_path_factory) -> dict:
    """An AR run, then an MDLM run judged by it at its end, evaluated on its own val split twice
    (once as the extra corpus "same") and on another corpus with only a train split."""
    base = tmp_path_factory.mktemp("sample-ckpts")
    other = base / "other-data"
    write_markov_shards(other, vocab=16, seq_len=32, seed=7, train_samples=64, val_samples=0)
    out = {"other_data": other}
    for objective in ("ar", "mdlm"):
        run_dir = base / objective
        extra = (f"sample.judge={out['ar']}", f"eval.corpora.same={markov_data}",
                 f"eval.corpora.other={other}") if objective == "mdlm" else ()
        run_single(run_dir, markov_data, f"train.max_steps={STEPS}", "tracking.enabled=false",
                   f"model.objective={objective}", *extra, env_extra={"OMP_NUM_THREADS": "1"})
        out[objective] = run_dir
    return out


def test_training_ends_with_extra_corpora_and_judged_samples(ckpts):
    summary = json.loads((ckpts["mdlm"] / "final_eval.json").read_text())
    main, corpora = summary["eval"], summary["eval"]["corpora"]
    assert sorted(corpora) == ["other", "same"]
    assert (corpora["same"]["split"], corpora["other"]["split"]) == ("val", "train")
    assert corpora["same"]["nelbo"] == main["nelbo"] and corpora["same"]["tokens"] == main["tokens"]
    assert corpora["other"]["nelbo"] != main["nelbo"] and corpora["other"]["sequences"] == main["sequences"] == 16
    stats = summary["sample_stats"]
    assert stats["judge_kind"] == "project" and 1.0 < stats["gen_ppl"] < 17 * 3 and stats["entropy"] > 0
    last = [json.loads(line) for line in (ckpts["mdlm"] / "metrics.jsonl").read_text().splitlines()]
    logged = {k: v for row in last if row["step"] == STEPS for k, v in row.items()}
    assert logged["eval/same/nelbo"] == main["nelbo"] and logged["eval/other/ppl_bound"] == corpora["other"]["ppl_bound"]
    assert logged["sample/gen_ppl"] == stats["gen_ppl"] and logged["sample/entropy"] == stats["entropy"]


def test_a_judge_that_cannot_judge_stops_training_before_it_starts(ckpts, markov_data, tmp_path):
    proc = run_single(tmp_path / "run", markov_data, "train.max_steps=2", "tracking.enabled=false",
                      f"sample.judge={ckpts['mdlm']}", check=False)
    assert proc.returncode == 2
    assert f"sample.judge={ckpts['mdlm']}: " in proc.stderr and "the judge must be autoregressive" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sample(ckpt: Path, tmp_path: Path, name: str, *args: str) -> tuple[dict, list[str]]:
    from pipeline.sample import main

    prefix = tmp_path / name
    assert main(["--checkpoint", str(ckpt), "--output", str(prefix), "--threads", "1", *args]) == 0
    stats = json.loads(prefix.with_suffix(".json").read_text())
    texts = prefix.with_suffix(".txt").read_text().strip().split("\n\n=====\n\n")
    return stats, texts


def words(text: str) -> list[str]:
    return text.split()


@pytest.mark.parametrize("sampler", ["ancestral", "cached", "confidence"])
def test_each_sampler_writes_texts_and_costs(ckpts, tmp_path, sampler):
    stats, texts = sample(ckpts["mdlm"], tmp_path, sampler, "--sampler", sampler, "--steps", "64",
                          "--num-samples", "3", "--length", "16", "--seed", "1", "--temperature", "0.9")
    assert stats["weights"] == "ema" and stats["sampler"] == sampler and stats["temperature"] == 0.9
    assert (stats["num_samples"], stats["length"]) == (3, 16)
    assert len(texts) == 3 and all(len(words(t)) == 16 for t in texts)
    assert stats["wall_s"] > 0 and stats["tokens_per_s"] == pytest.approx(3 * 16 / stats["wall_s"])
    assert stats["network_calls"] >= 1 and stats["rows_evaluated"] >= stats["network_calls"]
    if sampler == "ancestral":
        assert stats["network_calls"] == 64 and 64 < stats["rows_evaluated"] <= 3 * 64  # finished rows stop
    else:
        assert stats["max_calls_per_sample"] <= min(64, 16) + 1
    assert 0 < stats["entropy"] <= stats["entropy_pooled"] + 1e-9


def test_cached_and_uncached_cli_give_the_same_texts(ckpts, tmp_path):
    args = ("--steps", "40", "--num-samples", "2", "--length", "24", "--seed", "5")
    cached, a = sample(ckpts["mdlm"], tmp_path, "c", *args)
    plain, b = sample(ckpts["mdlm"], tmp_path, "p", *args, "--no-cache")
    assert a == b and plain["sampler"] == "ancestral"
    assert cached["rows_evaluated"] < plain["rows_evaluated"]


def test_prompt_and_suffix_are_kept_and_semi_ar_goes_past_the_context(ckpts, tmp_path):
    stats, texts = sample(ckpts["mdlm"], tmp_path, "prompted", "--steps", "8", "--num-samples", "2",
                          "--length", "20", "--prompt", "t3 t5 [MASK] t7", "--suffix", "t1 t2")
    assert stats["prompt_tokens"] == 4 and stats["suffix_tokens"] == 2
    for t in texts:
        w = words(t)
        assert len(w) == 20 and w[:5:2] == ["t0", "t5", "t7"] and w[1] == "t3" and w[-2:] == ["t1", "t2"]
        assert "[MASK]" not in t
    # seq_len is 32: 80 tokens in blocks of 32 carrying 16
    stats, texts = sample(ckpts["mdlm"], tmp_path, "semi", "--sampler", "semi-ar", "--steps", "8",
                          "--num-samples", "2", "--length", "80", "--block-size", "32", "--prompt", "t9 t9")
    assert stats["blocks"] == 4 and stats["block_size"] == 32 and stats["carry"] == 16
    assert all(len(words(t)) == 80 and words(t)[:3] == ["t0", "t9", "t9"] for t in texts)


def test_the_judge_scores_only_what_was_generated_given_what_precedes_it(ckpts, tmp_path):
    import math

    from model.likelihood import ar_nll
    from pipeline.genppl import load_judge

    stats, _ = sample(ckpts["mdlm"], tmp_path, "infill", "--steps", "8", "--num-samples", "3", "--length", "20",
                      "--prompt", "t3 t5 [MASK] t7", "--suffix", "t1 t2", "--judge", str(ckpts["ar"]))
    generated = [3, *range(5, 18)]  # BOS t3 t5 [MASK] t7 ... t1 t2: the infilled slot and the middle
    assert stats["generated_positions"] == generated and stats["judge_tokens"] == 3 * len(generated)
    rows = [json.loads(line) for line in (tmp_path / "infill.jsonl").read_text().splitlines()]
    tokens = torch.tensor([r["tokens"] for r in rows])
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    valid[:, generated] = True
    judge = load_judge(ckpts["ar"])
    want = math.exp(float(ar_nll(judge.model, tokens, valid).sum()) / (3 * len(generated)))
    assert stats["gen_ppl"] == pytest.approx(want, rel=1e-6)
    for r in rows:  # the pieces a judge with its own tokenizer scores: the middle given the start
        assert words(r["context_text"]) == ["t0", "t3", "t5"]
        assert words(r["generated_text"]) == [f"t{i}" for i in r["tokens"][3:18]]
    full, _ = sample(ckpts["mdlm"], tmp_path, "full", "--steps", "2", "--num-samples", "2", "--length", "5",
                     "--prompt", "t3 t5", "--suffix", "t1 t2", "--judge", str(ckpts["ar"]))
    assert full["generated_positions"] == [] and "gen_ppl" not in full  # nothing generated: nothing judged


def test_ar_checkpoint_decodes_with_the_kv_cache(ckpts, tmp_path):
    args = ("--num-samples", "2", "--length", "20", "--seed", "3", "--prompt", "t4 t4")
    kv, a = sample(ckpts["ar"], tmp_path, "kv", *args)
    plain, b = sample(ckpts["ar"], tmp_path, "plain", *args, "--sampler", "ancestral")
    assert a == b and kv["sampler"] == "ar-kv" and plain["sampler"] == "ar"
    assert kv["network_calls"] == plain["network_calls"] == 20 - 3
    assert all(words(t)[:3] == ["t0", "t4", "t4"] and len(words(t)) == 20 for t in a)


def test_gen_ppl_under_the_ar_judge(ckpts, tmp_path):
    stats, _ = sample(ckpts["mdlm"], tmp_path, "judged", "--steps", "16", "--num-samples", "4", "--length", "16",
                      "--judge", str(ckpts["ar"]))
    assert 1.0 < stats["gen_ppl"] < 17 * 3 and stats["judge_tokens"] == 4 * 15
    assert stats["judge_kind"] == "project" and "token 0 is context" in stats["judge_convention"]


def test_gen_ppl_matches_the_ar_nll_and_entropy_is_exact(ckpts):
    import math

    from model.likelihood import ar_nll
    from pipeline.genppl import gen_ppl, load_judge, unigram_entropy

    judge = load_judge(ckpts["ar"])
    x = torch.randint(0, 16, (5, 12), generator=torch.Generator().manual_seed(0))
    out = gen_ppl(judge, x, batch_size=2)
    assert out["gen_ppl"] == pytest.approx(math.exp(float(ar_nll(judge.model, x).sum()) / (5 * 11)))
    ent = unigram_entropy(torch.tensor([[1, 1, 2, 2], [3, 3, 3, 3]]))
    assert ent["entropy"] == pytest.approx(math.log(2) / 2)
    assert ent["entropy_pooled"] == pytest.approx(-(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5)))
    with pytest.raises(ValueError, match="outside the judge's vocabulary"):
        gen_ppl(judge, torch.full((1, 4), 99))


def test_a_hugging_face_judge_needs_transformers(tmp_path):
    from pipeline.genppl import HFJudge, is_hf_directory, load_judge

    (tmp_path / "config.json").write_text("{}")
    assert is_hf_directory(tmp_path)
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="`transformers` is not installed"):
            load_judge(tmp_path)
    else:
        pytest.skip("transformers is installed: the HF judge needs a real model directory (not tested here)")
    assert HFJudge.kind == "huggingface"


def test_a_hugging_face_judge_scores_the_generated_piece_given_its_context():
    """HFJudge's bookkeeping with a stand-in tokenizer and a uniform causal LM (a narrow unit test:
    no transformers model here): every scored token costs log V, so counts show what is scored."""
    import math
    from types import SimpleNamespace

    from pipeline.genppl import HFJudge, gen_ppl

    vocab = 7

    def tokenizer(text, add_special_tokens=True):
        ids = [int(w[1:]) for w in text.split()]
        return SimpleNamespace(input_ids=([6] if add_special_tokens else []) + ids)  # 6: a BOS it adds

    judge = object.__new__(HFJudge)
    judge.name, judge.device, judge.tokenizer = "stand-in", "cpu", tokenizer
    judge.model = lambda ids: SimpleNamespace(logits=torch.zeros(*ids.shape, vocab))
    judge.model.config = SimpleNamespace(max_position_embeddings=None)
    tokens = torch.zeros(2, 6, dtype=torch.long)
    whole = gen_ppl(judge, tokens, ["t1 t2 t3", "t4 t5"])
    assert whole["judge_tokens"] == 3 + 2 and whole["gen_ppl"] == pytest.approx(vocab)  # BOS + text, BOS is context
    scored = torch.zeros(2, 6, dtype=torch.bool)
    scored[:, 3:5] = True
    pieces = [("t1 t2", "t3 t4"), ("", "t5 t1 t2")]
    part = gen_ppl(judge, tokens, None, scored=scored, pieces=pieces)
    # the first: BOS t1 t2 are context, t3 t4 scored; the second has no context: its first token is
    assert part["judge_tokens"] == 2 + 2 and part["gen_nll"] == pytest.approx(math.log(vocab))
    with pytest.raises(ValueError, match="lack: sample them again"):
        gen_ppl(judge, tokens, ["t1"], scored=scored)


def cli(*args: str) -> subprocess.CompletedProcess:
    return cli_module("pipeline.sample", *args)


def test_bad_arguments_fail_before_any_work(ckpts, tmp_path, monkeypatch, capsys):
    import model.sampling
    from pipeline import inference
    from pipeline.sample import PRECISIONS, SAMPLERS, main

    assert SAMPLERS == model.sampling.SAMPLERS and PRECISIONS == inference.PRECISIONS
    missing = str(tmp_path / "nowhere")
    for args, message in ((["--steps", "0"], "--steps must be >= 1"),
                          (["--sampler", "turbo"], "invalid choice: 'turbo'")):
        proc = cli("--checkpoint", missing, *args)  # checked before the checkpoint is even looked at
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(inference, "load_checkpoint_model", no_loading)
    cases = ((missing, ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
             (missing, ["--temperature", "0"], "--temperature must be > 0"),
             (missing, ["--sampler", "semi-ar", "--block-size", "8", "--carry", "8"], "--carry must be smaller"),
             (missing, ["--block-size", "8"], "only apply to --sampler semi-ar"),
             (missing, [], "no complete checkpoint"),
             # a prompt longer than the length is caught from the tokenizer, before the weights load
             (ckpts["mdlm"], ["--length", "4", "--prompt", "t1 t2 t3 t4"],
              "the prompt has 4 tokens (+1 BOS) but the sample length is 4"),
             (ckpts["ar"], ["--length", "3", "--prompt", "t1 t2 t3"], "but the sample length is 3"),
             (ckpts["ar"], ["--sampler", "confidence"], "--sampler confidence needs an MDLM checkpoint"),
             (ckpts["ar"], ["--suffix", "t1"], "--suffix and [MASK] infilling need an MDLM"),
             # a judge must exist and be autoregressive, checked before sampling
             (ckpts["mdlm"], ["--judge", missing], "no complete checkpoint"),
             (ckpts["mdlm"], ["--judge", str(ckpts["mdlm"])], "the judge must be autoregressive"),
             (ckpts["mdlm"], ["--device", "gpu"], "--device 'gpu' is not a device"),
             (ckpts["mdlm"], ["--device", "cpu", "--precision", "tf32"], "--precision tf32 needs a CUDA GPU"),
             (ckpts["mdlm"], ["--tokenizer", missing], "tokenizer file"))
    if not torch.cuda.is_available():
        cases += ((ckpts["mdlm"], ["--device", "cuda"], "no usable CUDA GPU"),)
    for ckpt, args, message in cases:
        with pytest.raises(SystemExit) as info:
            main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "x"), *args])
        assert info.value.code == 2
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "x.json").exists()


def test_bench_runs_end_to_end_and_prints_the_frontier(ckpts, tmp_path, capsys, in_process_mlflow, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # mlflow's default artifact root is ./mlruns

    from bench.sampling import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = main(["--mdlm", str(ckpts["mdlm"]), "--ar", str(ckpts["ar"]), "--steps", "1,4,64",
                   "--num-samples", "3", "--length", "16", "--samplers", "cached,confidence",
                   "--output-dir", str(tmp_path / "out"), "--mlflow-uri", uri])
    out = capsys.readouterr().out
    assert "Sampling frontier: 3 samples x 16 tokens" in out
    assert "beats KV-cached AR decoding" in out or "slower than KV-cached AR decoding at every T" in out
    rows = result["rows"]
    mdlm = [r for r in rows if r["model"] == "mdlm"]
    assert sorted({(r["sampler"], r["steps"]) for r in mdlm}) == sorted(
        (s, t) for s in ("cached", "confidence") for t in (1, 4, 64))
    assert {r["sampler"] for r in rows if r["model"] == "ar"} == {"ar-kv", "ar"}
    assert any(r["model"] == "data" for r in rows)
    for r in rows:
        assert r["gen_ppl"] > 1.0 and r["entropy"] > 0
    for r in mdlm:
        assert r["rows_evaluated"] <= 3 * (min(r["steps"], 16) + 1)
    assert set(result["frontier"]) == {"cached", "confidence"}
    saved = json.loads((tmp_path / "out" / "sampling.json").read_text())
    assert saved["table"] == result["table"] and (tmp_path / "out" / "sampling.png").stat().st_size > 1000
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["mlflow_run_id"])
    assert "mdlm_cached/gen_ppl" in run.data.metrics and run.data.params["length"] == "16"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"sampling.json", "sampling.png"}


def test_bench_rejects_bad_flags(ckpts, capsys):
    from bench.sampling import main

    for args, message in ((["--steps", "0,4"], "every T must be an integer >= 1"),
                          (["--samplers", "cached,warp"], "unknown sampler"),
                          (["--num-samples", "0"], "--num-samples")):
        with pytest.raises(SystemExit) as info:
            main(["--mdlm", str(ckpts["mdlm"]), "--ar", str(ckpts["ar"]), *args])
        assert info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="is not an AR checkpoint"):
        main(["--mdlm", str(ckpts["mdlm"]), "--ar", str(ckpts["mdlm"]), "--steps", "2"])
    proc = subprocess.run([sys.executable, "bench/sampling.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--mlflow-uri" in proc.stdout


def test_raw_weights_load_past_transformer_engine_extra_state(ckpts, tmp_path):
    """fp8.backend=te saves each TE linear's FP8 scaling state as '<name>._extra_state' next to
    its weights; loading the raw weights into the plain model skips it."""
    import shutil

    from pipeline.inference import load_checkpoint_model

    src = ckpts["mdlm"] / "checkpoints" / f"step{STEPS:08d}"
    dst = tmp_path / "checkpoints" / src.name
    shutil.copytree(src, dst)
    states = dst / "mp_rank_00_model_states.pt"
    state = torch.load(states, map_location="cpu", weights_only=False)
    state["module"]["backbone.blocks.0.attn_qkv._extra_state"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, states)
    complete = json.loads((dst / "COMPLETE").read_text())  # rewritten, as a TE run writes it: a new size
    complete["files"][states.name] = states.stat().st_size
    (dst / "COMPLETE").write_text(json.dumps(complete))
    loaded = load_checkpoint_model(dst, use_ema=False)
    plain = load_checkpoint_model(src, use_ema=False)
    assert loaded.weights == "raw"
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), plain.model.state_dict().values()))


def test_final_evaluation_states_which_tokens_it_counts(ckpts):
    """An AR model predicts positions 1..L-1 and MDLM every position: the summary says which, so
    bounds of the two are compared knowing their denominators."""
    counted = {o: json.loads((ckpts[o] / "final_eval.json").read_text())["conventions"]["tokens_counted"]
               for o in ("mdlm", "ar")}
    assert counted["mdlm"].startswith("every position (")
    assert counted["ar"].startswith("every position after the first")


def test_output_prefixes_and_a_damaged_newest_checkpoint(ckpts, tmp_path, capsys):
    import shutil

    from pipeline.checkpoint import complete_tags
    from pipeline.inference import resolve_checkpoint
    from pipeline.sample import main

    for output, written in ((f"{tmp_path}/folder/", tmp_path / "folder" / "samples.txt"),
                            (str(tmp_path / "run.v1.2"), tmp_path / "run.v1.2.txt")):
        assert main(["--checkpoint", str(ckpts["mdlm"]), "--output", output, "--threads", "1", "--steps", "4",
                     "--num-samples", "1", "--length", "8"]) == 0
        assert written.is_file() and written.with_name(written.name[:-4] + ".json").is_file()
    # a cut model file in the newest checkpoint: sampling and evaluation use the previous one
    root = tmp_path / "copy" / "checkpoints"
    shutil.copytree(ckpts["mdlm"] / "checkpoints", root)
    older, newest = complete_tags(root)[-2:]
    model_file = root / newest / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    assert resolve_checkpoint(root) == root / older
    assert f"checkpoint {root / newest} is damaged (mp_rank_00_model_states.pt)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is damaged"):
        resolve_checkpoint(root / newest)


def test_infilling_leaves_the_space_before_a_mask_to_the_token_that_fills_it():
    """Byte-level BPE writes a word with its leading space (\u0120the): "We [MASK] the" must give
    We, [MASK], \u0120the, not We, \u0120, [MASK], \u0120the (a lone space the model must keep)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from pipeline.sample import _encode, output_prefix, suffix_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["We the Congress of the United States"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    mask = 9999
    ids = _encode(tok, "We [MASK] [MASK] the Congress", mask)
    assert ids == tok.encode("We").ids + [mask, mask] + tok.encode(" the Congress").ids
    assert " " not in [tok.decode([i]) for i in ids if i != mask]
    assert [suffix_text(x) for x in ("the Union.", ".", ", and", " so", "[MASK] end")] == [
        " the Union.", ".", ", and", " so", "[MASK] end"]
    assert [str(output_prefix(x)) for x in ("gen.txt", "gen.json", "run.v1.2")] == ["gen", "gen", "run.v1.2"]


def test_export_writes_safetensors_that_rebuild_the_model(ckpts, tmp_path):
    from pipeline.export import load_exported
    from pipeline.inference import load_checkpoint_model

    out = tmp_path / "export"
    proc = cli_module("pipeline.export", "--checkpoint", str(ckpts["mdlm"]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["weights"] == "ema" and config["source"]["step"] == STEPS
    assert config["tokens"]["mask_token_id"] == 16 and config["seq_len"] == 32
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for path in (out, out / "model.safetensors", out / "config.json"):  # readable by others on shared storage
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
    exported = load_exported(out)
    reference = load_checkpoint_model(ckpts["mdlm"]).model
    x = torch.randint(0, 16, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported.logits(x), reference.logits(x))
    again = cli_module("pipeline.export", "--checkpoint", str(ckpts["mdlm"]), "--out", str(out))
    assert again.returncode == 2 and "is not empty" in again.stderr
    half = tmp_path / "bf16"
    assert cli_module("pipeline.export", "--checkpoint", str(ckpts["mdlm"]), "--out", str(half), "--dtype", "bf16",
                      "--no-ema").returncode == 0
    assert next(load_exported(half).parameters()).dtype == torch.bfloat16
    assert json.loads((half / "config.json").read_text())["source"]["weights"] == "raw"
    assert (half / "model.safetensors").stat().st_size < 0.6 * (out / "model.safetensors").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "export"]  # no staging folder left behind


def cli_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)



def test_stop_at_eos_and_genppl_scores_saved_samples_again(ckpts, tmp_path, capsys):
    from pipeline.genppl import main as genppl

    # the markov tokenizer's EOS is t0 (also its BOS)
    stats, texts = sample(ckpts["mdlm"], tmp_path, "cut", "--steps", "16", "--num-samples", "4", "--length", "32",
                          "--prompt", "t3", "--stop-at-eos", "--judge", str(ckpts["ar"]))
    rows = [json.loads(line) for line in (tmp_path / "cut.jsonl").read_text().splitlines()]
    assert stats["stop_at_eos"] and stats["tokenizer"]["eos_id"] == 0 and len(rows) == 4
    # BOS + prompt are given, not generated: the judge scores the 30 tokens after them
    assert stats["generated_positions"] == list(range(2, 32)) and stats["judge_tokens"] == 4 * 30
    cut_somewhere = False
    for text, row in zip(texts, rows):
        assert len(row["tokens"]) == 32 and words(row["text"]) == [f"t{i}" for i in row["tokens"]]
        after_prompt = row["tokens"][2:]
        end = 2 + after_prompt.index(0) if 0 in after_prompt else 32
        assert words(text) == [f"t{i}" for i in row["tokens"][:end]]
        cut_somewhere |= end < 32
    assert cut_somewhere  # t0 is common in the chain: the test would not notice a missing cut otherwise
    capsys.readouterr()
    out = tmp_path / "scores" / "judged.json"
    assert genppl([str(tmp_path / "cut.json"), "--judge", str(ckpts["ar"]), "--device", "cpu",
                   "--output", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == json.loads(out.read_text())
    assert again["gen_ppl"] == pytest.approx(stats["gen_ppl"], rel=1e-6)  # whole samples, as when sampling
    assert (again["judge_tokens"], again["entropy"]) == (stats["judge_tokens"], stats["entropy"])
    assert genppl([str(tmp_path / "cut")]) == 0 and "gen_ppl" not in json.loads(capsys.readouterr().out)


def test_genppl_refuses_bad_samples_and_outputs(ckpts, tmp_path, capsys):
    from pipeline.genppl import main as genppl

    sample(ckpts["mdlm"], tmp_path, "s", "--steps", "4", "--num-samples", "2", "--length", "8")
    capsys.readouterr()
    before = (tmp_path / "s.json").read_text()
    (tmp_path / "old.json").write_text(before)
    (tmp_path / "bad.json").write_text(before)
    (tmp_path / "bad.jsonl").write_text('{"tokens": [1, 2], "text": "t1 t2"}\n{"tokens": "x"}\n')
    cases = ((["nowhere.json"], "nowhere.json not found"),
             ([str(tmp_path / "old.json")], "old.jsonl not found"),
             ([str(tmp_path / "bad.json")], "bad.jsonl line 2 is not a sample"),
             ([str(tmp_path / "s.json"), "--output", str(tmp_path / "s.json")], "is one of the samples' own files"),
             ([str(tmp_path / "s.json"), "--judge", str(ckpts["mdlm"])], "the judge must be autoregressive"),
             ([str(tmp_path / "s.json"), "--batch-size", "0"], "--batch-size must be >= 1"))
    for args, message in cases:
        with pytest.raises(SystemExit) as info:
            genppl(args)
        assert info.value.code == 2 and message in capsys.readouterr().err, args
    assert (tmp_path / "s.json").read_text() == before
    with pytest.raises(SystemExit):
        from pipeline.sample import main

        main(["--checkpoint", str(ckpts["mdlm"]), "--stop-at-eos", "--suffix", "t1"])
    assert "would cut off the --suffix" in capsys.readouterr().err


def test_prefixes_agree_between_sample_and_genppl(ckpts, tmp_path, capsys):
    from pipeline.genppl import main as genppl

    stats, _ = sample(ckpts["mdlm"], tmp_path, "gen.jsonl", "--steps", "4", "--num-samples", "2", "--length", "8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.json", "gen.jsonl", "gen.txt"]
    capsys.readouterr()
    for given in ("gen", "gen.txt", "gen.json", "gen.jsonl"):
        assert genppl([str(tmp_path / given)]) == 0
        assert json.loads(capsys.readouterr().out)["entropy"] == stats["entropy"]


def test_ar_samples_never_draw_the_mask_id(ckpts, tmp_path, monkeypatch):
    """The AR model shares MDLM's vocabulary, [MASK] included, but never sees it in the data."""
    from pipeline import inference

    real = inference.load_checkpoint_model

    def mask_favoured(*args, **kwargs):
        loaded = real(*args, **kwargs)
        with torch.no_grad():  # make [MASK] (id 16) the likeliest token: it must still never be drawn
            loaded.model.backbone.final.linear.bias[16] += 100.0
        return loaded

    monkeypatch.setattr(inference, "load_checkpoint_model", mask_favoured)
    sample(ckpts["ar"], tmp_path, "ar", "--num-samples", "4", "--length", "32")
    for line in (tmp_path / "ar.jsonl").read_text().splitlines():
        tokens = json.loads(line)["tokens"]
        assert len(tokens) == 32 and max(tokens) < 16


def test_a_corpus_gone_since_the_start_is_skipped_and_a_failing_judge_is_reported(ckpts, markov_data, tmp_path,
                                                                                   caplog, monkeypatch):
    """Both are checked at start; what changes on disk later costs one metric, not the run."""
    import shutil
    from types import SimpleNamespace

    from pipeline.config import load_run_config
    from pipeline.data import ShardStream
    from pipeline.inference import load_checkpoint_model
    from pipeline.trainer import Trainer

    cfg = load_run_config("configs/train/tiny-test.yaml", [f"data.path={markov_data}"])
    damaged = tmp_path / "damaged"  # its manifest reads, its shard does not
    shutil.copytree(markov_data, damaged)
    (shard,) = damaged.glob("val/*.tar")
    shard.write_bytes(shard.read_bytes()[:5000])
    monkeypatch.setattr(ShardStream, "read_retry_wait_s", 0.0)
    cfg.eval.corpora = {"gone": str(tmp_path / "unmounted"), "same": str(markov_data), "damaged": str(damaged)}
    cfg.sample.judge = str(tmp_path / "judge-deleted")
    model = load_checkpoint_model(ckpts["mdlm"]).model
    host = SimpleNamespace(cfg=cfg, eval_model=lambda: model, rank=0, world=1, device=torch.device("cpu"))
    result = Trainer.evaluate(host)
    assert sorted(result["corpora"]) == ["same"] and result["corpora"]["same"]["nelbo"] == result["nelbo"]
    assert "eval.corpora.gone" in caplog.text and "is not readable on every rank" in caplog.text
    assert re.search(r"eval.corpora.damaged: split 'val' of \S+ could not be read on 1 of 1 rank\(s\); here: OSError: "
                     r"\S+\.tar could not be read .*: skipped", caplog.text)
    tokens = torch.tensor([[1, 2, 2, 3], [4, 4, 4, 4]])
    stats = Trainer.sample_stats(host, tokens, ["a", "b"])
    assert stats["entropy"] > 0 and "gen_ppl" not in stats
    assert stats["judge_error"].startswith("FileNotFoundError") and "could not score the samples" in caplog.text
