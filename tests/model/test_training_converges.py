"""A tiny MDLM and a tiny AR, trained with a plain AdamW loop on a Markov source whose entropy is
known exactly, get close to it: the MDLM bound from above, the AR NLL nearly on it."""
import math
import time

import torch

from model.config import ModelConfig
from model.likelihood import ar_nll, mdlm_nelbo
from model.mdlm import build_model
from model.noise import stratified_times
from tests.synthetic import entropy_rate, markov_chain

from .known_sources import MarkovChain

VOCAB, LENGTH, BATCH = 8, 32, 64


def source() -> MarkovChain:
    transition = torch.from_numpy(markov_chain(VOCAB, seed=0))
    init = torch.full((VOCAB,), 1.0 / VOCAB, dtype=torch.float64) @ transition  # as tests/synthetic.sample_chain
    return MarkovChain(transition, init, LENGTH)


def train(objective: str, steps: int, src: MarkovChain) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="custom", objective=objective, vocab_size=VOCAB + 1, n_layers=2, d_model=64,
                      n_heads=4, cond_dim=32, dropout=0.0)
    cfg.validate()
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (1 - s / steps))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = src.sample(BATCH, gen)  # fresh data every step: no overfitting to measure
        if objective == "mdlm":
            out = model(x, stratified_times(BATCH, cfg.noise_eps, gen), generator=gen)
        else:
            out = model(x)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    return model


def test_tiny_mdlm_and_ar_approach_the_entropy_rate():
    src = source()
    h = entropy_rate(src.P.numpy())
    val = src.sample(512, torch.Generator().manual_seed(123))
    exact_seq = src.nll(val)                                   # -log p(x), all L positions
    exact_cond = exact_seq + src.init[val[:, 0]].log()         # -log p(x_1..L-1 | x_0)

    start = time.perf_counter()
    mdlm = train("mdlm", 600, src)
    mdlm_s = time.perf_counter() - start
    bound, var = mdlm_nelbo(mdlm, val, 16, torch.Generator().manual_seed(2))
    gap_mdlm = ((bound - exact_seq).mean() / LENGTH).item()
    se_mdlm = ((bound - exact_seq).std() / math.sqrt(len(val)) / LENGTH).item()

    start = time.perf_counter()
    ar = train("ar", 250, src)
    ar_s = time.perf_counter() - start
    nll = ar_nll(ar, val)
    gap_ar = ((nll - exact_cond).mean() / (LENGTH - 1)).item()
    se_ar = ((nll - exact_cond).std() / math.sqrt(len(val)) / (LENGTH - 1)).item()

    bound_tok, ar_tok = (bound.mean() / LENGTH).item(), (nll.mean() / (LENGTH - 1)).item()
    print(f"\nentropy rate {h:.4f} nats/token (uniform {math.log(VOCAB):.4f}); "
          f"exact NLL of the val set {exact_seq.mean().item() / LENGTH:.4f} (all L tokens), "
          f"{exact_cond.mean().item() / (LENGTH - 1):.4f} (tokens 1..L-1)")
    print(f"MDLM bound {bound_tok:.4f}: gap to the exact NLL {gap_mdlm:+.4f} +- {se_mdlm:.4f}, "
          f"to the entropy rate {bound_tok - h:+.4f} nats/token ({mdlm_s:.0f} s, 600 steps)")
    print(f"AR NLL     {ar_tok:.4f}: gap to the exact NLL {gap_ar:+.4f} +- {se_ar:.4f}, "
          f"to the entropy rate {ar_tok - h:+.4f} nats/token ({ar_s:.0f} s, 250 steps)")

    # a bound cannot sit below the truth (beyond Monte Carlo error); trained, it is close to it
    assert -3 * se_mdlm < gap_mdlm < 0.06
    assert -3 * se_ar < gap_ar < 0.015
    assert gap_mdlm > gap_ar  # the bound of a diffusion model trails the exact AR likelihood
    assert abs(bound_tok - h) < 0.08 and abs(ar_tok - h) < 0.02
