"""The reference path's dequantized-weight cache: reused, invalidated by in-place changes, owned by
the weight tensor, used inside compiled graphs."""
import torch
from torch import nn

from llm_compile.ops.anda import _CACHE_ATTR, anda_linear_reference
from llm_compile.quantize import QuantLinear, quantize_weights

OP = torch.ops.llmaccel.anda_linear


def _call(ql, x, scales=None):
    return OP(x, ql.qweight, ql.scales if scales is None else scales, ql.mins, ql.bias, 8, ql.bits,
              ql.group_size, "reference")


def test_cache_reused_and_invalidated():
    torch.manual_seed(0)
    ql = QuantLinear.from_linear(nn.Linear(128, 32), 4, 32, symmetric=False)
    x = torch.randn(2, 128)
    out = _call(ql, x)
    hit = getattr(ql.qweight, _CACHE_ATTR)
    assert torch.equal(out, anda_linear_reference(x, ql.qweight, ql.scales, ql.bias, 8, 4, 32, mins=ql.mins))
    _call(ql, x)
    assert getattr(ql.qweight, _CACHE_ATTR)[3] is hit[3]            # reused, not recomputed
    for mutate in (lambda: ql.qweight.bitwise_xor_(3), lambda: ql.scales.mul_(2), lambda: ql.mins.add_(1)):
        mutate()
        want = anda_linear_reference(x, ql.qweight, ql.scales, ql.bias, 8, 4, 32, mins=ql.mins)
        assert torch.equal(_call(ql, x), want)                      # a stale cache would differ
    other = ql.scales.clone() * 3                                   # same qweight, other scales object
    want = anda_linear_reference(x, ql.qweight, other, ql.bias, 8, 4, 32, mins=ql.mins)
    assert torch.equal(_call(ql, x, scales=other), want)


def test_cache_used_in_compiled_graph():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    model = quantize_weights(LlamaForCausalLM(cfg).eval(), bits=4, group_size=32, symmetric=False)
    fwd = torch.compile(model.forward, backend="llmaccel",
                        options={"anda": {"mantissa_bits": 7, "kernel": "reference"}, "inner": "eager"})
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        a = fwd(ids, use_cache=False).logits
        b = fwd(ids, use_cache=False).logits
    assert torch.equal(a, b)
    assert all(hasattr(m.qweight, _CACHE_ATTR) for m in model.modules() if isinstance(m, QuantLinear))
