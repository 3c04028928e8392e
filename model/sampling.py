"""Samplers for MDLM (ancestral, cached, semi-autoregressive, confidence-ordered) and the AR baseline.

One entry point, `generate(model, num_samples, length, sampler=..., ...)`, picks among them; the
functions below it can be called directly too.

- "ancestral": T uniform steps from t = 1 to t = 0; a network call at every step.
- "cached": the same draws, but a sample is run through the network only at the steps that
  reveal some of its tokens: a step runs the backbone on that sub-batch, so each sample costs at
  most min(T, L) network evaluations. Exact with time conditioning too (the output is computed at
  the step's t, when it is used).
- "semi-ar": blocks of `block_size` tokens generated one after the other; each block keeps the
  last `carry` tokens of what is already generated as a fixed prefix (carry-over), so the output
  can be longer than the training context.
- "confidence": k_i tokens per step (k_i follows the noise schedule), at the masked positions where
  the model is most confident (largest top probability).
A prompt puts known tokens in place (a [MASK] entry in it is left to the model: infilling); known
tokens are never changed. Categorical draws are inverse-CDF draws with float64 uniforms and float64
cumulative sums (fp32 noise lowers diversity and fakes good gen-PPL); uniforms come from a CPU
generator, so a seed gives the same samples on any device. Samplers run the model in eval mode.

Network cost is reported two ways: `network_calls`, the number of batched forward passes, and
`rows_evaluated`, the number of sequences those passes ran on; `calls_per_sample` has the count of
each sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .mdlm import MDLM, AutoregressiveLM, eval_mode, model_device

SAMPLERS = ("ancestral", "cached", "semi-ar", "confidence")
FINAL_STEPS = ("sample", "argmax")


@dataclass
class SampleResult:
    tokens: torch.Tensor
    network_calls: int                      # batched forward passes
    rows_evaluated: int = 0                 # sequences run through the network, over all passes
    calls_per_sample: torch.Tensor | None = field(default=None, repr=False)  # (N,) passes per sample
    blocks: int = 1                         # semi-AR windows (1 otherwise)

    @property
    def max_calls_per_sample(self) -> int:
        if self.calls_per_sample is None or self.calls_per_sample.numel() == 0:
            return self.network_calls
        return int(self.calls_per_sample.max())

    def stats(self) -> dict:
        return {"network_calls": self.network_calls, "rows_evaluated": self.rows_evaluated,
                "max_calls_per_sample": self.max_calls_per_sample, "blocks": self.blocks}


class _Counter:
    def __init__(self, num_samples: int):
        self.calls, self.rows = 0, 0
        self.per_sample = torch.zeros(num_samples, dtype=torch.long)

    def add(self, rows: torch.Tensor | None) -> None:
        self.calls += 1
        if rows is None:
            self.rows += self.per_sample.numel()
            self.per_sample += 1
        else:
            rows = rows.cpu()
            self.rows += rows.numel()
            self.per_sample[rows] += 1

    def result(self, tokens: torch.Tensor, blocks: int = 1) -> SampleResult:
        return SampleResult(tokens, self.calls, self.rows, self.per_sample, blocks)


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


IMPOSSIBLE_LOG_PROB = -1e4  # exp() of it is 0 in float64


@dataclass(frozen=True)
class Decoding:
    """How tokens are drawn from the model's distribution: temperature (p^(1/T), renormalised),
    then nucleus truncation to top_p."""
    top_p: float = 1.0
    temperature: float = 1.0

    def log_probs(self, log_probs: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            # a probability that is 0 in any float (the [MASK] token's NEG_INF logit) stays 0 at any
            # temperature: -1e6 / 1e6 would otherwise make it a likely token
            impossible = log_probs < IMPOSSIBLE_LOG_PROB
            log_probs = (log_probs.double() / self.temperature).masked_fill(impossible, float("-inf"))
            log_probs = log_probs.log_softmax(dim=-1)
        return nucleus(log_probs, self.top_p)


def _draw(log_probs: torch.Tensor, decoding: Decoding, generator) -> torch.Tensor:
    return categorical(decoding.log_probs(log_probs), generator)


# ----------------------------------------------------------------------------- argument checks

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or \
        isinstance(value, float) and value.is_integer()


def check_steps(steps) -> None:
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"the number of sampling steps T must be an integer >= 1, got {steps}")


def check_sampler_args(*, sampler: str = "cached", steps=1, num_samples: int = 1, length: int = 1,
                       prompt_length: int = 0, block_size: int | None = None, carry: int | None = None,
                       top_p: float = 1.0, final: str = "sample", objective: str = "mdlm",
                       temperature: float = 1.0) -> None:
    """Every check that needs no model: raises ValueError with a message naming the argument."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}': choose one of {', '.join(SAMPLERS)}")
    if objective == "mdlm":
        check_steps(steps)
    if not _is_int(length) or length < 1 or not _is_int(num_samples) or num_samples < 1:
        raise ValueError(f"need length >= 1 and num_samples >= 1, got {length} and {num_samples}")
    if prompt_length > length:
        raise ValueError(f"prompt has {prompt_length} tokens but the sample length is {length}: "
                         "raise the length or shorten the prompt")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (isinstance(temperature, (int, float)) and 0.0 < temperature < float("inf")):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if final not in FINAL_STEPS:
        raise ValueError(f"final step must be one of {', '.join(FINAL_STEPS)}, got '{final}'")
    if sampler == "semi-ar" and objective == "mdlm":
        if block_size is None or not _is_int(block_size) or block_size < 2:
            raise ValueError(f"the semi-ar sampler needs a block size >= 2, got {block_size}")
        if carry is not None and not (_is_int(carry) and 0 <= carry < block_size):
            raise ValueError(f"carry must be in [0, block size {block_size}), got {carry}")


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


# ----------------------------------------------------------------------------- MDLM

def _logits_at(model: MDLM, x: torch.Tensor, t: float, positions: torch.Tensor) -> torch.Tensor:
    """fp32 logits (zero-masked) of the positions selected by the boolean (B, L) `positions`, in
    row-major order: (K, V); a DiT runs its output head on those positions only (with V >> d the
    head is most of a small model's cost)."""
    return model.logits(x, torch.full((x.shape[0],), t, device=x.device), positions=positions)


class _Denoiser:
    """log p_theta(. | z) at chosen positions of chosen rows: one batched pass per call, on the
    sub-batch of rows asked for.

    Caching without storing anything: a sample's output is used only at the steps that reveal
    some of its tokens (which positions a step reveals is drawn before the network runs), so only
    those rows run, at the step's t: the numbers of the uncached sampler, time-conditioned or not.
    Without the cache every step runs every sample that is still masked."""

    def __init__(self, model: MDLM, num_samples: int, use_cache: bool, counter: _Counter):
        self.model = model
        self.cache_ok = use_cache
        self.counter = counter

    def rows_to_run(self, pending: torch.Tensor, changing: torch.Tensor) -> torch.Tensor:
        return changing if self.cache_ok else pending

    def __call__(self, x: torch.Tensor, t: float, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(K, V) log-probs at `positions` (boolean (B, L), only inside `rows`), row-major order."""
        if not rows.any():
            return torch.empty((0, self.model.cfg.vocab_size), device=x.device)
        if bool(rows.all()):
            out = _logits_at(self.model, x, t, positions)
            self.counter.add(None)
        else:
            idx = rows.nonzero().squeeze(1)
            out = _logits_at(self.model, x[idx], t, positions[idx])
            self.counter.add(idx)
        return out.log_softmax(dim=-1)


def _time_grid(model: MDLM, steps: int, final: str) -> list[float]:
    """t_0 = 1 > ... > t_T, uniform. Down to 0 (the last step reveals every remaining position: the
    exact ancestral sampler), or with final="argmax" down to eps, after which, as in the MDLM
    reference's noise removal, one more pass fills whatever is still masked (about m(eps) of the
    positions) with the argmax."""
    end = model.cfg.noise_eps if final == "argmax" else 0.0
    return [1.0 - (1.0 - end) * i / steps for i in range(steps + 1)]


def _fill_with_argmax(x: torch.Tensor, t: float, denoiser: _Denoiser, mask_id: int) -> torch.Tensor:
    masked = x == mask_id
    rows = masked.any(dim=1)
    if not rows.any():
        return x
    lp = denoiser(x, t, rows, masked)
    x = x.clone()
    x[masked] = lp.argmax(dim=-1)
    return x


def _denoise_ancestral(model: MDLM, x: torch.Tensor, steps: int, generator, decoding: Decoding,
                       denoiser: _Denoiser, final: str) -> torch.Tensor:
    """Reverse process over `steps` uniform steps on the canvas x (known tokens + [MASK])."""
    mask_id, sched = model.mask_id, model.schedule
    grid = _time_grid(model, steps, final)
    for i in range(steps):
        masked = x == mask_id
        pending = masked.any(dim=1)
        if not pending.any():
            break
        t = torch.tensor(grid[i], dtype=torch.float64)
        s = torch.tensor(grid[i + 1], dtype=torch.float64)
        m_t = sched.mask_prob(t).item()
        m_s = sched.mask_prob(s).item() if grid[i + 1] > 0 else 0.0
        # the uniforms of every position are drawn at every step, so the random stream (and the
        # samples) do not depend on which rows the cache skips
        reveal = masked & (_uniform(x.shape, generator, x.device) < 1.0 - m_s / m_t)
        changed = reveal.any(dim=1)
        lp = denoiser(x, float(t), denoiser.rows_to_run(pending, changed), reveal)
        if changed.any():
            x = x.clone()
            x[reveal] = _draw(lp, decoding, generator)
    return _fill_with_argmax(x, grid[-1], denoiser, mask_id) if final == "argmax" else x


def _denoise_confidence(model: MDLM, x: torch.Tensor, steps: int, generator, decoding: Decoding,
                        denoiser: _Denoiser, final: str) -> torch.Tensor:
    """k_i tokens per step at the masked positions with the largest top probability; the number
    still masked after step i follows the schedule: round(M * m(s_i) / m(1)) of the M masked."""
    mask_id, sched = model.mask_id, model.schedule
    grid = _time_grid(model, steps, final)
    total = (x == mask_id).sum(dim=1).double()
    m_1 = sched.mask_prob(torch.tensor(1.0, dtype=torch.float64)).item()
    for i in range(steps):
        masked = x == mask_id
        n_masked = masked.sum(dim=1)
        if not bool(n_masked.any()):
            break
        s = grid[i + 1]
        frac = sched.mask_prob(torch.tensor(s, dtype=torch.float64)).item() / m_1 if s > 0 else 0.0
        keep = torch.round(total * frac).long().to(n_masked.device)
        k = (n_masked - keep).clamp_min(0)
        changed = k > 0
        rows = denoiser.rows_to_run(n_masked > 0, changed)
        at = masked & rows[:, None]
        lp = denoiser(x, grid[i], rows, at)  # every masked position of the rows run
        if not changed.any():
            continue
        slot = torch.full(x.shape, -1, dtype=torch.long, device=x.device)
        slot[at] = torch.arange(lp.shape[0], device=x.device)
        conf = torch.full(x.shape, float("-inf"), device=x.device)
        conf[at] = lp.amax(dim=-1)
        order = conf.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1], device=x.device).expand_as(order))
        reveal = masked & (rank < k[:, None])
        x = x.clone()
        x[reveal] = _draw(lp[slot[reveal]], decoding, generator)
    return _fill_with_argmax(x, grid[-1], denoiser, mask_id) if final == "argmax" else x


_INNER = {"ancestral": _denoise_ancestral, "cached": _denoise_ancestral, "confidence": _denoise_confidence}


@torch.no_grad()
def mdlm_ancestral(model: MDLM, num_samples: int, length: int, steps: int, *,
                   generator: torch.Generator | None = None, prompt: torch.Tensor | None = None,
                   use_cache: bool = True, top_p: float = 1.0, device=None,
                   final: str = "sample", temperature: float = 1.0) -> SampleResult:
    """Reverse process over `steps` uniform steps from t = 1 (all [MASK]) to t = 0.

    From t to s a masked position is revealed with probability (alpha_s - alpha_t)/(1 - alpha_t)
    and drawn from p_theta(. | z_t); the last step (s = 0) reveals every remaining position. With
    final="argmax" the steps end at eps instead and one more pass fills the few positions still
    masked with the argmax (the MDLM reference's noise removal). `prompt` (P <= length tokens)
    fixes the first P positions; [MASK] entries in it are left to the model (infilling); fixed
    tokens are never changed. With `use_cache`, a sample that a step leaves unchanged is not run
    at that step: each sample takes part in at most
    min(steps, length) passes (one more with final="argmax"), and the samples are exactly those
    of `use_cache=False` for the same generator."""
    check_sampler_args(sampler="cached", steps=steps, num_samples=num_samples, length=length,
                       top_p=top_p, final=final, temperature=temperature)
    return _mdlm_run(model, num_samples, length, int(steps), _denoise_ancestral, generator=generator,
                     prompt=prompt, use_cache=use_cache, decoding=Decoding(top_p, temperature), device=device,
                     final=final)


@torch.no_grad()
def mdlm_confidence(model: MDLM, num_samples: int, length: int, steps: int, *,
                    generator: torch.Generator | None = None, prompt: torch.Tensor | None = None,
                    use_cache: bool = True, top_p: float = 1.0, device=None,
                    final: str = "sample", temperature: float = 1.0) -> SampleResult:
    """Confidence-ordered parallel unmasking (k tokens per step, see _denoise_confidence)."""
    check_sampler_args(sampler="confidence", steps=steps, num_samples=num_samples, length=length,
                       top_p=top_p, final=final, temperature=temperature)
    return _mdlm_run(model, num_samples, length, int(steps), _denoise_confidence, generator=generator,
                     prompt=prompt, use_cache=use_cache, decoding=Decoding(top_p, temperature), device=device,
                     final=final)


def _mdlm_run(model, num_samples, length, steps, inner, *, generator, prompt, use_cache, decoding,
              device, final) -> SampleResult:
    device = device or model_device(model)
    x = _prompt_canvas(prompt, num_samples, length, model.mask_id, device)
    counter = _Counter(num_samples)
    with eval_mode(model):
        x = inner(model, x, steps, generator, decoding, _Denoiser(model, num_samples, use_cache, counter), final)
    return counter.result(x)


def semi_ar_windows(length: int, block_size: int, carry: int) -> list[tuple[int, int]]:
    """[start, end) of each block: block i ends at min(B + i (B - carry), length) and starts B
    before its end (or at 0), so every block after the first keeps >= carry generated tokens as
    its fixed prefix and the last one is shifted left to use a full context."""
    windows, end = [], min(block_size, length)
    while True:
        windows.append((max(0, end - block_size), end))
        if end >= length:
            return windows
        end = min(end + block_size - carry, length)


@torch.no_grad()
def mdlm_semi_ar(model: MDLM, num_samples: int, length: int, steps: int, *, block_size: int,
                 carry: int | None = None, generator: torch.Generator | None = None,
                 prompt: torch.Tensor | None = None, use_cache: bool = True, top_p: float = 1.0,
                 device=None, final: str = "sample", inner: str = "cached",
                 temperature: float = 1.0) -> SampleResult:
    """Semi-autoregressive generation of any length: `steps` reverse steps per block of
    `block_size` positions; each block after the first starts with the last `carry` (default
    block_size // 2) tokens already generated, kept fixed by carry-over. Known tokens of the prompt
    anywhere in the output are kept too."""
    carry = block_size // 2 if carry is None and block_size is not None else carry
    check_sampler_args(sampler="semi-ar", steps=steps, num_samples=num_samples, length=length,
                       block_size=block_size, carry=carry, top_p=top_p, final=final, temperature=temperature)
    if inner not in _INNER:
        raise ValueError(f"inner sampler must be one of {', '.join(_INNER)}, got '{inner}'")
    device = device or model_device(model)
    x = _prompt_canvas(prompt, num_samples, length, model.mask_id, device)
    counter = _Counter(num_samples)
    windows = semi_ar_windows(length, int(block_size), int(carry))
    with eval_mode(model):
        for start, end in windows:
            denoiser = _Denoiser(model, num_samples, use_cache and inner != "ancestral", counter)
            x[:, start:end] = _INNER[inner](model, x[:, start:end].clone(), int(steps), generator,
                                            Decoding(top_p, temperature),
                                            denoiser, final)
    return counter.result(x, blocks=len(windows))


# ----------------------------------------------------------------------------- AR baseline

def _kv_capable(backbone) -> bool:
    from .dit import DiT

    return isinstance(backbone, DiT) and all(b.adaLN is None and b.causal for b in backbone.blocks)


class _KVCache:
    """Per-block key/value buffers for causal decoding with the DiT blocks (run step by step)."""

    def __init__(self, backbone, batch: int, max_len: int, device, dtype):
        cfg = backbone.cfg
        shape = (batch, cfg.n_heads, max_len, cfg.d_model // cfg.n_heads)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in backbone.blocks]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in backbone.blocks]
        self.len = 0


def _attend_cached(block, h: torch.Tensor, cos, sin, cache: _KVCache, layer: int) -> torch.Tensor:
    from .dit import apply_rotary

    b, l, d = h.shape
    qkv = block.attn_qkv(h).view(b, l, 3, block.n_heads, d // block.n_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    past = cache.len
    cache.k[layer][:, :, past:past + l] = k
    cache.v[layer][:, :, past:past + l] = v
    keys, values = cache.k[layer][:, :, :past + l], cache.v[layer][:, :, :past + l]
    if l == 1:
        out = F.scaled_dot_product_attention(q, keys, values)
    elif past == 0:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
    else:  # new query i sees the past and new keys <= i
        allowed = torch.ones(l, past + l, dtype=torch.bool, device=h.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
    return block.attn_out(out.transpose(1, 2).reshape(b, l, d))


def _forward_cached(backbone, tokens: torch.Tensor, cache: _KVCache) -> torch.Tensor:
    """Logits of the new `tokens` (B, l) given the cached prefix; appends their keys/values.
    Mirrors DiT.forward with causal, non-adaptive blocks (eval mode: no dropout)."""
    past, l = cache.len, tokens.shape[1]
    x = backbone.embed(tokens)
    cos, sin = backbone.rotary(past + l, tokens.device)
    cos, sin = cos[past:past + l], sin[past:past + l]
    for i, block in enumerate(backbone.blocks):
        x = x + _attend_cached(block, block.norm1(x), cos, sin, cache, i)
        x = x + block.mlp_out(F.gelu(block.mlp_in(block.norm2(x)), approximate="tanh"))
    cache.len = past + l
    return backbone.final(x, None).float().contiguous()  # as DiT.forward: the head may return a view


@torch.no_grad()
def ar_sample(model: AutoregressiveLM, num_samples: int, length: int, bos_id: int, *,
              generator: torch.Generator | None = None, top_p: float = 1.0, device=None,
              prompt: torch.Tensor | None = None, use_cache: bool = True,
              temperature: float = 1.0, banned_ids: tuple[int, ...] = ()) -> SampleResult:
    """AR decoding after BOS (and the prompt, if any): length - 1 - P new tokens, one network
    call each. With `use_cache` (a DiT backbone), keys and values of the prefix are kept per block
    and each call runs the new token only; otherwise every call reruns the whole prefix.
    `banned_ids` are never drawn (the data's [MASK] id: the AR model shares MDLM's vocabulary
    but never sees it)."""
    check_sampler_args(sampler="cached", num_samples=num_samples, length=length, top_p=top_p,
                       objective="ar", temperature=temperature)
    decoding = Decoding(top_p, temperature)
    device = device or model_device(model)
    x = torch.full((num_samples, 1), bos_id, dtype=torch.long, device=device)
    if prompt is not None:
        prompt = torch.as_tensor(prompt, dtype=torch.long, device=device)
        prompt = prompt[None] if prompt.dim() == 1 else prompt
        if prompt.dim() != 2 or prompt.shape[0] not in (1, num_samples):
            raise ValueError(f"prompt must be shaped (P,), (1, P) or ({num_samples}, P), got {tuple(prompt.shape)}")
        if prompt.shape[1] + 1 > length:
            raise ValueError(f"prompt has {prompt.shape[1]} tokens but the sample length is {length} "
                             "(BOS included): raise the length or shorten the prompt")
        x = torch.cat([x, prompt.expand(num_samples, -1)], dim=1)
    counter = _Counter(num_samples)
    new = length - x.shape[1]
    cached = use_cache and _kv_capable(model.backbone)
    with eval_mode(model):
        if cached and new > 0:
            p = next(model.backbone.parameters())
            cache = _KVCache(model.backbone, num_samples, length, device, p.dtype)
            logits = _forward_cached(model.backbone, x, cache)[:, -1]
        for j in range(new):
            if not cached:
                logits = model.backbone(x)[:, -1].float()
            counter.add(None)
            if banned_ids:
                logits[:, list(banned_ids)] = float("-inf")
            nxt = categorical(decoding.log_probs(logits.log_softmax(-1)), generator)[:, None]
            x = torch.cat([x, nxt], dim=1)
            if cached and j + 1 < new:
                logits = _forward_cached(model.backbone, nxt, cache)[:, -1]
    return counter.result(x)


# ----------------------------------------------------------------------------- one interface

@torch.no_grad()
def generate(model, num_samples: int, length: int, *, sampler: str = "cached", steps: int = 128,
             block_size: int | None = None, carry: int | None = None,
             prompt: torch.Tensor | None = None, top_p: float = 1.0,
             generator: torch.Generator | None = None, bos_id: int = 0, final: str = "sample",
             device=None, temperature: float = 1.0, banned_ids: tuple[int, ...] = ()) -> SampleResult:
    """Sample with any of SAMPLERS (MDLM) or, for an AutoregressiveLM, KV-cached AR decoding from
    BOS (`sampler` and `steps` then do not apply; `sampler="ancestral"` turns the KV cache off)."""
    if isinstance(model, AutoregressiveLM):
        check_sampler_args(sampler=sampler, num_samples=num_samples, length=length, top_p=top_p,
                           objective="ar", temperature=temperature)
        return ar_sample(model, num_samples, length, bos_id, generator=generator, top_p=top_p,
                         device=device, prompt=prompt, use_cache=sampler != "ancestral", temperature=temperature,
                         banned_ids=banned_ids)
    check_sampler_args(sampler=sampler, steps=steps, num_samples=num_samples, length=length,
                       block_size=block_size, carry=carry, top_p=top_p, final=final, temperature=temperature)
    common = {"generator": generator, "prompt": prompt, "top_p": top_p, "device": device, "final": final,
              "temperature": temperature}
    if sampler == "semi-ar":
        return mdlm_semi_ar(model, num_samples, length, steps, block_size=block_size, carry=carry, **common)
    if sampler == "confidence":
        return mdlm_confidence(model, num_samples, length, steps, **common)
    return mdlm_ancestral(model, num_samples, length, steps, use_cache=sampler == "cached", **common)


__all__ = [
    "SAMPLERS",
    "Decoding",
    "SampleResult",
    "ar_sample",
    "categorical",
    "check_sampler_args",
    "check_steps",
    "generate",
    "mdlm_ancestral",
    "mdlm_confidence",
    "mdlm_semi_ar",
    "nucleus",
    "semi_ar_windows",
]
