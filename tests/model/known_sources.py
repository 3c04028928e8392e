"""Sources whose likelihood is known exactly, and their exact denoisers p(x^l | z).

An exact denoiser is a backbone stand-in: (tokens (B, L), sigma) -> logits (B, L, V + 1) whose
softmax over the V data tokens is the true posterior of each position given the unmasked ones
(the [MASK] column is overwritten by zero-masking)."""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from model.config import ModelConfig
from model.mdlm import MDLM


def exact_mdlm(denoiser: nn.Module, vocab: int, schedule: str = "loglinear", eps: float = 1e-3) -> MDLM:
    cfg = ModelConfig(preset="custom", vocab_size=vocab + 1, mask_token_id=vocab,
                      noise_schedule=schedule, noise_eps=eps)
    cfg.validate()
    return MDLM(cfg, backbone=denoiser)


class UnigramDenoiser(nn.Module):
    """i.i.d. tokens: the posterior of a masked token is the unigram whatever z is."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.register_buffer("log_p", torch.cat([probs.double().log(), torch.zeros(1, dtype=torch.float64)]))

    def forward(self, z: torch.Tensor, sigma=None) -> torch.Tensor:
        return self.log_p.expand(*z.shape, -1).clone()

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        return -self.log_p[x].sum(dim=1)


class MarkovChain(nn.Module):
    """x_0 ~ init, x_l ~ P[x_{l-1}]. By the Markov property the posterior of a masked x_l depends only
    on the nearest unmasked tokens left (x_a) and right (x_b):
    p(x_l = v | z) ∝ P^{l-a}[x_a, v] P^{b-l}[v, x_b], with the marginal init P^l when there is no
    unmasked token to the left and no right factor when there is none to the right."""

    def __init__(self, transition: torch.Tensor, init: torch.Tensor, length: int):
        super().__init__()
        v = transition.shape[0]
        self.vocab, self.length = v, length
        P = transition.double()
        pows = [torch.eye(v, dtype=torch.float64)]
        for _ in range(length):
            pows.append(pows[-1] @ P)
        self.register_buffer("P", P)
        self.register_buffer("pows", torch.stack(pows))                       # (L+1, V, V)
        marg = [init.double()]
        for _ in range(length - 1):
            marg.append(marg[-1] @ P)
        self.register_buffer("marg", torch.stack(marg))                       # (L, V)
        self.register_buffer("init", init.double())

    def forward(self, z: torch.Tensor, sigma=None) -> torch.Tensor:
        b, length = z.shape
        mask_id = self.vocab
        pos = torch.arange(length, device=z.device).expand(b, length)
        known = z != mask_id
        left = torch.where(known, pos, torch.full_like(pos, -1)).cummax(dim=1).values
        right = torch.where(known, pos, torch.full_like(pos, length)).flip(1).cummin(dim=1).values.flip(1)
        zc = z.clamp_max(self.vocab - 1)
        has_left, has_right = left >= 0, right < length
        a, r = left.clamp_min(0), right.clamp_max(length - 1)
        left_f = self.pows[(pos - a).clamp_min(0), zc.gather(1, a)]            # P^{l-a}[x_a, :]
        left_f = torch.where(has_left[..., None], left_f, self.marg[pos])
        right_f = self.pows.transpose(1, 2)[(r - pos).clamp_min(0), zc.gather(1, r)]  # P^{b-l}[:, x_b]
        right_f = torch.where(has_right[..., None], right_f, torch.ones_like(right_f))
        logits = (left_f * right_f).clamp_min(1e-300).log()
        return torch.cat([logits, torch.zeros(b, length, 1, dtype=logits.dtype, device=z.device)], dim=-1)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        x = torch.empty(n, self.length, dtype=torch.long)
        x[:, 0] = torch.multinomial(self.init.expand(n, -1), 1, generator=generator)[:, 0]
        for i in range(1, self.length):
            x[:, i] = torch.multinomial(self.P[x[:, i - 1]], 1, generator=generator)[:, 0]
        return x

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Exact -log p(x) per sequence."""
        return -(self.init[x[:, 0]].log() + self.P[x[:, :-1], x[:, 1:]].log().sum(dim=1))

    def entropy(self, first: int = 0) -> float:
        """Exact entropy (nats) of x_first..x_{L-1} given x_0..x_{first-1} (first = 0: the whole sequence)."""
        row_h = -(self.P * self.P.log()).sum(dim=1)
        h = float(-(self.init * self.init.log()).sum()) if first == 0 else 0.0
        return h + sum(float(self.marg[l - 1] @ row_h) for l in range(max(first, 1), self.length))


def mask_patterns(length: int) -> torch.Tensor:
    """All 2^L subsets as a (2^L, L) bool tensor."""
    return torch.tensor(list(itertools.product([False, True], repeat=length)))


def exact_masked_ce(denoiser: nn.Module, x: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every sequence and every mask set S: sum_{l in S} -log p(x^l | x with S masked).
    Returns (CE (B, 2^L), |S| (2^L,))."""
    b, length = x.shape
    pats = mask_patterns(length)
    z = torch.where(pats[None], torch.full_like(x[:, None].expand(-1, len(pats), -1), vocab), x[:, None])
    logits = denoiser(z.reshape(-1, length)).double()[..., :vocab].log_softmax(-1)
    lp = logits.gather(-1, x.repeat_interleave(len(pats), 0)[..., None]).squeeze(-1).view(b, len(pats), length)
    ce = -(lp * pats[None]).sum(-1)
    return ce, pats.sum(-1)


def exact_continuous_nelbo(ce: torch.Tensor, k: torch.Tensor, length: int) -> torch.Tensor:
    """∫_0^1 (1/m) E_{S ~ rate m}[CE_S] dm = sum_S CE_S B(|S|, L - |S| + 1) (|S| >= 1)."""
    beta = torch.tensor([0.0] + [math.exp(math.lgamma(j) + math.lgamma(length - j + 1) - math.lgamma(length + 1))
                                 for j in range(1, length + 1)], dtype=torch.float64)
    return (ce * beta[k]).sum(-1)


def exact_truncated_nelbo(ce: torch.Tensor, k: torch.Tensor, length: int, eps: float, n: int = 200_000) -> torch.Tensor:
    """What the continuous estimator averages, exactly: the mean over mask rates m uniform on
    [eps, 1] of (1/m) E_{S ~ rate m}[CE_S] (the midpoint rule on n points)."""
    m = eps + (1 - eps) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    kk = k.double()
    inner = (m[:, None] ** (kk[None] - 1) * (1 - m[:, None]) ** (length - kk[None])).mean(0)  # (2^L,)
    inner[k == 0] = 0.0
    return ce @ inner


def exact_discrete_nelbo(ce: torch.Tensor, k: torch.Tensor, length: int, model: MDLM, steps: int) -> torch.Tensor:
    """sum_i c_i E_{S ~ rate m(t_i)}[CE_S], t_i = i/T, with the model's schedule."""
    from model.likelihood import discrete_coefficients

    coef = discrete_coefficients(model, steps)
    m = model.schedule.mask_prob(torch.arange(1, steps + 1, dtype=torch.float64) / steps)
    kk = k.double()
    probs = m[:, None] ** kk[None] * (1 - m[:, None]) ** (length - kk[None])   # (T, 2^L)
    return ((coef[:, None] * probs) @ ce.T).sum(0)
