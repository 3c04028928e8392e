"""The DiT backbone of MDLM (and of its AR baseline), in plain PyTorch.

Pre-LN transformer blocks with adaLN shift/scale/gate from a timestep embedding, rotary
positions, bidirectional attention for MDLM and causal attention (without adaLN) for AR.
Precision and parallelism are applied from outside (model/layers.py), never by branching here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import LayerFactory, TorchLayers


class LayerNormFP32(nn.Module):
    """Bias-free LayerNorm computed in fp32 whatever the autocast dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.layer_norm(x.float(), (self.dim,), self.weight.float())
        return out.to(x.dtype)


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        # no buffer: engines that cast a module's buffers to bf16 (older DeepSpeed) would round
        # the frequencies, and training would see other positions than evaluation
        self.head_dim, self.base = head_dim, base
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            inv_freq = 1.0 / (self.base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
                                            / self.head_dim))
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, inv_freq)
            self._cache = (seq_len, device, freqs.cos(), freqs.sin())
        return self._cache[2][:seq_len], self._cache[3][:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, L, D); rotates pairs (first half, second half) of the head dimension."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[None, None], sin[None, None]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1.0 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory, causal: bool, adaptive: bool):
        super().__init__()
        d = cfg.d_model
        self.n_heads = layers.local_heads(cfg.n_heads)  # heads computed on this rank
        self.head_dim = cfg.head_dim
        self.causal = causal
        self.norm1 = LayerNormFP32(d)
        self.attn_qkv = layers.linear(d, 3 * d, bias=False, role="attn_qkv")
        self.attn_out = layers.linear(d, d, bias=False, role="attn_out")
        self.norm2 = LayerNormFP32(d)
        self.mlp_in = layers.linear(d, cfg.mlp_ratio * d, bias=True, role="mlp_in")
        self.mlp_out = layers.linear(cfg.mlp_ratio * d, d, bias=True, role="mlp_out")
        self.dropout = nn.Dropout(cfg.dropout)
        self.adaLN = None
        if adaptive:
            self.adaLN = nn.Linear(cfg.cond_dim, 6 * d)
            nn.init.zeros_(self.adaLN.weight)
            nn.init.zeros_(self.adaLN.bias)

    def attention(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, l = x.shape[:2]
        qkv = self.attn_qkv(x).view(b, l, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.attn_out(out.transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None, rotary) -> torch.Tensor:
        if self.adaLN is None:
            x = x + self.dropout(self.attention(self.norm1(x), rotary))
            return x + self.dropout(self.mlp_out(F.gelu(self.mlp_in(self.norm2(x)), approximate="tanh")))
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(cond).chunk(6, dim=-1)
        h = self.attention(modulate(self.norm1(x), shift1, scale1), rotary)
        x = x + gate1[:, None] * self.dropout(h)
        h = self.mlp_out(F.gelu(self.mlp_in(modulate(self.norm2(x), shift2, scale2)), approximate="tanh"))
        return x + gate2[:, None] * self.dropout(h)


class FinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: LayerFactory, adaptive: bool):
        super().__init__()
        self.norm = LayerNormFP32(cfg.d_model)
        self.linear = layers.linear(cfg.d_model, cfg.vocab_size, bias=True, role="output")
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN = None
        if adaptive:
            self.adaLN = nn.Linear(cfg.cond_dim, 2 * cfg.d_model)
            nn.init.zeros_(self.adaLN.weight)
            nn.init.zeros_(self.adaLN.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, d), or (N, d) selected positions whose batch row is `rows` (N,)."""
        h = self.norm(x)
        if self.adaLN is not None:
            shift, scale = self.adaLN(cond).chunk(2, dim=-1)
            h = modulate(h, shift, scale) if rows is None else h * (1.0 + scale[rows]) + shift[rows]
        return self.linear(h)


class DiT(nn.Module):
    """tokens (B, L) [+ sigma (B,)] -> logits (B, L, V) in float32."""

    def __init__(self, cfg: ModelConfig, layers: LayerFactory | None = None):
        super().__init__()
        layers = layers or TorchLayers()
        self.cfg = cfg
        causal = cfg.objective == "ar"
        adaptive = not causal
        self.embed = layers.embedding(cfg.vocab_size, cfg.d_model,
                                      init=lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5)))
        self.sigma_map = TimestepEmbedder(cfg.cond_dim) if adaptive else None
        self.rotary = Rotary(cfg.head_dim)
        self.blocks = nn.ModuleList(Block(cfg, layers, causal, adaptive) for _ in range(cfg.n_layers))
        self.final = FinalLayer(cfg, layers, adaptive)

    def condition(self, batch: int, sigma: torch.Tensor | None, device) -> torch.Tensor | None:
        if self.sigma_map is None:
            return None
        if sigma is None or not self.cfg.time_conditioning:
            sigma = torch.zeros(batch, device=device)
        return F.silu(self.sigma_map(sigma))

    def forward(self, tokens: torch.Tensor, sigma: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> torch.Tensor:
        """With `index` (flat positions into the (B, L) tokens, a 1-D long tensor) the output head
        runs on those positions only and the logits come back as (N, V) in that order."""
        x = self.embed(tokens)
        cond = self.condition(tokens.shape[0], sigma, tokens.device)
        rotary = self.rotary(tokens.shape[1], tokens.device)
        for block in self.blocks:
            x = block(x, cond, rotary)
        # contiguous: the head may return a view that cuts off its padding (model/layers.py)
        if index is None:
            return self.final(x, cond).float().contiguous()
        x = x.reshape(-1, x.shape[-1]).index_select(0, index)
        return self.final(x, cond, index // tokens.shape[1]).float().contiguous()


def is_conditioning(module_name: str) -> bool:
    """Whether the DiT module of that qualified name runs once per sequence, on its timestep
    (the timestep MLP and every adaLN projection), rather than on every token."""
    parts = module_name.split(".")
    return "sigma_map" in parts or "adaLN" in parts


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """All parameters of `model` (a DiT or a model wrapping one); non_embedding drops the input
    embedding table (a lookup, not a matmul)."""
    total = sum(p.numel() for p in model.parameters())
    if non_embedding:
        total -= sum(m.embed.weight.numel() for m in model.modules() if isinstance(m, DiT))
    return total
