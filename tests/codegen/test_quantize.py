"""Weight quantization (llm_compile.quantize): packing, error bounds, QuantLinear vs fp32 linear."""
import pytest
import torch
from torch import nn

from llm_compile.quantize import (QuantLinear, dequantize_weight, pack_int4, pack_uint4, quantize_tensor,
                                  quantize_tensor_asymmetric, quantize_weights, unpack_int4, unpack_uint4)


def test_int4_pack_layout_and_roundtrip():
    q = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int8)
    p = pack_int4(q)
    # byte0 = (-8+8) | (7+8)<<4 = 0xF0 ; byte1 = (0+8) | (-1+8)<<4 = 0x78
    assert p.dtype == torch.uint8 and p.tolist() == [[0xF0, 0x78]]
    r = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(r)), r)


@pytest.mark.parametrize("bits,gs", [(4, 128), (8, 128), (4, 64), (8, 32)])
def test_reconstruction_error_bound(bits, gs):
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    qw, s = quantize_tensor(w, bits, gs)
    assert qw.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert qw.shape == ((48, 128) if bits == 4 else (48, 256)) and s.shape == (48, 256 // gs)
    w_hat = dequantize_weight(qw, s, bits, gs)
    # round to nearest: error <= scale / 2 elementwise; and the group max is exact
    bound = s.repeat_interleave(gs, dim=1) / 2
    assert ((w - w_hat).abs() <= bound * (1 + 1e-6)).all()
    qmax = 2 ** (bits - 1) - 1
    assert torch.allclose(s, w.reshape(48, -1, gs).abs().amax(-1) / qmax)
    rel = (w - w_hat).norm() / w.norm()
    assert rel < (0.14 if bits == 4 else 0.009)


def test_zero_group_and_bad_args():
    w = torch.zeros(4, 128)
    w[0, 0] = 1.0
    qw, s = quantize_tensor(w, 8, 64)
    assert torch.equal(dequantize_weight(qw, s, 8, 64), w)
    with pytest.raises(ValueError):
        quantize_tensor(torch.randn(4, 100), 4, 64)
    with pytest.raises(ValueError):
        quantize_tensor(torch.randn(4, 128), 3, 64)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_quantlinear_vs_fp32(bits, bias):
    torch.manual_seed(1)
    lin = nn.Linear(256, 96, bias=bias)
    ql = QuantLinear.from_linear(lin, bits=bits, group_size=128)
    x = torch.randn(3, 5, 256)
    ref = lin(x)
    out = ql(x)
    expect = torch.nn.functional.linear(x, ql.dequantized_weight(), lin.bias)
    assert torch.allclose(out, expect, atol=1e-5, rtol=1e-5)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.15 if bits == 4 else 0.01)
    assert not any(p.requires_grad for p in ql.parameters())


def test_quantize_weights_replaces_and_skips():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(128, 64))
    model.add_module("odd", nn.Linear(100, 64))
    model.add_module("lm_head", nn.Linear(64, 10))
    ref_in = torch.randn(2, 128)
    quantize_weights(model, bits=8, group_size=64)
    assert isinstance(model.a, QuantLinear) and model.a.bits == 8
    assert type(model.odd) is nn.Linear and type(model.lm_head) is nn.Linear
    assert model.llmaccel_quantized == ["a"]
    assert model.a(ref_in).shape == (2, 64)
    sd = model.a.state_dict()
    assert set(sd) == {"qweight", "scales", "bias"}


def test_fp16_scales_and_dtype_follow_input():
    lin = nn.Linear(128, 32)
    ql = QuantLinear.from_linear(lin, bits=4, group_size=128, scale_dtype=torch.float16)
    assert ql.scales.dtype == torch.float16
    out = ql(torch.randn(2, 128, dtype=torch.float64).float())
    assert out.dtype == torch.float32


def test_uint4_pack_layout_no_offset():
    u = torch.tensor([[0, 15, 3, 1]], dtype=torch.uint8)
    assert pack_uint4(u).tolist() == [[0xF0, 0x13]]
    r = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_uint4(pack_uint4(r)), r)


@pytest.mark.parametrize("bits,gs", [(4, 32), (4, 128), (8, 64), (8, 32)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_asymmetric_reconstruction_error_bound(bits, gs, scale_dtype):
    torch.manual_seed(0)
    w = torch.randn(48, 256) + 0.3
    qw, s, mn = quantize_tensor_asymmetric(w, bits, gs, scale_dtype)
    assert qw.dtype == torch.uint8 and s.dtype == mn.dtype == scale_dtype
    assert qw.shape == ((48, 128) if bits == 4 else (48, 256)) and s.shape == mn.shape == (48, 256 // gs)
    w_hat = dequantize_weight(qw, s, bits, gs, mins=mn)
    s32 = s.float().repeat_interleave(gs, dim=1)
    slack = 0 if scale_dtype == torch.float32 else 2e-3          # fp16 min/scale rounding at the ends
    assert ((w - w_hat).abs() <= s32 / 2 * (1 + 1e-5) + 1e-6 + slack).all()
    if scale_dtype == torch.float32:   # the group minimum is exact, the maximum within rounding
        assert torch.allclose(w_hat.reshape(48, -1, gs).amin(-1), w.reshape(48, -1, gs).amin(-1), atol=1e-6)
    # constant groups: scale 0, u 0, W = min exactly
    c = torch.full((2, 64), 0.25)
    qc, sc, mc = quantize_tensor_asymmetric(c, bits, 64)
    assert torch.equal(dequantize_weight(qc, sc, bits, 64, mins=mc), c)


def test_quantize_weights_asymmetric_state_dict():
    model = nn.Sequential()
    model.add_module("a", nn.Linear(128, 64))
    quantize_weights(model, bits=4, group_size=32, symmetric=False)
    assert isinstance(model.a, QuantLinear) and not model.a.symmetric and model.a.group_size == 32
    assert set(model.a.state_dict()) == {"qweight", "scales", "mins", "bias"}
    with pytest.raises(TypeError, match="symmetric"):
        quantize_weights(nn.Sequential(nn.Linear(64, 8)), symmetric="no")
