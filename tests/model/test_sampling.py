import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from model.sampling import ar_sample, categorical, mdlm_ancestral, nucleus

from .known_sources import MarkovChain, exact_mdlm
from .tiny import tiny_model

MASK = 11  # tiny_model's vocab is 12


class CountingBackbone(nn.Module):
    """Counts real forward passes, so `network_calls` is checked against the truth."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, tokens, sigma=None):
        self.calls += 1
        return self.inner(tokens, sigma)


def counted(model):
    model.backbone = CountingBackbone(model.backbone)
    return model


@pytest.mark.parametrize("steps", [4, 12, 100])
def test_cache_gives_the_same_samples_with_fewer_calls(steps):
    model = counted(tiny_model())
    a = mdlm_ancestral(model, 3, 12, steps, generator=torch.Generator().manual_seed(7), use_cache=True)
    assert a.network_calls == model.backbone.calls
    model.backbone.calls = 0
    b = mdlm_ancestral(model, 3, 12, steps, generator=torch.Generator().manual_seed(7), use_cache=False)
    assert b.network_calls == model.backbone.calls
    assert torch.equal(a.tokens, b.tokens)
    assert not (a.tokens == MASK).any()
    assert a.network_calls <= b.network_calls <= steps
    if steps == 100:
        assert a.network_calls <= 3 * 12 < b.network_calls


@pytest.mark.parametrize("steps", [1, 3, 8, 20, 1000])
def test_cached_calls_are_at_most_min_steps_length(steps):
    length = 8
    model = counted(tiny_model())
    for seed in range(3):
        model.backbone.calls = 0
        out = mdlm_ancestral(model, 1, length, steps, generator=torch.Generator().manual_seed(seed))
        assert out.network_calls == model.backbone.calls <= min(steps, length)
        assert not (out.tokens == MASK).any()


def test_time_conditioned_models_are_never_cached():
    model = counted(tiny_model(time_conditioning=True))
    a = mdlm_ancestral(model, 2, 8, 40, generator=torch.Generator().manual_seed(0), use_cache=True)
    b = mdlm_ancestral(model, 2, 8, 40, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert a.network_calls == b.network_calls > 16
    assert torch.equal(a.tokens, b.tokens)


def test_prompt_tokens_are_never_changed_and_masks_in_it_are_filled():
    model = tiny_model()
    prompt = torch.tensor([3, 5, MASK, 7, 1])
    for steps in (1, 5, 64):
        out = mdlm_ancestral(model, 4, 12, steps, generator=torch.Generator().manual_seed(steps), prompt=prompt).tokens
        assert torch.equal(out[:, [0, 1, 3, 4]], prompt[[0, 1, 3, 4]].expand(4, 4))
        assert not (out == MASK).any()
    per_row = torch.tensor([[1, 2], [3, 4]])
    out = mdlm_ancestral(model, 2, 6, 6, generator=torch.Generator().manual_seed(0), prompt=per_row).tokens
    assert torch.equal(out[:, :2], per_row)


def test_bad_arguments_fail_with_clear_messages():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"steps T must be an integer >= 1, got 0"):
        mdlm_ancestral(model, 1, 8, 0)
    with pytest.raises(ValueError, match="T must be"):
        mdlm_ancestral(model, 1, 8, 0.5)
    with pytest.raises(ValueError, match="prompt has 9 tokens but the sample length is 8"):
        mdlm_ancestral(model, 1, 8, 4, prompt=torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt must be shaped"):
        mdlm_ancestral(model, 3, 8, 4, prompt=torch.zeros(2, 4, dtype=torch.long))


def test_categorical_draws_in_float64():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    u0 = torch.rand(1, dtype=torch.float64, generator=g).item()
    after_one_float64 = g.get_state()
    # the boundary between token 0 and 1 sits 1e-13 above / below the first uniform: only a
    # float64 draw and float64 cumulative sum resolve it (fp32 rounds both sides together)
    for offset, expected in ((1e-13, 0), (-1e-13, 1)):
        p0 = u0 + offset
        lp = torch.tensor([[math.log(p0), math.log1p(-p0)]], dtype=torch.float64)
        g.set_state(state)
        drawn = categorical(lp, g)
        assert drawn.item() == expected
        assert torch.equal(g.get_state(), after_one_float64)


def test_categorical_frequencies_and_zero_probability_tokens():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    lp = probs.log().expand(20000, -1)
    draws = categorical(lp, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert freq[1] == 0
    assert (freq - probs).abs().max() < 4 * math.sqrt(0.25 / 20000)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    lp = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log()
    kept = nucleus(lp, 0.6).exp()
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.625, 0.375]], dtype=torch.float64))
    assert torch.equal(nucleus(lp, 1.0), lp)


def chain_source(length: int) -> MarkovChain:
    transition = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]], dtype=torch.float64)
    return MarkovChain(transition, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), length)


def total_variation(samples: torch.Tensor, src: MarkovChain, first: int = 0) -> float:
    seqs = torch.tensor(list(itertools.product(range(3), repeat=src.length - first)))
    counts = {tuple(r): 0 for r in seqs.tolist()}
    for row in samples[:, first:].tolist():
        counts[tuple(row)] += 1
    emp = torch.tensor([counts[tuple(r)] for r in seqs.tolist()], dtype=torch.float64) / len(samples)
    if first == 0:
        true = (-src.nll(seqs)).exp()
    else:
        full = torch.cat([torch.full((len(seqs), 1), int(samples[0, 0])), seqs], dim=1)
        true = (-(src.nll(full) + src.init[full[:, 0]].log())).exp()
    return 0.5 * (emp - true).abs().sum().item()


def test_ancestral_sampling_with_the_exact_denoiser_reproduces_the_source():
    src = chain_source(4)
    model = exact_mdlm(src, 3)
    n = 6000
    exact_tv = total_variation(src.sample(n, torch.Generator().manual_seed(0)), src)
    fine = mdlm_ancestral(model, n, 4, 200, generator=torch.Generator().manual_seed(1)).tokens
    one_step = mdlm_ancestral(model, n, 4, 1, generator=torch.Generator().manual_seed(2)).tokens
    tv_fine, tv_one = total_variation(fine, src), total_variation(one_step, src)
    print(f"TV to the source: exact sampling {exact_tv:.3f}, T=200 {tv_fine:.3f}, T=1 {tv_one:.3f}")
    assert tv_fine < 1.5 * exact_tv + 0.01
    assert tv_one > 0.2  # T = 1 draws every position from its marginal: dependence is lost


def test_ar_sampling_follows_the_model_and_counts_calls():
    src = chain_source(5)

    class ExactNextToken(nn.Module):
        def forward(self, tokens, sigma=None):
            return src.P[tokens].log().float()

    model = tiny_model("ar", vocab=3)
    model.backbone = ExactNextToken()
    out = ar_sample(model, 6000, 5, bos_id=1, generator=torch.Generator().manual_seed(3))
    assert out.network_calls == 4 and out.tokens.shape == (6000, 5)
    assert bool((out.tokens[:, 0] == 1).all())
    tv = total_variation(out.tokens, src, first=1)
    print(f"AR sampler TV to the chain: {tv:.3f}")
    assert tv < 0.06


def test_samplers_run_in_eval_mode_and_restore_it():
    model = tiny_model(dropout=0.5)
    model.train()
    a = mdlm_ancestral(model, 2, 8, 8, generator=torch.Generator().manual_seed(0), use_cache=True)
    b = mdlm_ancestral(model, 2, 8, 8, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a.tokens, b.tokens) and model.training
    ar = tiny_model("ar", dropout=0.5)
    x1 = ar_sample(ar, 2, 6, 0, generator=torch.Generator().manual_seed(0)).tokens
    x2 = ar_sample(ar, 2, 6, 0, generator=torch.Generator().manual_seed(0)).tokens
    assert torch.equal(x1, x2) and ar.training
