"""The MDLM objective (SUBS parameterisation, continuous-time NELBO) and the AR baseline loss.

Both wrap the same DiT backbone and return the summed token loss and the token count, so the
trainer reduces them identically: loss = sum / tokens.

The backbone is a seam: any module mapping (tokens (B, L), sigma (B,) or None) to logits (B, L, V)
can stand in for the DiT, e.g. an exact denoiser of a known source in the tests.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dit import DiT
from .layers import LayerFactory
from .noise import make_schedule

NEG_INF = -1e6  # representable in bf16 and fp32, unlike in fp16


class LossOutput(NamedTuple):
    """A tuple, not a dataclass: DeepSpeed's engine registers its backward prologue on the tensors
    it finds in the forward's output (tensors, tuples, lists, dicts). Hidden in a dataclass, the
    prologue never ran, and BF16_Optimizer (ZeRO-1 with fp32 gradients) then added each earlier
    micro-batch's gradient again at every later one."""
    loss: torch.Tensor        # scalar: loss_sum / num_tokens (what backward sees)
    loss_sum: torch.Tensor    # summed (weighted) NLL over the counted tokens
    num_tokens: torch.Tensor  # tokens that count (non-pad)


def subs_log_probs(logits: torch.Tensor, z_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: never predict [MASK]; carry unmasked tokens over as one-hot (log-prob 0)."""
    logits = logits.float().clone()
    logits[..., mask_id] = NEG_INF
    log_probs = logits.log_softmax(dim=-1)
    unmasked = z_t != mask_id
    if unmasked.any():
        carry = torch.full_like(log_probs, NEG_INF)
        carry.scatter_(-1, z_t.unsqueeze(-1), 0.0)
        log_probs = torch.where(unmasked.unsqueeze(-1), carry, log_probs)
    return log_probs


def _reduce(per_token: torch.Tensor, valid: torch.Tensor | None) -> LossOutput:
    if valid is not None:
        per_token = torch.where(valid.bool(), per_token, torch.zeros_like(per_token))
        count = valid.to(per_token.dtype).sum()
    else:
        count = per_token.new_full((), float(per_token.numel()))  # a fill, not a (syncing) host copy
    loss_sum = per_token.sum()
    return LossOutput(loss_sum / count.clamp_min(1), loss_sum, count)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Evaluation and sampling must not see dropout, whatever mode the caller left the model in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


class MDLM(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None,
                 backbone: nn.Module | None = None):
        super().__init__()
        if cfg.objective != "mdlm":
            raise ValueError("MDLM needs model.objective = 'mdlm'")
        if not 0 <= cfg.mask_token_id < cfg.vocab_size:
            raise ValueError(f"MDLM needs a [MASK] id in [0, {cfg.vocab_size}), got {cfg.mask_token_id}")
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else DiT(cfg, layers)
        self.schedule = make_schedule(cfg.noise_schedule, cfg.noise_eps)
        self.mask_id = cfg.mask_token_id

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask each token with probability m(t); `noise` (uniforms shaped like x0) makes the draw
        independent of the device and of how the batch is split over ranks."""
        p_mask = self.schedule.mask_prob(t.to(x0.device))[:, None]
        if noise is None:
            noise = torch.rand(x0.shape, generator=generator).to(x0.device) if generator is not None \
                else torch.rand(x0.shape, device=x0.device)
        masked = noise < p_mask
        return torch.where(masked, torch.full_like(x0, self.mask_id), x0), masked

    def logits(self, z_t: torch.Tensor, t: torch.Tensor | None = None,
               positions: torch.Tensor | None = None, index: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits with zero-masking applied (the [MASK] logit is NEG_INF): (B, L, V), or (N, V)
        at the positions selected by the boolean (B, L) `positions` (row-major order) or by the flat
        `index`. A DiT runs its output head on those positions only; any other backbone runs in
        full and is indexed."""
        if t is None and self.cfg.time_conditioning:
            raise ValueError("this model is time-conditioned (model.time_conditioning): pass the time t of z_t")
        sigma = self.schedule.sigma(t) if self.cfg.time_conditioning else None
        if positions is not None:
            index = positions.reshape(-1).nonzero().squeeze(1)
        if index is None:
            logits = self.backbone(z_t, sigma).float()
        elif isinstance(self.backbone, DiT):
            logits = self.backbone(z_t, sigma, index=index).float()
        else:
            full = self.backbone(z_t, sigma).float()
            logits = full.reshape(-1, full.shape[-1]).index_select(0, index)
        # in place: a second (B, L, V) fp32 copy is the largest activation of the model
        logits[..., self.mask_id] = NEG_INF
        return logits

    def log_probs(self, z_t: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """SUBS log p_theta(x | z_t): zero-masking plus carry-over of unmasked tokens."""
        return subs_log_probs(self.logits(z_t, t), z_t, self.mask_id)

    def token_nll(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token -log p(x0 | z_t) at masked positions (0 elsewhere, by carry-over), and the mask."""
        z_t, masked = self.corrupt(x0, t, generator, noise)
        if self.cfg.masked_logits_only:
            # the one wait for the GPU per call, while only the inputs are queued (index_select and
            # index_copy do not sync, forward or backward; boolean indexing would)
            index = masked.reshape(-1).nonzero().squeeze(1)
            nll_at = F.cross_entropy(self.logits(z_t, t, index=index), x0.reshape(-1).index_select(0, index),
                                     reduction="none")
            return nll_at.new_zeros(x0.numel()).index_copy(0, index, nll_at).view_as(x0), masked
        logits = self.logits(z_t, t)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0.reshape(-1),
                              reduction="none").view_as(x0)
        return torch.where(masked, nll, torch.zeros_like(nll)), masked

    def forward(self, x0: torch.Tensor, t: torch.Tensor, valid: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> LossOutput:
        """Training loss: the NELBO integrand w(t) * sum of masked CE (loss 'nelbo'), or the masked CE
        without the weight (loss 'flat_ce'), per counted token."""
        nll, _ = self.token_nll(x0, t, generator, noise)
        if self.cfg.loss == "nelbo":
            nll = nll * self.schedule.weight(t.to(nll.device)).to(nll.dtype)[:, None]
        return _reduce(nll, valid)


class AutoregressiveLM(nn.Module):
    """The AR baseline: same backbone, causal attention, no adaLN; exact next-token NLL.

    Position 0 is never predicted (it is BOS in packed data), so L - 1 tokens count per sequence."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None,
                 backbone: nn.Module | None = None):
        super().__init__()
        if cfg.objective != "ar":
            raise ValueError("AutoregressiveLM needs model.objective = 'ar'")
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else DiT(cfg, layers)

    def token_nll(self, x0: torch.Tensor) -> torch.Tensor:
        """-log p(x0[:, l] | x0[:, :l]) for l = 1..L-1, shaped (B, L-1)."""
        logits = self.backbone(x0[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x0[:, 1:].reshape(-1),
                               reduction="none").view(x0.shape[0], -1)

    def forward(self, x0: torch.Tensor, t: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> LossOutput:
        return _reduce(self.token_nll(x0), valid[:, 1:] if valid is not None else None)


def build_model(cfg: ModelConfig, layers: LayerFactory | None = None) -> nn.Module:
    return MDLM(cfg, layers) if cfg.objective == "mdlm" else AutoregressiveLM(cfg, layers)
