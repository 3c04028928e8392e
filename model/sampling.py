"""Ancestral sampling of MDLM (with caching) and of the AR baseline.

Categorical draws are inverse-CDF draws with float64 uniforms and float64 cumulative sums (fp32
noise lowers diversity and fakes good gen-PPL). Uniforms come from a CPU generator, so a seed gives
the same samples on any device. Both samplers run the model in eval mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .mdlm import MDLM, AutoregressiveLM, eval_mode, model_device


@dataclass
class SampleResult:
    tokens: torch.Tensor
    network_calls: int


def _uniform(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(shape, dtype=torch.float64, generator=generator).to(device)


def categorical(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of (N, V) log-probabilities, in float64."""
    probs = (log_probs.double() - log_probs.double().amax(dim=-1, keepdim=True)).exp()
    cdf = probs.cumsum(dim=-1)
    u = _uniform((probs.shape[0], 1), generator, probs.device) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)
    # u * total can round up to total: never return a zero-probability token for it
    bad = probs.gather(-1, idx[:, None]).squeeze(-1) == 0
    return torch.where(bad, probs.argmax(dim=-1), idx)


def nucleus(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose mass reaches top_p (renormalised log-probs)."""
    if top_p >= 1.0:
        return log_probs
    if not 0.0 < top_p:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    log_probs = log_probs.double().log_softmax(dim=-1)
    sorted_lp, order = log_probs.sort(dim=-1, descending=True)
    probs = sorted_lp.exp()
    drop = probs.cumsum(dim=-1) - probs >= top_p
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    out = torch.full_like(log_probs, float("-inf")).scatter(-1, order, sorted_lp)
    return out.log_softmax(dim=-1)


def _prompt_canvas(prompt: torch.Tensor | None, num_samples: int, length: int, mask_id: int,
                   device) -> torch.Tensor:
    x = torch.full((num_samples, length), mask_id, dtype=torch.long, device=device)
    if prompt is None:
        return x
    prompt = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[0] not in (1, num_samples):
        raise ValueError(f"prompt must be shaped (P,), (1, P) or ({num_samples}, P), got {tuple(prompt.shape)}")
    if prompt.shape[1] > length:
        raise ValueError(f"prompt has {prompt.shape[1]} tokens but the sample length is {length}: "
                         "raise the length or shorten the prompt")
    x[:, :prompt.shape[1]] = prompt
    return x


@torch.no_grad()
def mdlm_ancestral(model: MDLM, num_samples: int, length: int, steps: int, *,
                   generator: torch.Generator | None = None, prompt: torch.Tensor | None = None,
                   use_cache: bool = True, top_p: float = 1.0, device=None) -> SampleResult:
    """Reverse process over `steps` uniform steps from t = 1 (all [MASK]) to t = 0.

    From t to s a masked position is revealed with probability (alpha_s - alpha_t)/(1 - alpha_t)
    and drawn from p_theta(. | z_t); the last step (s = 0) reveals every remaining position, so no
    argmax clean-up is needed. `prompt` (P <= length tokens) fixes the first P positions; [MASK]
    entries in it are left to the model (infilling); fixed tokens are never changed (carry-over).
    A step that reveals nothing leaves z unchanged, so without time conditioning the next step
    reuses the network output: at most min(steps, num_samples * length) calls (min(steps, length)
    for one sample), and exactly the samples of `use_cache=False`."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"the number of sampling steps T must be an integer >= 1, got {steps}")
    if length < 1 or num_samples < 1:
        raise ValueError(f"need length >= 1 and num_samples >= 1, got {length} and {num_samples}")
    device = device or model_device(model)
    mask_id = model.mask_id
    x = _prompt_canvas(prompt, num_samples, length, mask_id, device)
    cache_ok = use_cache and not model.cfg.time_conditioning
    sched = model.schedule
    cached = None
    calls = 0
    with eval_mode(model):
        for i in range(steps):
            masked = x == mask_id
            if not masked.any():
                break
            t = torch.tensor(1.0 - i / steps, dtype=torch.float64)
            s = torch.tensor(1.0 - (i + 1) / steps, dtype=torch.float64)
            if cached is None:
                # only masked positions are ever drawn from, so the carry-over rows of SUBS are not
                # built: log-softmax in place keeps one (B, L, V) tensor alive
                cached = model.logits(x, torch.full((num_samples,), float(t), device=device))
                cached -= cached.logsumexp(dim=-1, keepdim=True)
                calls += 1
            m_t, m_s = sched.mask_prob(t).item(), sched.mask_prob(s).item() if i + 1 < steps else 0.0
            reveal = masked & (_uniform(x.shape, generator, device) < 1.0 - m_s / m_t)
            changed = bool(reveal.any())
            if changed:
                x = x.clone()
                x[reveal] = categorical(nucleus(cached[reveal], top_p), generator)
            if changed or not cache_ok:
                cached = None
    return SampleResult(x, calls)


@torch.no_grad()
def ar_sample(model: AutoregressiveLM, num_samples: int, length: int, bos_id: int, *,
              generator: torch.Generator | None = None, top_p: float = 1.0, device=None) -> SampleResult:
    """Plain AR decoding from BOS (no KV cache yet): one network call per generated token."""
    if length < 1 or num_samples < 1:
        raise ValueError(f"need length >= 1 and num_samples >= 1, got {length} and {num_samples}")
    device = device or model_device(model)
    x = torch.full((num_samples, 1), bos_id, dtype=torch.long, device=device)
    with eval_mode(model):
        for _ in range(length - 1):
            lp = model.backbone(x)[:, -1].float().log_softmax(-1)
            x = torch.cat([x, categorical(nucleus(lp, top_p), generator)[:, None]], dim=1)
    return SampleResult(x, length - 1)
