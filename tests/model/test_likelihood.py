"""Known answers: with the exact denoiser of a source whose likelihood is known, the continuous NELBO
equals -log p(x) (the continuous-time reverse process is then exact), and the T-step bound lies
above it and falls toward it as T grows."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.likelihood import ar_nll, discrete_coefficients, mdlm_discrete_nelbo, mdlm_nelbo

from .known_sources import (MarkovChain, UnigramDenoiser, exact_continuous_nelbo, exact_discrete_nelbo,
                            exact_masked_ce, exact_mdlm, exact_truncated_nelbo)
from .tiny import tiny_model

V, L = 4, 6


def markov_source() -> MarkovChain:
    rng = np.random.default_rng(0)
    # strongly dependent rows, so the T-step bound has a visible gap
    transition = torch.from_numpy(rng.dirichlet(np.full(V, 0.4), size=V)) + 1e-3
    init = torch.from_numpy(rng.random(V)) + 0.2
    return MarkovChain(transition / transition.sum(-1, keepdim=True), init / init.sum(), L)


def unigram() -> UnigramDenoiser:
    return UnigramDenoiser(torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64))


def sample_unigram(n: int, seed: int) -> torch.Tensor:
    return torch.multinomial(torch.tensor([0.5, 0.25, 0.15, 0.1]), n * L, replacement=True,
                             generator=torch.Generator().manual_seed(seed)).view(n, L)


def check_within_mc_error(estimate: torch.Tensor, exact: torch.Tensor, per_seq_var: torch.Tensor,
                          label: str) -> float:
    """Paired per-sequence differences: the mean must sit within 4 standard errors of zero."""
    diff = estimate - exact
    se = diff.std().item() / math.sqrt(len(diff))
    reported_se = per_seq_var.sum().sqrt().item() / len(diff)
    print(f"{label}: estimate - exact = {diff.mean().item():+.4f} +- {se:.4f} nats/seq "
          f"(reported se {reported_se:.4f}; exact {exact.mean().item():.4f})")
    assert abs(diff.mean().item()) < 4 * se
    assert se < 0.03 * exact.mean().item()  # the test has power: 4 se is < 12% of the answer
    assert reported_se >= 0.7 * se  # the function's own error bar is not optimistic
    return diff.mean().item()


def test_exact_denoiser_identities():
    src = markov_source()
    x = src.sample(16, torch.Generator().manual_seed(1))
    ce, k = exact_masked_ce(src, x, V)
    torch.testing.assert_close(exact_continuous_nelbo(ce, k, L), src.nll(x), rtol=1e-10, atol=1e-10)
    u = unigram()
    xu = sample_unigram(8, 2)
    ce, k = exact_masked_ce(u, xu, V)
    torch.testing.assert_close(exact_continuous_nelbo(ce, k, L), u.nll(xu), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_continuous_nelbo_with_exact_denoiser_equals_markov_nll(schedule):
    src = markov_source()
    model = exact_mdlm(src, V, schedule)
    x = src.sample(2048, torch.Generator().manual_seed(2))
    nelbo, var = mdlm_nelbo(model, x, 8, torch.Generator().manual_seed(3))
    check_within_mc_error(nelbo, src.nll(x), var, f"continuous/{schedule}")


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_the_truncated_bound_errs_upward_for_every_schedule(schedule):
    """With a large eps the truncation is visible: whatever the schedule, the estimator averages
    the same mask-rate integral over [eps, 1], which lies above -log p. (Drawn in t, the linear
    schedule's estimate fell ~10% below -log p here.)"""
    src = markov_source()
    eps = 0.1
    model = exact_mdlm(src, V, schedule, eps=eps)
    x = src.sample(2048, torch.Generator().manual_seed(6))
    ce, k = exact_masked_ce(src, x, V)
    target = exact_truncated_nelbo(ce, k, L, eps)
    assert target.mean() > 1.02 * src.nll(x).mean()
    nelbo, var = mdlm_nelbo(model, x, 8, torch.Generator().manual_seed(7))
    check_within_mc_error(nelbo, target, var, f"truncated/{schedule}")


def test_continuous_nelbo_with_exact_denoiser_equals_unigram_nll():
    u = unigram()
    model = exact_mdlm(u, V)
    x = sample_unigram(2048, 4)
    nelbo, var = mdlm_nelbo(model, x, 4, torch.Generator().manual_seed(5))
    check_within_mc_error(nelbo, u.nll(x), var, "continuous/unigram")


def test_a_wrong_weight_is_detected():
    """The known-answer check has power: dropping the 1/t weight (flat CE) is far off."""
    src = markov_source()
    model = exact_mdlm(src, V)
    x = src.sample(1024, torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(7)
    t = torch.rand(1024, generator=g) * 0.999 + 0.001
    nll, _ = model.token_nll(x, t, g)
    diff = nll.sum(1) - src.nll(x)
    assert diff.mean().item() < -0.2 * src.nll(x).mean().item()


def test_discrete_bound_is_above_the_nll_and_falls_toward_it():
    src = markov_source()
    model = exact_mdlm(src, V)
    x = src.sample(256, torch.Generator().manual_seed(8))
    ce, k = exact_masked_ce(src, x, V)
    nll = src.nll(x).mean().item()
    gaps = {}
    for steps in (1, 2, 5, 10, 100, 1000):
        gaps[steps] = exact_discrete_nelbo(ce, k, L, model, steps).mean().item() - nll
    print("exact discrete gaps (nats/seq):", {t: round(g, 4) for t, g in gaps.items()})
    values = list(gaps.values())
    assert all(a > b > 0 for a, b in zip(values, values[1:]))
    assert gaps[2] > 0.1 and gaps[1000] < 0.01
    assert gaps[100] * 100 == pytest.approx(gaps[1000] * 1000, rel=0.1)  # the gap shrinks like 1/T


@pytest.mark.parametrize("steps,k", [(2, 2), (5, 5), (10, 10), (100, 10)])
def test_discrete_estimator_matches_the_exact_discrete_bound(steps, k):
    src = markov_source()
    model = exact_mdlm(src, V)
    x = src.sample(1024, torch.Generator().manual_seed(9))
    ce, kk = exact_masked_ce(src, x, V)
    exact = exact_discrete_nelbo(ce, kk, L, model, steps)
    est, var = mdlm_discrete_nelbo(model, x, steps, k, torch.Generator().manual_seed(10))
    check_within_mc_error(est, exact, var, f"discrete T={steps}")


def test_discrete_bound_of_independent_tokens_needs_one_step():
    u = unigram()
    model = exact_mdlm(u, V)
    x = sample_unigram(64, 11)
    ce, k = exact_masked_ce(u, x, V)
    for steps in (1, 2, 7):
        torch.testing.assert_close(exact_discrete_nelbo(ce, k, L, model, steps), u.nll(x), rtol=1e-10, atol=1e-10)
    est, _ = mdlm_discrete_nelbo(model, x, 1, 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, u.nll(x), rtol=1e-6, atol=1e-6)  # T = 1: all masked, no randomness


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_discrete_coefficients(schedule):
    model = exact_mdlm(unigram(), V, schedule)
    c = discrete_coefficients(model, 10)
    assert c[0].item() == 1.0  # the last step reveals everything left
    if schedule == "loglinear":
        torch.testing.assert_close(c, 1.0 / torch.arange(1, 11, dtype=torch.float64))
    a = model.schedule.alpha
    i = torch.arange(1, 11, dtype=torch.float64)
    torch.testing.assert_close(c, (a((i - 1) / 10) - a(i / 10)) / (1 - a(i / 10)))


def test_nelbo_respects_valid_and_runs_in_eval_mode():
    model = tiny_model(dropout=0.5)
    model.train()
    x = torch.randint(0, 11, (3, 10), generator=torch.Generator().manual_seed(0))
    a, _ = mdlm_nelbo(model, x, 3, torch.Generator().manual_seed(1))
    b, _ = mdlm_nelbo(model, x, 3, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and model.training  # no dropout inside, mode restored
    ones, _ = mdlm_nelbo(model, x, 3, torch.Generator().manual_seed(1), torch.ones(x.shape))
    torch.testing.assert_close(a, ones)
    zeros, _ = mdlm_nelbo(model, x, 3, torch.Generator().manual_seed(1), torch.zeros(x.shape))
    assert torch.count_nonzero(zeros) == 0
    with pytest.raises(ValueError, match="k >= 1"):
        mdlm_nelbo(model, x, 0)


def test_ar_nll_is_the_exact_next_token_nll():
    model = tiny_model("ar", dropout=0.5)
    x = torch.randint(0, 11, (3, 10), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(x.shape)
    valid[1, 7:] = 0
    got = ar_nll(model, x, valid)
    assert model.training
    model.eval()
    lp = model.backbone(x[:, :-1]).log_softmax(-1).gather(-1, x[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, -(lp * valid[:, 1:]).sum(1).double())
    # by hand for one position: causal prefix only
    manual = -F.log_softmax(model.backbone(x[:1, :4])[0, -1], -1)[x[0, 4]]
    torch.testing.assert_close(-lp[0, 3], manual)
