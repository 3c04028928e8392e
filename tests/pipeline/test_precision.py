"""FP8 preconditions, layer selection and checkpoint interchange (torchao runs emulated on CPU)."""
from __future__ import annotations

import sys

import pytest
import torch

from model.config import model_config
from model.mdlm import build_model
from pipeline.configtools import ConfigError
from pipeline.precision import (FP8Config, apply_fp8, backend_available, check_fp8, check_fp8_shapes,
                                fp8_linear_names, te_recipe_spec)

from .conftest import run_single


def tiny(**kw):
    torch.manual_seed(0)
    return build_model(model_config("mdlm-tiny", vocab_size=65, n_layers=4, d_model=64, **kw))


def test_only_block_projections_are_selected():
    names = fp8_linear_names(tiny())
    assert len(names) == 4 * 4
    assert all(n.split(".")[-1] in ("attn_qkv", "attn_out", "mlp_in", "mlp_out") for n in names)
    assert not any("final" in n or "adaLN" in n or "sigma_map" in n for n in names)
    kept = fp8_linear_names(tiny(), keep_first_last_block_bf16=True)
    assert len(kept) == 2 * 4 and not any(".blocks.0." in n or ".blocks.3." in n for n in kept)
    two_blocks = build_model(model_config("mdlm-tiny", vocab_size=64, n_layers=2))
    with pytest.raises(ConfigError, match="keep_first_last_block_bf16 with 2 block\\(s\\) would leave no block in FP8"):
        fp8_linear_names(two_blocks, keep_first_last_block_bf16=True)
    with pytest.raises(ConfigError, match="fp8.amax_history_len=0: .* use 1 or more"):
        FP8Config(backend="te", amax_history_len=0)


def test_fp8_on_a_cpu_box_fails_fast_and_says_why():
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU with compute capability >= 8.9"):
        check_fp8(FP8Config(), 128, 4, 4096, torch.device("cpu"))


def test_fp8_checks_the_gpu_and_the_backend_before_any_work(monkeypatch):
    from pipeline import precision

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match="compute capability >= 8.9; NVIDIA A100-SXM4-80GB has 8.0: use bf16"):
        check_fp8(FP8Config(), 128, 4, 4096, gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8(FP8Config(), 128, 4, 4096, gpu)  # torchao is installed here
    monkeypatch.setattr(precision, "backend_available", lambda backend: (False, "te is not importable (ImportError)"))
    with pytest.raises(ConfigError, match=r"fp8.backend=te: te is not importable \(ImportError\)"):
        check_fp8(FP8Config(backend="te"), 128, 4, 4096, gpu)
    with pytest.raises(ConfigError, match="micro_batch_size x \\(seq_len - 1\\) divisible by 16 \\(got 8184\\): the AR "):
        check_fp8(FP8Config(), 128, 4, 8 * 1023, gpu, autoregressive=True)


@pytest.mark.parametrize("d_model, tokens, tp, name", [
    (120, 4096, 1, "model.d_model"), (128, 4100, 1, "data.micro_batch_size x seq_len"),
    # each tensor-parallel rank multiplies by its shard: 1200 / 2 = 600 is no multiple of 16
    (1200, 4096, 2, "model.d_model / parallel.tensor 2")])
def test_shapes_must_be_multiples_of_16(d_model, tokens, tp, name):
    with pytest.raises(ConfigError, match=f"fp8 matmuls need {name} divisible by 16"):
        check_fp8_shapes(d_model, 4, tokens, tp)
    check_fp8_shapes(1024, 4, 4096, 4)  # 256 and 1024 wide per rank


def test_recipe_must_match_backend():
    from pipeline.configtools import from_dict

    with pytest.raises(ConfigError, match="fp8.recipe 'delayed' does not apply to fp8.backend 'torchao'"):
        from_dict(FP8Config, {"backend": "torchao", "recipe": "delayed"}, "fp8")
    # an unset recipe is the backend's default, so fp8.backend=te alone is a valid choice
    assert from_dict(FP8Config, {"backend": "te"}, "fp8").recipe == "delayed"
    assert from_dict(FP8Config, {}, "fp8").recipe == "tensorwise"


def test_te_recipes_carry_the_configured_scaling():
    from pipeline.configtools import from_dict

    delayed = from_dict(FP8Config, {"backend": "te", "recipe": "delayed", "amax_history_len": 32,
                                    "amax_compute_algo": "most_recent", "reduce_amax": False}, "fp8")
    assert te_recipe_spec(delayed) == ("DelayedScaling", {"amax_history_len": 32, "amax_compute_algo": "most_recent",
                                                          "reduce_amax": False})
    assert te_recipe_spec(FP8Config(backend="te", recipe="delayed"))[1]["reduce_amax"] is True
    assert te_recipe_spec(FP8Config(backend="te", recipe="current")) == ("Float8CurrentScaling", {})
    with pytest.raises(ConfigError, match="reduce_amax=false applies to the TE 'delayed' recipe only"):
        from_dict(FP8Config, {"backend": "torchao", "recipe": "tensorwise", "reduce_amax": False}, "fp8")
    ok, _ = backend_available("te")
    if ok:  # where TE is installed, the names and arguments are its own
        from transformer_engine.common import recipe

        name, kwargs = te_recipe_spec(delayed)
        assert getattr(recipe, name)(**kwargs).reduce_amax is False


def test_transformer_engine_absence_is_reported_not_crashed():
    ok, reason = backend_available("te")
    if ok:
        pytest.skip("Transformer Engine is installed here; the absence path cannot be shown")
    assert "pip install 'transformer-engine[pytorch]'" in reason


@pytest.mark.parametrize("recipe, granularity, weight_grad_in_fp8", [
    ("tensorwise", "tensorwise", True), ("rowwise", "axiswise", True), ("rowwise_with_gw_hp", "axiswise", False)])
def test_torchao_conversion_keeps_weights_interchangeable(recipe, granularity, weight_grad_in_fp8):
    if not backend_available("torchao")[0]:
        pytest.skip("torchao not installed")
    plain = tiny()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    fp8 = tiny()
    converted = apply_fp8(fp8, FP8Config(backend="torchao", recipe=recipe))
    assert len(converted) == 16
    layer = fp8.get_submodule(converted[0])
    assert type(layer).__name__ == "Float8Linear"
    assert layer.config.cast_config_input.scaling_granularity.value == granularity
    assert (layer.config.cast_config_input_for_grad_weight.scaling_type.value != "disabled") == weight_grad_in_fp8
    fp8.load_state_dict(state)  # a bf16/fp32 checkpoint loads into the FP8 model ...
    back = tiny()
    back.load_state_dict(fp8.state_dict())  # ... and back, key for key
    for k, v in back.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randint(0, 64, (2, 32))
    t = torch.full((2,), 0.5)
    u = torch.rand(2, 32, generator=torch.Generator().manual_seed(0))
    out_fp8, out_plain = fp8(x, t, noise=u).loss, back(x, t, noise=u).loss
    out_fp8.backward()
    # emulated FP8 on CPU: same loss to FP8 precision
    assert abs(out_fp8.item() - out_plain.item()) / out_plain.item() < 0.1


def test_train_cli_rejects_fp8_on_cpu_before_training(markov_data, tmp_path):
    out = run_single(tmp_path, markov_data, "train.precision=fp8", check=False)
    assert out.returncode == 2
    assert "config error: train.precision=fp8 needs an NVIDIA GPU" in out.stderr
    assert not (tmp_path / "checkpoints").exists()


class _FakeRecipes:
    class DelayedScaling:
        def __init__(self, **kwargs):
            self.kwargs = kwargs


def _fake_te(monkeypatch, with_autocast: bool) -> list:
    """A stand-in for the transformer_engine package (not importable without a GPU driver) that
    records how te_autocast calls it."""
    import types

    calls = []
    te = types.ModuleType("transformer_engine.pytorch")

    class Linear(torch.nn.Module):  # as te.Linear: not an nn.Linear; its constructor and forward signature
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=params_dtype))
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=params_dtype)) if bias else None

        def forward(self, inp, is_first_microbatch=None):
            calls.append(("Linear.forward", is_first_microbatch))
            return torch.nn.functional.linear(inp, self.weight, self.bias)

    Linear.__module__ = "transformer_engine.pytorch.module.linear"

    te.Linear = Linear
    if with_autocast:
        te.autocast = lambda **kwargs: calls.append(("autocast", kwargs)) or "ctx"
    te.fp8_autocast = lambda **kwargs: calls.append(("fp8_autocast", kwargs)) or "ctx"
    common = types.ModuleType("transformer_engine.common")
    common.recipe = _FakeRecipes
    package = types.ModuleType("transformer_engine")
    package.pytorch, package.common = te, common
    for name, module in (("transformer_engine", package), ("transformer_engine.pytorch", te),
                         ("transformer_engine.common", common), ("transformer_engine.common.recipe", _FakeRecipes)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize("with_autocast", [True, False])
def test_te_autocast_uses_the_current_api_and_falls_back_to_fp8_autocast(monkeypatch, with_autocast):
    from pipeline.precision import te_autocast

    calls = _fake_te(monkeypatch, with_autocast)
    group = object()
    assert te_autocast(FP8Config(backend="te", amax_history_len=8), group) == "ctx"
    (name, kwargs), = calls
    scaling = kwargs.pop("recipe" if with_autocast else "fp8_recipe")
    assert scaling.kwargs == {"amax_history_len": 8, "amax_compute_algo": "max", "reduce_amax": True}
    if with_autocast:  # TE >= 2.9 deprecates fp8_autocast
        assert name == "autocast" and kwargs == {"enabled": True, "amax_reduction_group": group}
    else:
        assert name == "fp8_autocast" and kwargs == {"enabled": True, "fp8_group": group}


def test_a_resume_loads_strictly_only_between_equal_te_layouts():
    from pipeline.trainer import te_linear_layout

    def config(precision="bf16", backend="torchao", keep=False):
        return {"train": {"precision": precision}, "fp8": {"backend": backend, "keep_first_last_block_bf16": keep}}

    assert te_linear_layout(config()) == te_linear_layout(config("fp8")) == (False, False)
    assert te_linear_layout(config("fp8", "torchao", keep=True)) == (False, False)  # torchao adds no state keys
    assert te_linear_layout(config("fp8", "te")) == (True, False)
    # the first and last block switch between te.Linear and nn.Linear: their _extra_state keys come and go
    assert te_linear_layout(config("fp8", "te", keep=True)) != te_linear_layout(config("fp8", "te"))
    assert te_linear_layout({}) == (False, False)  # checkpoints from before these settings


def test_te_linears_keep_their_matmul_flops(monkeypatch):
    """TE's Linear is no nn.Linear, nor is the subclass apply_fp8 installs: MFU still counts them."""
    from pipeline import metrics
    from pipeline.precision import apply_fp8

    _fake_te(monkeypatch, with_autocast=True)
    model = tiny()
    expected = metrics.matmul_params(model)
    names = apply_fp8(model, FP8Config(backend="te"))
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n in names)
    assert metrics.matmul_params(model) == expected


def test_te_linears_copy_the_weights_and_cache_fp8_weights_only_within_a_step(monkeypatch):
    from pipeline.precision import apply_fp8

    calls = _fake_te(monkeypatch, with_autocast=True)
    model = tiny()
    x0, t = torch.randint(0, 64, (2, 16)), torch.full((2,), 0.5)
    noise = torch.rand(2, 16)
    expected = model(x0, t, noise=noise).loss
    names = apply_fp8(model, FP8Config(backend="te"))
    converted = [m for n, m in model.named_modules() if n in names]
    assert len(converted) == 4 * 4 and all(type(m).__name__ == "CachedWeightLinear" for m in converted)
    assert torch.equal(model(x0, t, noise=noise).loss, expected)
    # untouched (the bench, evaluation): TE casts the weights at every call
    assert {flag for name, flag in calls if name == "Linear.forward"} == {None}
    # the trainer's step: True before the first micro-batch, then the FP8 weight copy is reused
    for step in range(2):
        calls.clear()
        for module in model.modules():
            if hasattr(module, "is_first_microbatch"):
                module.is_first_microbatch = True
        for _ in range(3):
            model(x0, t, noise=noise)
        flags = [flag for name, flag in calls if name == "Linear.forward"]
        assert flags == [True] * 16 + [False] * 32
