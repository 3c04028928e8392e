import math

import pytest
import torch
import torch.nn.functional as F

from model.likelihood import mdlm_nelbo
from model.mdlm import NEG_INF, subs_log_probs

from .tiny import tiny_model

V = 12  # 11 data tokens + [MASK] = 11
MASK = V - 1


def data(b=4, length=10, seed=0):
    return torch.randint(0, MASK, (b, length), generator=torch.Generator().manual_seed(seed))


def test_subs_never_predicts_mask_and_carries_unmasked_tokens_over():
    model = tiny_model().eval()
    x = data()
    z = x.clone()
    z[:, ::2] = MASK
    lp = model.log_probs(z)
    probs = lp.exp()
    assert torch.count_nonzero(probs[..., MASK]) == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(z.shape))
    unmasked = z != MASK
    assert torch.equal(probs[unmasked], F.one_hot(z[unmasked], V).float())
    # masked positions get the network's distribution with the [MASK] logit removed
    logits = model.backbone(z).clone()
    logits[..., MASK] = -math.inf
    torch.testing.assert_close(lp[~unmasked][:, :MASK], logits.log_softmax(-1)[~unmasked][:, :MASK])
    # subs_log_probs does not modify the caller's logits
    raw = model.backbone(z)
    before = raw.clone()
    subs_log_probs(raw, z, MASK)
    assert torch.equal(raw, before)


def test_unmasked_positions_add_nothing_and_masked_ones_add_their_cross_entropy():
    model = tiny_model().eval()
    x = data(8, 16)
    t = torch.full((8,), 0.5)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    nll, masked = model.token_nll(x, t, noise=noise)
    z, masked2 = model.corrupt(x, t, noise=noise)
    assert torch.equal(masked, masked2) and 0 < masked.sum() < masked.numel()
    assert torch.count_nonzero(nll[~masked]) == 0
    expected = -model.log_probs(z).gather(-1, x[..., None]).squeeze(-1)
    torch.testing.assert_close(nll, expected)
    assert bool((nll[masked] > 0).all())


@pytest.mark.parametrize("schedule", ["loglinear", "cosine", "linear"])
def test_training_loss_is_the_weighted_masked_cross_entropy_per_token(schedule):
    model = tiny_model(noise_schedule=schedule).eval()
    x = data(6, 12)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 1.0])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    out = model(x, t, noise=noise)
    nll, _ = model.token_nll(x, t, noise=noise)
    w = -model.schedule.alpha_prime(t) / (1 - model.schedule.alpha(t))
    if schedule == "loglinear":
        assert torch.equal(model.schedule.weight(t), 1 / t)
    torch.testing.assert_close(out.loss_sum, (w[:, None] * nll).sum())
    assert out.num_tokens.item() == x.numel()
    torch.testing.assert_close(out.loss, out.loss_sum / x.numel())


def test_flat_ce_drops_the_weight_but_evaluation_still_uses_the_nelbo():
    nelbo_model = tiny_model(loss="nelbo").eval()
    flat_model = tiny_model(loss="flat_ce").eval()
    flat_model.load_state_dict(nelbo_model.state_dict())
    x = data(4, 12)
    t = torch.tensor([0.1, 0.3, 0.5, 0.9])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    nll, _ = nelbo_model.token_nll(x, t, noise=noise)
    torch.testing.assert_close(flat_model(x, t, noise=noise).loss_sum, nll.sum())
    torch.testing.assert_close(nelbo_model(x, t, noise=noise).loss_sum, (nll / t[:, None]).sum())
    a = mdlm_nelbo(nelbo_model, x, 4, torch.Generator().manual_seed(5))
    b = mdlm_nelbo(flat_model, x, 4, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_corruption_masks_at_the_normalised_rate_and_is_reproducible_from_noise():
    model = tiny_model()
    x = data(64, 64)
    for t in (0.1, 0.5, 0.9):
        _, masked = model.corrupt(x, torch.full((64,), t), generator=torch.Generator().manual_seed(0))
        frac = masked.float().mean().item()
        assert abs(frac - t) < 4 * math.sqrt(t * (1 - t) / x.numel())
    z, masked = model.corrupt(x, torch.ones(64), generator=torch.Generator().manual_seed(0))
    assert bool(masked.all()) and bool((z == MASK).all())
    # fixed uniforms: the loss of a batch is the sum of the losses of its slices (any rank split)
    model.eval()
    t = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 0.99 + 0.01
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    whole = model(x, t, noise=noise).loss_sum
    parts = model(x[:32], t[:32], noise=noise[:32]).loss_sum + model(x[32:], t[32:], noise=noise[32:]).loss_sum
    torch.testing.assert_close(whole, parts)


def test_padding_does_not_count():
    model = tiny_model().eval()
    x = data(3, 10)
    t = torch.tensor([0.5, 0.7, 1.0])
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    valid = torch.ones(x.shape)
    valid[0, 6:] = 0
    valid[2, 3:] = 0
    out = model(x, t, valid=valid, noise=noise)
    nll, _ = model.token_nll(x, t, noise=noise)
    assert out.num_tokens.item() == valid.sum().item() == 19
    torch.testing.assert_close(out.loss_sum, (nll / t[:, None] * valid).sum())
    ar = tiny_model("ar").eval()
    out = ar(x, valid=valid)
    manual = F.cross_entropy(ar.backbone(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
    assert out.num_tokens.item() == valid[:, 1:].sum().item()
    torch.testing.assert_close(out.loss_sum, (manual * valid[:, 1:]).sum())


def test_mdlm_is_bidirectional_and_ar_is_causal():
    x = data(2, 16)
    late = x.clone()
    late[:, -1] = (late[:, -1] + 1) % MASK
    mdlm = tiny_model().eval()
    z, z_late = x.clone(), late.clone()
    z[:, :8] = MASK
    z_late[:, :8] = MASK
    change = (mdlm.log_probs(z) - mdlm.log_probs(z_late)).abs()[:, :8].amax()
    assert change > 1e-3  # early (masked) predictions see the last token
    ar = tiny_model("ar").eval()
    for j in (1, 8, 15):
        edited = x.clone()
        edited[:, j] = (edited[:, j] + 1) % MASK
        before, after = ar.backbone(x), ar.backbone(edited)
        assert torch.equal(before[:, :j], after[:, :j])  # never: logits before j ignore token j
        assert (before[:, j:] - after[:, j:]).abs().amax() > 1e-3


def test_time_conditioning_switch():
    x = data(2, 8)
    z = x.clone()
    z[:, 1::2] = MASK
    off = tiny_model(time_conditioning=False).eval()
    on = tiny_model(time_conditioning=True).eval()
    t1, t2 = torch.full((2,), 0.2), torch.full((2,), 0.9)
    assert torch.equal(off.log_probs(z, t1), off.log_probs(z, t2))  # what makes caching exact
    assert (on.log_probs(z, t1) - on.log_probs(z, t2)).abs().amax() > 1e-4


def test_mask_logit_is_safe_under_bf16_autocast():
    assert math.isinf(torch.tensor(NEG_INF).half().item())  # why logits are upcast first
    assert torch.tensor(NEG_INF).bfloat16().float().item() == pytest.approx(NEG_INF, rel=1e-2)
    model = tiny_model().eval()
    x = data(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = model.log_probs(x.masked_fill(torch.rand(x.shape) < 0.5, MASK))
        out = model(x, torch.full((2,), 0.5), generator=torch.Generator().manual_seed(0))
    assert lp.dtype == torch.float32 and bool(torch.isfinite(lp).all())
    assert torch.count_nonzero(lp.exp()[..., MASK]) == 0
    assert math.isfinite(out.loss.item())


def test_gradients_reach_every_parameter():
    model = tiny_model(time_conditioning=True)
    x = data(4, 12)
    out = model(x, torch.tensor([0.2, 0.4, 0.6, 0.8]), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_head_on_masked_positions_only_gives_the_full_heads_loss_and_gradients(time_conditioning):
    model = tiny_model(time_conditioning=time_conditioning).double()
    x = data(6, 16)
    t = torch.tensor([0.02, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
    valid = torch.ones_like(x)
    valid[0, 10:] = 0
    results = {}
    for only in (True, False):
        model.cfg.masked_logits_only = only
        model.zero_grad()
        out = model(x, t, valid=valid, noise=noise)
        out.loss.backward()
        results[only] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=0)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-5, atol=1e-9, msg=name)
    assert results[True][1]["backbone.final.linear.weight"].abs().sum() > 0


def test_logits_at_positions_are_the_selected_rows_of_the_full_logits():
    model = tiny_model(time_conditioning=True).eval()
    x = data(3, 10)
    t = torch.tensor([0.3, 0.6, 0.9])
    z, masked = model.corrupt(x, t, generator=torch.Generator().manual_seed(4))
    at = model.logits(z, t, positions=masked)
    assert at.shape == (int(masked.sum()), model.cfg.vocab_size) and at.dtype == torch.float32
    torch.testing.assert_close(at, model.logits(z, t)[masked])
    assert bool((at[:, MASK] == NEG_INF).all())


def test_a_batch_with_nothing_masked_has_zero_loss_and_finite_gradients():
    model = tiny_model()
    x = data(2, 8)
    out = model(x, torch.full((2,), 0.5), noise=torch.ones(x.shape))  # uniforms >= m(t): none masked
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def test_a_time_conditioned_model_refuses_to_run_without_its_time():
    """Without t it would silently run as if at t = 0 (no noise at all)."""
    model = tiny_model(time_conditioning=True)
    z = torch.full((2, 8), model.mask_id)
    with pytest.raises(ValueError, match="time-conditioned .* pass the time t of z_t"):
        model.log_probs(z)
    assert model.log_probs(z, torch.full((2,), 0.5)).shape == (2, 8, 12)
    assert tiny_model().log_probs(z).shape == (2, 8, 12)  # an unconditioned model needs no t
