"""Asymmetric (scale + minimum) INT4/INT8 groups: reference op, lowering pass, Triton path."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # read when triton is first imported

import inspect  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from llm_compile.codegen import anda_format  # noqa: E402
from llm_compile.codegen.anda_launch import anda_matmul  # noqa: E402
from llm_compile.quantize import QuantLinear, quantize_weights  # noqa: E402
from anda_graph_helpers import ANDA, _lower, aten_graph, count, run_graph  # noqa: E402

ASYM_KERNELS = "mins" in inspect.signature(anda_matmul).parameters


def _float_weight(ql: QuantLinear) -> torch.Tensor:
    """The weight QuantLinear stores, dequantized by hand (no llm_compile.quantize helpers)."""
    q = ql.qweight.to(torch.int32)
    if ql.bits == 4:
        q = torch.stack([q & 15, q >> 4], -1).reshape(q.shape[0], -1)
        if ql.symmetric:
            q = q - 8
    s = ql.scales.float().repeat_interleave(ql.group_size, 1)
    w = q.float() * s
    if not ql.symmetric:
        w = w + ql.mins.float().repeat_interleave(ql.group_size, 1)
    return w


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [4, 8])
def test_reference_op_every_format(bits, group, symmetric):
    torch.manual_seed(bits * 1000 + group + symmetric)
    lin = nn.Linear(256, 48, bias=True)
    with torch.no_grad():
        lin.weight.add_(0.05)            # asymmetric ranges: min != -max
    ql = QuantLinear.from_linear(lin, bits=bits, group_size=group, symmetric=symmetric)
    assert (ql.mins is None) == symmetric
    assert ql.qweight.dtype == (torch.int8 if bits == 8 and symmetric else torch.uint8)
    x = torch.randn(3, 5, 256)
    w = _float_weight(ql)
    torch.testing.assert_close(ql.dequantized_weight(), w, rtol=0, atol=0)
    for m_bits in (16, 5):
        out = torch.ops.llmaccel.anda_linear(x, ql.qweight, ql.scales, ql.mins, ql.bias, m_bits, bits,
                                             group, "reference")
        want = anda_format.fake_quantize(x, m_bits) @ w.t() + lin.bias
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the quantized weight is close to the float one (and asymmetric is not worse on shifted data)
    rel = (w - lin.weight).norm() / lin.weight.norm()
    assert rel < (0.15 if bits == 4 else 0.01)


def test_asymmetric_beats_symmetric_on_shifted_weights():
    torch.manual_seed(0)
    w = torch.rand(64, 256) * 0.1 + 0.3           # all positive: symmetric wastes half its range
    errs = {}
    for sym in (True, False):
        lin = nn.Linear(256, 64, bias=False)
        lin.weight.data.copy_(w)
        errs[sym] = (QuantLinear.from_linear(lin, 4, 64, symmetric=sym).dequantized_weight() - w).abs().max()
    assert errs[False] < errs[True] / 4


def test_op_checks_mins_and_dtypes():
    ql = QuantLinear.from_linear(nn.Linear(128, 16), bits=4, group_size=64, symmetric=False)
    x = torch.randn(2, 128)
    op = torch.ops.llmaccel.anda_linear
    with pytest.raises(ValueError, match="mins"):
        op(x, ql.qweight, ql.scales, ql.mins[:, :1], None, 7, 4, 64, "reference")
    with pytest.raises(ValueError, match="mins"):
        op(x, ql.qweight, ql.scales, ql.mins.half(), None, 7, 4, 64, "reference")
    ql8 = QuantLinear.from_linear(nn.Linear(128, 16), bits=8, group_size=64, symmetric=False)
    with pytest.raises(ValueError, match="asymmetric INT8 weights are torch.uint8"):
        op(x, ql8.qweight.to(torch.int8), ql8.scales, ql8.mins, None, 7, 8, 64, "reference")
    with pytest.raises(ValueError, match="bias"):    # mins passed in the bias slot
        op(x, ql.qweight, ql.scales, None, ql.mins, 7, 4, 64, "reference")


def _llama(bits, group, symmetric):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    return quantize_weights(model, bits=bits, group_size=group, symmetric=symmetric)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 128), (4, 64)])
def test_lowering_asymmetric_llama(bits, group):
    model = _llama(bits, group, symmetric=False)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    gm, ctx = aten_graph(lambda i: model(i, use_cache=False).logits, ids)
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
    new, _, res = _lower(gm, ctx, mantissa_bits=16, kernel="reference")
    assert count(new, ANDA) == 7 and not res.skipped
    for node in new.graph.nodes:
        if node.target == ANDA:
            qw, sc, mn = node.args[1:4]
            assert "qweight" in ctx.placeholder_sources[qw.name]
            assert "scales" in ctx.placeholder_sources[sc.name]
            assert "mins" in ctx.placeholder_sources[mn.name]
            assert node.args[6:8] == (bits, group)
    assert all(m["symmetric"] is False and m["weight_bits"] == bits for m in res.matched)
    torch.testing.assert_close(run_graph(new, ctx), eager, rtol=2e-3, atol=2e-3)
    low, _, _ = _lower(gm, ctx, mantissa_bits=3, kernel="reference")
    assert not torch.allclose(run_graph(low, ctx), eager, rtol=2e-3, atol=2e-3)


class _Shift(nn.Module):
    """u * scale - min (wrong sign of the minimum): must not be lowered as QuantLinear's format."""

    def __init__(self):
        super().__init__()
        self.q_proj = QuantLinear.from_linear(nn.Linear(128, 32), 8, 64, symmetric=False)

    def forward(self, x):
        p = self.q_proj
        w = (p.qweight.float().reshape(32, 2, 64) * p.scales.unsqueeze(-1) - p.mins.unsqueeze(-1))
        return x @ w.reshape(32, 128).t()


def test_wrong_asymmetric_chain_is_skipped():
    gm, ctx = aten_graph(_Shift(), torch.randn(2, 128))
    new, _, res = _lower(gm, ctx, mantissa_bits=7, kernel="reference")
    assert count(new, ANDA) == 0
    (skip,) = res.skipped
    assert "asymmetric INT8 dequantization" in skip["reason"]


@pytest.mark.skipif(not ASYM_KERNELS, reason="anda_matmul has no mins= yet (engineer A's kernels)")
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 128), (4, 128)])
def test_triton_asymmetric_matches_reference(bits, group, rows):
    torch.manual_seed(rows)
    ql = QuantLinear.from_linear(nn.Linear(256, 64), bits, group, symmetric=False)
    x = torch.randn(rows, 256)
    args = (x, ql.qweight, ql.scales, ql.mins, ql.bias, 6, bits, group)
    out = torch.ops.llmaccel.anda_linear(*args, "triton")
    ref = torch.ops.llmaccel.anda_linear(*args, "reference")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
