"""Model configuration and named size presets."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

from pipeline.configtools import ConfigError

# Sizes at the GPT-2 vocab (50258): small 169.6M and medium 424.5M parameters as in the reference;
# 1b (ours, nothing larger was published) 1.25B.
PRESETS: dict[str, dict] = {
    "mdlm-tiny": dict(n_layers=2, d_model=128, n_heads=4, cond_dim=64),
    "mdlm-small": dict(n_layers=12, d_model=768, n_heads=12, cond_dim=128),
    "mdlm-medium": dict(n_layers=24, d_model=1024, n_heads=16, cond_dim=128),
    "mdlm-1b": dict(n_layers=20, d_model=2048, n_heads=16, cond_dim=128),
    # Beyond one GPU (tensor parallel): head_dim 128, heads and MLP width divisible by TP 2/4/8,
    # widths multiples of 128 (tensor cores, FP8), layer counts divisible by 2/4/8.
    "mdlm-3b": dict(n_layers=24, d_model=3072, n_heads=24, cond_dim=128),   # ~3.09B
    "mdlm-8b": dict(n_layers=40, d_model=4096, n_heads=32, cond_dim=128),   # ~8.59B
}


@dataclass
class ModelConfig:
    preset: str = "mdlm-tiny"
    objective: Literal["mdlm", "ar"] = "mdlm"
    vocab_size: int = 0       # including the [MASK] id for MDLM; 0 = from the data manifest
    mask_token_id: int = -1   # -1 = from the data manifest (or the last id)
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: int = 4
    cond_dim: int = 64
    dropout: float = 0.1
    time_conditioning: bool = False
    noise_schedule: Literal["loglinear", "cosine", "linear"] = "loglinear"
    noise_eps: float = 1e-3
    loss: Literal["nelbo", "flat_ce"] = "nelbo"
    # The MDLM loss only needs the logits of masked positions (SUBS carries unmasked tokens over
    # with zero loss), so the output head runs on those alone: exact, about half the head's FLOPs
    # and of its (B, L, V) fp32 activations on average. False runs the head everywhere.
    masked_logits_only: bool = True

    def validate(self) -> None:
        if self.preset not in PRESETS and self.preset != "custom":
            raise ConfigError(f"model.preset '{self.preset}' is unknown; choose one of "
                              f"{', '.join(PRESETS)} or 'custom'")
        for name in ("n_layers", "d_model", "n_heads", "mlp_ratio", "cond_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by "
                              f"model.n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("model head dimension must be even for rotary embeddings")
        if self.vocab_size < 0:
            raise ConfigError("model.vocab_size must be >= 0 (0 takes it from the data manifest)")
        if self.vocab_size and self.mask_token_id == -1:
            self.mask_token_id = self.vocab_size - 1
        if self.vocab_size and self.objective == "mdlm" and not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(f"model.mask_token_id={self.mask_token_id} must lie in "
                              f"[0, vocab_size={self.vocab_size})")
        if not 0.0 < self.noise_eps < 1.0:
            raise ConfigError("model.noise_eps must be in (0, 1)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def expand_preset(raw: dict) -> dict:
    """Fill a raw model mapping from its preset; explicit keys win."""
    raw = dict(raw)
    name = raw.get("preset", ModelConfig.preset)
    if name in PRESETS:
        changed = [f"{k}={raw[k]} (preset: {v})" for k, v in PRESETS[name].items() if k in raw and raw[k] != v]
        if changed:  # e.g. model.preset overridden on the command line of a YAML that sets shapes
            logging.getLogger("mdlm.config").warning("model.preset '%s' with explicit %s: the explicit values "
                                                     "win; use model.preset=custom for a shape of your own",
                                                     name, ", ".join(changed))
        merged = dict(PRESETS[name])
        merged.update(raw)
        return merged
    return raw


def model_config(preset: str = "mdlm-tiny", **overrides) -> ModelConfig:
    """A validated config from a preset name plus field overrides (vocab_size defaults to 50258)."""
    overrides.setdefault("vocab_size", 50258)
    from pipeline.configtools import from_dict

    return from_dict(ModelConfig, expand_preset({"preset": preset, **overrides}), "model")


def replace(cfg: ModelConfig, **changes) -> ModelConfig:
    out = dataclasses.replace(cfg, **changes)
    out.validate()
    return out
