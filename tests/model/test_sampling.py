import itertools
import math

import pytest
import torch
from torch import nn

from model import sampling
from model.sampling import (
    SAMPLERS,
    ar_sample,
    categorical,
    generate,
    mdlm_ancestral,
    mdlm_confidence,
    mdlm_semi_ar,
    nucleus,
    semi_ar_windows,
)

from .known_sources import MarkovChain, exact_mdlm
from .tiny import tiny_model

MASK = 11  # tiny_model's vocab is 12


class CountingBackbone(nn.Module):
    """Counts real forward passes and the rows they ran on, so the reported costs are checked
    against the truth; keeps the inputs when `keep` is set."""

    def __init__(self, inner: nn.Module, keep: bool = False):
        super().__init__()
        self.inner, self.calls, self.rows, self.keep, self.inputs = inner, 0, 0, keep, []

    def forward(self, tokens, sigma=None):
        self.calls += 1
        self.rows += tokens.shape[0]
        if self.keep:
            self.inputs.append(tokens.clone())
        return self.inner(tokens, sigma)


def counted(model, keep: bool = False):
    model.backbone = CountingBackbone(model.backbone, keep)
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


def test_time_conditioned_models_are_cached_exactly():
    """Rows that a step leaves unchanged are skipped: their output at that t is never used."""
    model = counted(tiny_model(time_conditioning=True))
    a = mdlm_ancestral(model, 2, 8, 40, generator=torch.Generator().manual_seed(0), use_cache=True)
    b = mdlm_ancestral(model, 2, 8, 40, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
    assert a.rows_evaluated <= 2 * 8 < b.rows_evaluated


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


def test_temperature_sharpens_before_the_nucleus():
    lp = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log()
    sharp = sampling.Decoding(temperature=0.5).log_probs(lp).exp()  # p^2, renormalised
    torch.testing.assert_close(sharp, torch.tensor([[0.04, 0.25, 0.09]], dtype=torch.float64) / 0.38)
    # T = 0.5 then top-p 0.6: 0.658 alone reaches it
    assert torch.equal(sampling.Decoding(0.6, 0.5).log_probs(lp).exp() > 0, torch.tensor([[False, True, False]]))
    assert torch.equal(sampling.Decoding().log_probs(lp), lp)
    model = tiny_model()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cold = generate(model, 64, 8, steps=8, generator=gen(), temperature=0.05)
    warm = generate(model, 64, 8, steps=8, generator=gen(), temperature=1.0)
    # near-zero temperature is nearly greedy: far fewer distinct tokens per position
    assert len(set(cold.tokens[:, 3].tolist())) < len(set(warm.tokens[:, 3].tolist()))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(model, 1, 8, steps=4, temperature=0.0)
    # the [MASK] token's probability is 0 at any temperature, not only where -1e6 / T is still small
    hot = generate(model, 64, 16, steps=8, generator=gen(), temperature=1e7)
    assert not (hot.tokens == model.mask_id).any()
    hot_lp = sampling.Decoding(temperature=1e7).log_probs(torch.tensor([[0.0, -1e6, 0.0]]).log_softmax(-1))
    assert hot_lp[0, 1] == float("-inf") and torch.allclose(hot_lp[0, [0, 2]].exp(), torch.tensor(0.5, dtype=torch.float64))


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


# ----------------------------------------------------------------------------- per-sample cache


@pytest.mark.parametrize("steps", [2, 7, 16, 64, 500])
def test_per_sample_cache_runs_only_changed_rows_and_matches_the_uncached_sampler(steps):
    n, length = 5, 10
    model = counted(tiny_model())
    prompt = torch.tensor([[2, MASK, 4]] * 2 + [[1, 1, 1]] * 3)
    a = mdlm_ancestral(model, n, length, steps, generator=torch.Generator().manual_seed(3), prompt=prompt)
    assert (a.network_calls, a.rows_evaluated) == (model.backbone.calls, model.backbone.rows)
    assert a.rows_evaluated == int(a.calls_per_sample.sum())
    masked_at_start = (sampling._prompt_canvas(prompt, n, length, MASK, "cpu") == MASK).sum(dim=1)
    assert bool((a.calls_per_sample <= torch.clamp(masked_at_start, max=steps)).all())
    assert a.max_calls_per_sample <= min(steps, length) + 1
    model.backbone.calls = model.backbone.rows = 0
    b = mdlm_ancestral(model, n, length, steps, generator=torch.Generator().manual_seed(3), prompt=prompt,
                       use_cache=False)
    assert (b.network_calls, b.rows_evaluated) == (model.backbone.calls, model.backbone.rows)
    assert torch.equal(a.tokens, b.tokens)
    assert a.rows_evaluated <= b.rows_evaluated
    if steps >= 64:
        assert a.rows_evaluated < b.rows_evaluated / 3


def test_generate_dispatches_and_reports_every_cost():
    model = counted(tiny_model())
    for name in SAMPLERS:
        model.backbone.calls = model.backbone.rows = 0
        out = generate(model, 3, 20, sampler=name, steps=6, block_size=8,
                       generator=torch.Generator().manual_seed(0))
        assert out.tokens.shape == (3, 20) and not (out.tokens == MASK).any(), name
        assert (out.network_calls, out.rows_evaluated) == (model.backbone.calls, model.backbone.rows), name
        assert set(out.stats()) == {"network_calls", "rows_evaluated", "max_calls_per_sample", "blocks"}
    same = [generate(model, 2, 9, sampler="cached", steps=5, generator=torch.Generator().manual_seed(4)).tokens
            for _ in range(2)]
    assert torch.equal(*same)  # a seed reproduces the samples


def test_final_argmax_fills_only_what_is_left_at_eps(monkeypatch):
    """final="argmax" is the MDLM reference's noise removal: the steps end at t = eps and one more
    pass takes the argmax of the ~m(eps) positions still masked, not of the last step's ~1/T."""
    model = tiny_model()
    calls = []
    real = sampling._fill_with_argmax

    def spy(x, t, denoiser, mask_id):
        calls.append(((x == mask_id).sum().item(), t))
        return real(x, t, denoiser, mask_id)

    monkeypatch.setattr(sampling, "_fill_with_argmax", spy)
    for name in ("cached", "confidence"):
        calls.clear()
        out = generate(model, 16, 256, sampler=name, steps=10, final="argmax",
                       generator=torch.Generator().manual_seed(0))
        assert not (out.tokens == MASK).any()
        [(left, t)] = calls
        assert t == pytest.approx(model.cfg.noise_eps)
        assert left < 0.01 * 16 * 256, (name, left)   # m(eps) = 0.1% expected; 10% before
        calls.clear()
        generate(model, 2, 32, sampler=name, steps=4, generator=torch.Generator().manual_seed(0))
        assert calls == []   # the default draws every position
    # the pass itself: the argmax of p_theta(. | z_eps) at every masked position
    x = torch.randint(0, MASK, (2, 8), generator=torch.Generator().manual_seed(1))
    x[0, 3] = x[1, 5] = x[1, 6] = MASK
    counter = sampling._Counter(2)
    filled = real(x, 1e-3, sampling._Denoiser(model, 2, True, counter), MASK)
    expected = model.logits(x, torch.full((2,), 1e-3)).argmax(-1)
    assert torch.equal(filled[x == MASK], expected[x == MASK]) and torch.equal(filled[x != MASK], x[x != MASK])
    with pytest.raises(ValueError, match="final step must be one of"):
        mdlm_ancestral(model, 1, 8, 4, final="mode")


def test_draws_use_float64_uniforms(monkeypatch):
    seen = []
    real = sampling._uniform

    def spy(shape, generator, device):
        u = real(shape, generator, device)
        seen.append(u.dtype)
        return u

    monkeypatch.setattr(sampling, "_uniform", spy)
    model = tiny_model()
    generate(model, 2, 8, sampler="cached", steps=4, generator=torch.Generator().manual_seed(0))
    generate(model, 2, 8, sampler="confidence", steps=4, generator=torch.Generator().manual_seed(0))
    generate(tiny_model("ar"), 2, 5, bos_id=0, generator=torch.Generator().manual_seed(0))
    assert seen and set(seen) == {torch.float64}


# ----------------------------------------------------------------------------- semi-AR, infilling


def test_semi_ar_windows_cover_any_length_with_the_carried_prefix():
    assert semi_ar_windows(24, 8, 4) == [(0, 8), (4, 12), (8, 16), (12, 20), (16, 24)]
    assert semi_ar_windows(10, 8, 2) == [(0, 8), (2, 10)]  # the last block shifts left: a full context
    assert semi_ar_windows(5, 8, 4) == [(0, 5)]
    for length, block, carry in itertools.product((1, 9, 31, 64), (2, 5, 16), (0, 1, 4)):
        if carry >= block:
            continue
        w = semi_ar_windows(length, block, carry)
        assert w[0][0] == 0 and w[-1][1] == length
        assert all(e - s == min(block, length) for s, e in w)
        for (s0, e0), (s1, e1) in itertools.pairwise(w):
            assert e1 > e0 and s1 <= e0 - carry  # progress, and >= carry tokens carried over


def test_semi_ar_outputs_the_length_and_continues_the_carried_prefix(monkeypatch):
    canvases = []
    inner = sampling._INNER["cached"]

    def spy(model, x, *args):
        canvases.append(x.clone())
        return inner(model, x, *args)

    monkeypatch.setitem(sampling._INNER, "cached", spy)
    model = counted(tiny_model(), keep=True)
    length, block, carry = 30, 8, 3
    out = mdlm_semi_ar(model, 2, length, 5, block_size=block, carry=carry,
                       generator=torch.Generator().manual_seed(1), prompt=torch.tensor([4, 5]))
    assert out.tokens.shape == (2, length) and not (out.tokens == MASK).any()
    assert torch.equal(out.tokens[:, :2], torch.tensor([[4, 5]] * 2))
    windows = semi_ar_windows(length, block, carry)
    assert out.blocks == len(windows) == len(canvases)
    assert all(x.shape[1] == block for x in model.backbone.inputs)  # the model only sees one block
    done = 0
    for (start, end), canvas in zip(windows, canvases):
        kept = done - start  # positions generated by earlier blocks: the fixed prefix
        assert kept >= (carry if start else 0)
        assert torch.equal(canvas[:, :kept], out.tokens[:, start:done])  # carried over, unchanged
        fresh = canvas[:, kept:]
        assert bool((fresh == MASK).all()) or start == 0
        done = end
    again = mdlm_semi_ar(model, 2, length, 5, block_size=block, carry=carry,
                         generator=torch.Generator().manual_seed(1), prompt=torch.tensor([4, 5]))
    assert torch.equal(out.tokens, again.tokens)  # a seed reproduces it
    with pytest.raises(ValueError, match="carry must be in"):
        mdlm_semi_ar(model, 1, 20, 4, block_size=8, carry=8)
    with pytest.raises(ValueError, match="block size >= 2"):
        generate(model, 1, 20, sampler="semi-ar", steps=4)


def test_infilling_keeps_known_tokens_anywhere():
    model = tiny_model()
    canvas = torch.tensor([3, MASK, MASK, 7, MASK, MASK, MASK, 2, MASK, 9])
    known = canvas != MASK
    for name in SAMPLERS:
        for steps in (1, 4, 50):
            out = generate(model, 3, 10, sampler=name, steps=steps, block_size=4, prompt=canvas,
                           generator=torch.Generator().manual_seed(steps)).tokens
            assert torch.equal(out[:, known], canvas[known].expand(3, -1)), (name, steps)
            assert not (out == MASK).any()


def test_semi_ar_with_the_exact_denoiser_reproduces_the_source():
    """Blocks of 3 over a length-4 chain with a carry of 2: the Markov property makes the carried
    prefix enough, so the samples follow the chain."""
    src = chain_source(4)
    model = exact_mdlm(src, 3)
    n = 4000
    out = mdlm_semi_ar(model, n, 4, 50, block_size=3, carry=2, generator=torch.Generator().manual_seed(5)).tokens
    exact_tv = total_variation(src.sample(n, torch.Generator().manual_seed(0)), src)
    assert total_variation(out, src) < 1.5 * exact_tv + 0.02


# ----------------------------------------------------------------------------- confidence


class PositionalConfidence(nn.Module):
    """Position l predicts token l % 3 with a sharpness that grows with l: the most confident
    masked position is always the right-most one."""

    def forward(self, tokens, sigma=None):
        b, length = tokens.shape
        logits = torch.zeros(b, length, 4)
        pos = torch.arange(length)
        logits[:, pos, pos % 3] = 1.0 + pos.float()
        return logits


def test_confidence_sampler_reveals_k_tokens_per_step_most_confident_first():
    model = counted(exact_mdlm(PositionalConfidence(), 3), keep=True)
    length = 6
    out = mdlm_confidence(model, 2, length, length, generator=torch.Generator().manual_seed(0))
    assert out.network_calls == length and out.max_calls_per_sample == length
    for j, x in enumerate(model.backbone.inputs):
        masked = (x == 3)
        assert bool(masked[:, :length - j].all()) and not masked[:, length - j:].any(), (j, x)
    # fewer steps than tokens: k = 2 per step; more steps than tokens: steps with k = 0 cost nothing
    model.backbone.inputs.clear()
    two = mdlm_confidence(model, 1, length, 3, generator=torch.Generator().manual_seed(0))
    assert two.network_calls == 3
    assert [int((x == 3).sum()) for x in model.backbone.inputs] == [6, 4, 2]
    many = mdlm_confidence(model, 1, length, 100, generator=torch.Generator().manual_seed(0))
    assert many.network_calls == length


# ----------------------------------------------------------------------------- AR with KV cache


def test_kv_cached_ar_equals_uncached_decoding():
    ar = counted(tiny_model("ar", vocab=12))
    inner = ar.backbone.inner
    for prompt in (None, torch.tensor([4, 2, 9])):
        ar.backbone.calls = 0
        plain = ar_sample(ar, 3, 14, 0, generator=torch.Generator().manual_seed(2), prompt=prompt, use_cache=False)
        assert plain.network_calls == ar.backbone.calls == 13 - (0 if prompt is None else 3)
        ar.backbone = inner  # the KV path needs the DiT itself
        cached = ar_sample(ar, 3, 14, 0, generator=torch.Generator().manual_seed(2), prompt=prompt)
        ar.backbone = counted_backbone = CountingBackbone(inner)
        assert counted_backbone.calls == 0
        assert torch.equal(cached.tokens, plain.tokens) and cached.network_calls == plain.network_calls
        if prompt is not None:
            assert torch.equal(cached.tokens[:, 1:4], prompt.expand(3, -1))
    # the cached logits equal the full causal pass, whatever the chunking of the prefix
    x = cached.tokens
    cache = sampling._KVCache(inner, 3, 14, "cpu", torch.float32)
    parts = [sampling._forward_cached(inner, x[:, a:b], cache) for a, b in ((0, 5), (5, 9), (9, 10), (10, 14))]
    torch.testing.assert_close(torch.cat(parts, dim=1), inner(x), rtol=1e-4, atol=1e-4)


def test_ar_prompt_longer_than_the_length_fails_clearly():
    with pytest.raises(ValueError, match="prompt has 5 tokens but the sample length is 5"):
        ar_sample(tiny_model("ar"), 1, 5, 0, prompt=torch.arange(5))
    with pytest.raises(ValueError, match="unknown sampler 'fast'"):
        generate(tiny_model(), 1, 5, sampler="fast")
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(tiny_model(), 1, 5, top_p=0.0)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_the_head_runs_only_where_tokens_are_drawn_and_gives_the_full_logits(time_conditioning):
    model = tiny_model(time_conditioning=time_conditioning)
    x = torch.tensor([[MASK, 3, MASK, MASK, 1, MASK], [2, MASK, MASK, 4, 4, MASK]])
    at = torch.tensor([[1, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    full = model.logits(x, torch.full((2,), 0.7))
    torch.testing.assert_close(sampling._logits_at(model, x, 0.7, at), full[at], rtol=1e-5, atol=1e-5)
    # the DiT fast path and the generic path give the same samples
    a = mdlm_ancestral(model, 3, 12, 9, generator=torch.Generator().manual_seed(0))
    b = mdlm_ancestral(counted(model), 3, 12, 9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)
