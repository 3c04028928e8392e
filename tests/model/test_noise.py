import math

import pytest
import torch

from model.likelihood import antithetic_times
from model.noise import SCHEDULES, make_schedule, step_rows, stratified_times

EPS = 1e-3
T = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


def test_loglinear_weight_is_one_over_t_exactly():
    s = make_schedule("loglinear", EPS)
    t = torch.rand(1000, dtype=torch.float64) * (1 - EPS) + EPS
    assert torch.equal(s.weight(t), 1.0 / t)
    assert torch.equal(s.mask_prob(t), t)
    # the generic formula -alpha'/(1-alpha) agrees
    generic = -s.alpha_prime(t) / (1.0 - s.alpha(t))
    torch.testing.assert_close(generic, 1.0 / t, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_alpha_prime_and_weight_match_finite_differences(name):
    s = make_schedule(name, EPS)
    h = 1e-6
    fd_alpha = (s.alpha(T + h) - s.alpha(T - h)) / (2 * h)
    torch.testing.assert_close(s.alpha_prime(T), fd_alpha, rtol=1e-7, atol=1e-9)
    fd_weight = -fd_alpha / (1.0 - s.alpha(T))
    torch.testing.assert_close(s.weight(T), fd_weight, rtol=1e-7, atol=0)
    # the weight is also d/dt log m(t) of the normalised mask rate that corrupt() uses
    fd_log_m = (s.mask_prob(T + h).log() - s.mask_prob(T - h).log()) / (2 * h)
    torch.testing.assert_close(s.weight(T), fd_log_m, rtol=1e-7, atol=0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_endpoints(name):
    s = make_schedule(name, EPS)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.alpha(ends), torch.tensor([1.0, EPS], dtype=torch.float64))
    torch.testing.assert_close(s.mask_prob(ends), torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert s.mask_prob(torch.tensor(1.0)).item() == 1.0  # float32 t = 1 masks everything
    m = s.mask_prob(T)
    assert bool((m[1:] > m[:-1]).all())
    torch.testing.assert_close(s.sigma(T), -s.alpha(T).log())


def _time_at_mask_rate(s, m: float) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if s.mask_prob(torch.tensor(mid, dtype=torch.float64)).item() < m:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def test_schedules_differ_in_time_but_agree_per_unit_mask_rate():
    """The continuous NELBO is schedule-invariant: w(t) dt = dm / m for every schedule."""
    scheds = {name: make_schedule(name, EPS) for name in SCHEDULES}
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    rates = {name: s.mask_prob(t) for name, s in scheds.items()}
    # at equal t the schedules mask different fractions...
    assert bool((rates["cosine"] < rates["loglinear"]).all())
    assert bool((rates["linear"] > rates["loglinear"]).all())
    # ...but at equal mask rate m the weight per unit of m is 1/m for all of them
    h = 1e-7
    for m in (0.1, 0.5, 0.9):
        for s in scheds.values():
            ts = torch.tensor(_time_at_mask_rate(s, m), dtype=torch.float64)
            dm_dt = (s.mask_prob(ts + h) - s.mask_prob(ts - h)) / (2 * h)
            assert s.weight(ts).item() / dm_dt.item() == pytest.approx(1.0 / m, rel=1e-5)


def test_unknown_schedule_and_bad_eps_fail_clearly():
    with pytest.raises(ValueError, match="unknown noise schedule 'sqrt'"):
        make_schedule("sqrt")
    with pytest.raises(ValueError, match="eps"):
        make_schedule("loglinear", 0.0)


def _strata(t: torch.Tensor, n: int) -> torch.Tensor:
    return ((t.double() - EPS) / (1 - EPS) * n).floor().long()


@pytest.mark.parametrize("n", [1, 7, 64, 512])
def test_stratified_times_hold_one_time_per_stratum(n):
    for seed in range(5):
        t = stratified_times(n, EPS, torch.Generator().manual_seed(seed))
        assert t.shape == (n,) and t.dtype == torch.float32
        assert bool(((t >= EPS) & (t <= 1.0)).all())
        assert torch.equal(_strata(t, n), torch.arange(n))


def test_stratified_times_are_uniform_and_seeded():
    g = torch.Generator().manual_seed(0)
    firsts = torch.stack([stratified_times(4, EPS, g)[0] for _ in range(4000)]).double()
    # t_0 is uniform on the first stratum [eps, eps + (1-eps)/4)
    u = (firsts - EPS) / ((1 - EPS) / 4)
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / 4000)
    assert abs(u.var().item() - 1 / 12) < 0.01
    a = stratified_times(8, EPS, torch.Generator().manual_seed(3))
    assert torch.equal(a, stratified_times(8, EPS, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, stratified_times(8, EPS, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("world,accum,micro", [(1, 1, 16), (2, 4, 4), (4, 2, 2), (8, 1, 1)])
def test_the_trainers_rows_by_rank_and_accumulation_cover_the_strata(world, accum, micro):
    n = world * accum * micro
    t = stratified_times(n, EPS, torch.Generator().manual_seed(11))
    seen = []
    for step in range(accum):
        for rank in range(world):
            rows = step_rows(step, micro, world, rank)  # what Trainer.train_step takes
            assert torch.equal(_strata(t[rows], n), rows)
            seen.append(rows)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(n))
    if world > 1 and micro > 1:  # a micro-batch spreads over the strata, W apart
        assert torch.equal(step_rows(0, micro, world, 0), torch.arange(micro) * world)


def test_per_sequence_antithetic_times_cover_their_strata():
    t = antithetic_times(32, 5, EPS, torch.Generator().manual_seed(0), "cpu")
    assert t.shape == (32, 5)
    assert torch.equal(_strata(t, 5), torch.arange(5).expand(32, 5))
    assert len(set(t[:, 0].tolist())) == 32  # each sequence has its own offset


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("eps", [1e-3, 0.05])
def test_time_of_mask_prob_inverts_the_mask_rate(name, eps):
    sched = make_schedule(name, eps)
    m = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    t = sched.time_of_mask_prob(m)
    assert t.dtype == torch.float64 and t.min() >= 0 and t.max() <= 1
    torch.testing.assert_close(sched.mask_prob(t), m, rtol=0, atol=1e-9)
    assert torch.all(t[1:] > t[:-1])  # increasing: more masking is later
