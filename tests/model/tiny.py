"""Tiny models for fast CPU tests."""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.mdlm import build_model


def tiny_config(objective: str = "mdlm", vocab: int = 12, **overrides) -> ModelConfig:
    fields = dict(preset="custom", objective=objective, vocab_size=vocab, n_layers=2, d_model=32,
                  n_heads=4, cond_dim=16, dropout=0.0)
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg


def tiny_model(objective: str = "mdlm", vocab: int = 12, seed: int = 0, randomize: bool = True, **overrides):
    """A tiny model; `randomize` replaces the zero-initialised head and adaLN (which make every
    output identical at initialisation) by random weights, so outputs depend on the input."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(objective, vocab, **overrides))
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN" in name or "final.linear" in name:
                    p.normal_(0.0, 0.3)
    return model
