"""Noise schedules of the absorbing (masking) forward process.

alpha_t is the probability that a token is still unmasked at time t (alpha_0 = 1, alpha_1 = eps as in
the reference). Tokens are masked with the normalised rate m(t) = (1 - alpha_t) / (1 - alpha_1), so
that t = 1 is all-[MASK], the state the sampler starts from and the prior of the bound; without it
the bound would miss the piece of the integral between mask rates 1 - eps and 1 (it would sit
below -log p by O(eps)). The normalisation leaves the NELBO weight unchanged,
w(t) = m'(t)/m(t) = -alpha'_t / (1 - alpha_t), and for log-linear m(t) = t and w(t) = 1/t exactly.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch


class NoiseSchedule(ABC):
    name = "base"

    def __init__(self, eps: float = 1e-3):
        if not 0.0 < eps < 1.0:
            raise ValueError(f"noise eps must be in (0, 1), got {eps}")
        self.eps = eps

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Probability that a token is still unmasked at time t (before normalisation)."""

    @abstractmethod
    def alpha_prime(self, t: torch.Tensor) -> torch.Tensor:
        """d alpha_t / dt."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """m(t) = (1 - alpha_t) / (1 - alpha_1): 0 at t = 0, exactly 1 at t = 1."""
        one = torch.ones((), dtype=t.dtype if t.is_floating_point() else torch.float64, device=t.device)
        return (1.0 - self.alpha(t)) / (1.0 - self.alpha(one))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """NELBO weight -alpha'_t / (1 - alpha_t) = d/dt log m(t)."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))

    def mean_mask_prob(self, t_min: float) -> float:
        """E[m(t)] for t uniform on [t_min, 1] (the training times): the expected fraction of
        tokens that are masked, by the midpoint rule on a fine grid."""
        n = 4096
        t = t_min + (1.0 - t_min) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
        return float(self.mask_prob(t).mean())

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Total noise -log(alpha_t): the timestep fed to a time-conditioned backbone."""
        return -torch.log(self.alpha(t))

    @abstractmethod
    def time_of_alpha(self, a: torch.Tensor) -> torch.Tensor:
        """The t at which alpha_t = a (the inverse of alpha on [0, 1])."""

    def time_of_mask_prob(self, m: torch.Tensor) -> torch.Tensor:
        """The t at which m(t) = m, computed in float64: the likelihood bound draws mask rates and
        needs the time only to condition a time-conditioned backbone."""
        one = torch.ones((), dtype=torch.float64, device=m.device)
        a = 1.0 - m.double() * (1.0 - self.alpha(one))
        return self.time_of_alpha(a).clamp(0.0, 1.0).to(m.dtype)


class LogLinear(NoiseSchedule):
    """1 - alpha_t = (1 - eps) t."""

    name = "loglinear"

    def alpha(self, t):
        return 1.0 - (1.0 - self.eps) * t

    def alpha_prime(self, t):
        return torch.full_like(t, -(1.0 - self.eps))

    def mask_prob(self, t):
        return t.clone()

    def weight(self, t):
        return 1.0 / t

    def time_of_alpha(self, a):
        return (1.0 - a) / (1.0 - self.eps)

    def time_of_mask_prob(self, m):
        return m.clone()


class Cosine(NoiseSchedule):
    """alpha_t = eps + (1 - eps) cos(pi t / 2)."""

    name = "cosine"

    def alpha(self, t):
        return self.eps + (1.0 - self.eps) * torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t):
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def time_of_alpha(self, a):
        return torch.arccos(((a - self.eps) / (1.0 - self.eps)).clamp(-1.0, 1.0)) * (2.0 / math.pi)


class Linear(NoiseSchedule):
    """alpha_t = exp(-sigma(t)) with sigma linear in t from 0 to -log(eps)."""

    name = "linear"

    def alpha(self, t):
        return torch.exp(t * math.log(self.eps))

    def alpha_prime(self, t):
        return math.log(self.eps) * torch.exp(t * math.log(self.eps))

    def time_of_alpha(self, a):
        return torch.log(a) / math.log(self.eps)


SCHEDULES = {cls.name: cls for cls in (LogLinear, Cosine, Linear)}


def make_schedule(name: str, eps: float = 1e-3) -> NoiseSchedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule '{name}'; choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name](eps)


def stratified_times(n: int, eps: float, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    """Stratified times for a whole global batch: t_i = eps + (1 - eps) * (i + u) / n, one shared u.

    Entry i lies in the i-th of n equal strata of [eps, 1], so any split of the global batch into
    disjoint rows (rank, accumulation step: step_rows) takes disjoint strata that together cover [eps, 1]."""
    if n < 1:
        raise ValueError(f"need at least one time, got n={n}")
    u = torch.rand((), generator=generator, dtype=torch.float64)
    t = (torch.arange(n, dtype=torch.float64) + u) / n
    return (eps + (1.0 - eps) * t).to(device=device, dtype=torch.float32)


def step_rows(micro: int, micro_batch: int, dp_world: int, dp_rank: int) -> torch.Tensor:
    """Rows of a step's global noise (stratified_times, and the per-token draws) that one micro-
    batch of one data-parallel rank takes: its local sample k is global sample k * W + rank, as the
    data stream's split_by=sample order has it. Over every rank and micro-batch they cover each
    row once, and every micro-batch spreads over the strata instead of taking a contiguous run."""
    return torch.arange(micro * micro_batch, (micro + 1) * micro_batch) * dp_world + dp_rank
