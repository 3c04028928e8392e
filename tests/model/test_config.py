import pytest
import torch

from model.config import PRESETS, ModelConfig, expand_preset, model_config
from model.dit import DiT, count_parameters
from model.mdlm import MDLM, AutoregressiveLM, build_model
from pipeline.configtools import ConfigError


def meta_model(preset: str, **overrides):
    with torch.device("meta"):
        return build_model(model_config(preset, **overrides))


@pytest.mark.parametrize("preset,reference", [("mdlm-small", 169.6e6), ("mdlm-medium", 424.5e6)])
def test_parameter_counts_match_the_reference(preset, reference):
    model = meta_model(preset)
    n = count_parameters(model)
    print(f"{preset}: {n:,} parameters")
    assert abs(n - reference) / reference < 0.005
    assert next(model.parameters()).device.type == "meta"


def test_parameter_count_breakdown_small():
    model = meta_model("mdlm-small")
    v, d, layers, cond = 50258, 768, 12, 128
    per_block = (3 * d * d + d * d          # qkv, attention out (no bias)
                 + 4 * d * d + 4 * d + 4 * d * d + d  # MLP with biases
                 + 2 * d                    # two bias-free LayerNorms
                 + cond * 6 * d + 6 * d)    # adaLN
    head = d + d * v + v + cond * 2 * d + 2 * d
    timestep = 256 * cond + cond + cond * cond + cond
    assert count_parameters(model) == v * d + layers * per_block + head + timestep
    assert count_parameters(model, non_embedding=True) == count_parameters(model) - v * d


def test_ar_baseline_is_the_same_backbone_without_adaln():
    mdlm, ar = meta_model("mdlm-small"), meta_model("mdlm-small", objective="ar")
    assert isinstance(mdlm, MDLM) and isinstance(ar, AutoregressiveLM)
    adaln = 12 * (128 * 6 * 768 + 6 * 768) + 128 * 2 * 768 + 2 * 768 + 256 * 128 + 128 + 128 * 128 + 128
    assert count_parameters(mdlm) - count_parameters(ar) == adaln


def test_presets_expand_and_explicit_keys_win(caplog):
    with caplog.at_level("WARNING", logger="mdlm.config"):
        cfg = model_config("mdlm-medium", d_model=512, n_heads=8)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == (24, 512, 8)
    # said, so a preset name overridden on the command line does not silently keep a YAML's shapes
    assert "model.preset 'mdlm-medium' with explicit d_model=512 (preset: 1024), n_heads=8 (preset: 16)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mdlm.config"):
        model_config("mdlm-small", n_layers=12)  # the preset's own value: nothing to say
    assert caplog.text == ""
    assert expand_preset({"preset": "mdlm-small"})["d_model"] == PRESETS["mdlm-small"]["d_model"]
    assert expand_preset({"preset": "custom", "d_model": 64}) == {"preset": "custom", "d_model": 64}
    assert cfg.mask_token_id == cfg.vocab_size - 1 == 50257


def test_flat_ce_loss_option_and_validation_messages():
    assert model_config("mdlm-tiny", loss="flat_ce").loss == "flat_ce"
    with pytest.raises(ConfigError, match="loss"):
        model_config("mdlm-tiny", loss="mse")
    with pytest.raises(ConfigError, match="divisible"):
        model_config("mdlm-tiny", d_model=130)
    with pytest.raises(ConfigError, match="unknown"):
        model_config("mdlm-huge")
    with pytest.raises(ConfigError, match="n_heads must be >= 1"):
        model_config("mdlm-tiny", n_heads=0)
    with pytest.raises(ConfigError, match="dropout"):
        model_config("mdlm-tiny", dropout=1.0)
    with pytest.raises(ConfigError, match="mask_token_id"):
        model_config("mdlm-tiny", vocab_size=10, mask_token_id=10)


def test_mdlm_refuses_a_missing_mask_id():
    cfg = ModelConfig(preset="custom", vocab_size=0)
    with pytest.raises(ValueError, match="MASK"):
        MDLM(cfg)


def test_tiny_model_runs_and_returns_fp32_logits():
    cfg = model_config("mdlm-tiny", vocab_size=17)
    model = DiT(cfg)
    logits = model(torch.randint(0, 16, (2, 8)))
    assert logits.shape == (2, 8, 17) and logits.dtype == torch.float32
    assert torch.count_nonzero(logits) == 0  # zero-initialised output head
