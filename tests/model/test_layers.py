import torch
from torch import nn

from model.config import model_config
from model.dit import DiT
from model.layers import AlignedHeadLinear, TorchLayers


def pair(vocab=50258, d=64, seed=0):
    torch.manual_seed(seed)
    plain = nn.Linear(d, vocab)
    aligned = AlignedHeadLinear(d, vocab, multiple=128)
    aligned.load_state_dict(plain.state_dict())
    aligned.min_rows = 0  # pad at the tests' few rows too
    return plain, aligned


def test_the_aligned_head_keeps_nn_linears_parameters_and_checkpoints():
    plain, aligned = pair()
    assert isinstance(aligned, nn.Linear)
    assert aligned.padded_features == 50304
    assert {k: v.shape for k, v in aligned.state_dict().items()} == {"weight": (50258, 64), "bias": (50258,)}
    assert plain.load_state_dict(aligned.state_dict()) is not None


def test_the_aligned_head_computes_what_nn_linear_does_forward_and_backward():
    plain, aligned = pair(vocab=1000)
    x = torch.randn(3, 7, 64)
    out_plain, out_aligned = plain(x), aligned(x)
    assert out_aligned.shape == (3, 7, 1000)
    torch.testing.assert_close(out_aligned, out_plain, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out_plain)
    out_plain.backward(grad)
    out_aligned.backward(grad)
    torch.testing.assert_close(aligned.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aligned.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)


def test_under_autocast_the_aligned_head_pads_the_low_precision_copy_and_keeps_fp32_gradients():
    plain, aligned = pair(vocab=300)
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_plain, out_aligned = plain(x), aligned(x)
    assert out_aligned.dtype == torch.bfloat16 and out_aligned.shape == (5, 300)
    torch.testing.assert_close(out_aligned.float(), out_plain.float(), rtol=1e-2, atol=1e-2)
    out_aligned.float().sum().backward()
    assert aligned.weight.grad.dtype == torch.float32 and aligned.weight.grad.shape == (300, 64)


def test_the_dit_head_is_aligned_only_where_the_vocabulary_needs_it():
    odd = DiT(model_config("mdlm-tiny", vocab_size=258))
    even = DiT(model_config("mdlm-tiny", vocab_size=256))
    unpadded = DiT(model_config("mdlm-tiny", vocab_size=258), TorchLayers(head_multiple=1))
    assert type(odd.final.linear) is AlignedHeadLinear
    odd.final.linear.min_rows = 0
    assert type(even.final.linear) is nn.Linear and type(unpadded.final.linear) is nn.Linear
    for p in odd.final.parameters():  # the zero-initialised head would hide a wrong column
        nn.init.normal_(p)
    unpadded.load_state_dict(odd.state_dict())
    tokens = torch.randint(0, 258, (2, 16))
    logits = odd(tokens)
    assert logits.shape == (2, 16, 258) and logits.is_contiguous()
    torch.testing.assert_close(logits, unpadded(tokens), rtol=1e-5, atol=1e-5)
    index = torch.tensor([0, 5, 17, 31])
    torch.testing.assert_close(odd(tokens, index=index), logits.reshape(-1, 258)[index], rtol=1e-5, atol=1e-5)


def test_below_min_rows_the_head_runs_unpadded(monkeypatch):
    plain, aligned = pair(vocab=300)
    aligned.min_rows = 8
    padded = []
    real_pad = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: padded.append(1) or real_pad(*a, **k))
    few, many = torch.randn(7, 64), torch.randn(2, 4, 64)
    torch.testing.assert_close(aligned(few), plain(few), rtol=1e-5, atol=1e-5)
    assert padded == []
    torch.testing.assert_close(aligned(many), plain(many), rtol=1e-5, atol=1e-5)
    assert padded == [1, 1]  # weight and bias
