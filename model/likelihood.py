"""Likelihood bounds for MDLM and exact NLL for AR, with Monte Carlo standard errors.

All functions return per-sequence sums (nats) so callers can aggregate over any number of batches
and ranks before dividing by the token count. They always evaluate the NELBO, whatever training
loss the model was trained with, and always run the model in eval mode (no dropout).
"""
from __future__ import annotations

import torch

from .mdlm import MDLM, AutoregressiveLM, eval_mode


def antithetic_times(batch: int, k: int, eps: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """(batch, k) values (times, or mask rates); the k draws of each sequence are stratified over [eps, 1]."""
    return _strata_times(torch.rand(batch, 1, generator=generator, dtype=torch.float64), k, eps, device)


def _strata_times(u: torch.Tensor, k: int, eps: float, device) -> torch.Tensor:
    t = (torch.arange(k, dtype=torch.float64)[None] + u) / k
    return (eps + (1.0 - eps) * t).to(device=device, dtype=torch.float32)


def _mean_and_var(draws: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the draws and the variance of that mean. The draws are stratified, so the i.i.d.
    formula over-estimates the variance: the standard error it gives is conservative."""
    stacked = torch.stack(draws, dim=1).double()
    k = stacked.shape[1]
    var = stacked.var(dim=1, unbiased=True) / k if k > 1 else torch.zeros_like(stacked[:, 0])
    return stacked.mean(dim=1), var


def _uniforms(x0: torch.Tensor, k: int, generator: torch.Generator | None,
              per_sequence: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The stratification offsets (B, 1) and the masking uniforms of each of the k draws.

    `per_sequence` (B, 1 + k * L) fixes them per sequence (e.g. seeded by the sample's key), which
    makes a result independent of batch composition and world size."""
    b, length = x0.shape
    if per_sequence is None:
        return torch.rand(b, 1, generator=generator, dtype=torch.float64), [None] * k
    if per_sequence.shape != (b, 1 + k * length):
        raise ValueError(f"per-sequence uniforms must be shaped {(b, 1 + k * length)}, got {tuple(per_sequence.shape)}")
    noise = [per_sequence[:, 1 + j * length:1 + (j + 1) * length].to(x0.device, torch.float32) for j in range(k)]
    return per_sequence[:, :1].double().cpu(), noise


def _masked_sum(nll: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is not None:
        nll = torch.where(valid.bool(), nll, torch.zeros_like(nll))
    return nll.sum(dim=1)


@torch.no_grad()
def mdlm_nelbo(model: MDLM, x0: torch.Tensor, k: int, generator: torch.Generator | None = None,
               valid: torch.Tensor | None = None, uniforms: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous-time NELBO per sequence, E_t[w(t) sum_masked -log p(x0 | z_t)], written in the
    mask rate m = m(t) (w(t) dt = dm / m): (1/m) sum_masked -log p(x0 | z) averaged over k mask
    rates stratified in [eps, 1], the time t(m) passed to a time-conditioned backbone.

    In m the bound is the same for every schedule. Averaging over [eps, 1] instead of integrating
    over [0, 1] adds eps/(1 - eps) of the mean and drops the piece below eps, about
    eps * sum_l -log p(x^l | all other tokens), which is smaller: the estimate errs upward, as a
    bound should, by O(eps). (Drawn in t on [eps, 1], the linear schedule would drop the piece below
    m(eps) ~ 7 eps and end below -log p.) For log-linear, m = t: the same draws as in t.
    Returns (mean over the k draws, conservative variance of that mean), both shaped (B,)."""
    if k < 1:
        raise ValueError(f"need k >= 1 time samples, got {k}")
    with eval_mode(model):
        u, noise = _uniforms(x0, k, generator, uniforms)
        rates = _strata_times(u, k, model.cfg.noise_eps, x0.device)
        draws = []
        for j in range(k):
            m = rates[:, j]
            nll, _ = model.token_nll(x0, model.schedule.time_of_mask_prob(m), generator, noise[j])
            draws.append((1.0 / m).double() * _masked_sum(nll, valid).double())  # as 1/t was (log-linear)
    return _mean_and_var(draws)


def discrete_coefficients(model: MDLM, steps: int) -> torch.Tensor:
    """c_i = (alpha_s - alpha_t) / (1 - alpha_t) for t = i/T, s = (i-1)/T, i = 1..T (float64):
    the probability that a token masked at t is revealed by the step to s."""
    i = torch.arange(1, steps + 1, dtype=torch.float64)
    m_t, m_s = model.schedule.mask_prob(i / steps), model.schedule.mask_prob((i - 1) / steps)
    return (m_t - m_s) / m_t


@torch.no_grad()
def mdlm_discrete_nelbo(model: MDLM, x0: torch.Tensor, steps: int, k: int,
                        generator: torch.Generator | None = None,
                        valid: torch.Tensor | None = None, uniforms: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Discrete-time NELBO with T = steps (the exact bound of the T-step ancestral sampler):
    sum_i c_i E[sum_masked -log p(x0 | z_{t_i})], estimated by drawing k stratified step indices
    per sequence and scaling by T; with k = T every step is visited exactly once."""
    if steps < 1 or k < 1:
        raise ValueError(f"need steps >= 1 and k >= 1, got steps={steps}, k={k}")
    coef = discrete_coefficients(model, steps)
    with eval_mode(model):
        u, noise = _uniforms(x0, k, generator, uniforms)
        strata = (torch.arange(k, dtype=torch.float64)[None] + u) / k
        idx = (strata * steps).floor().long().clamp_(0, steps - 1)  # step i = idx + 1
        draws = []
        for j in range(k):
            t = ((idx[:, j] + 1).double() / steps).to(x0.device, torch.float32)
            nll, _ = model.token_nll(x0, t, generator, noise[j])
            draws.append(steps * coef[idx[:, j]].to(x0.device) * _masked_sum(nll, valid).double())
    return _mean_and_var(draws)


@torch.no_grad()
def ar_nll(model: AutoregressiveLM, x0: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Exact NLL per sequence (sum over the L - 1 predicted tokens)."""
    with eval_mode(model):
        nll = model.token_nll(x0)
    return _masked_sum(nll, valid[:, 1:] if valid is not None else None).double()
