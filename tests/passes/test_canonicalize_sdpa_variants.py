"""Every ATen SDPA variant (GPU ones included) is recognised, on hand-built ATen graphs.

The GPU kernels cannot run here, so the flash/efficient/cudnn graphs are checked structurally on
meta tensors; the math variant also runs and is compared numerically.
"""
import operator

import pytest
import torch

from llm_compile.config import parse_options
from llm_compile.passes.base import PassContext
from llm_compile.passes.canonicalize_attention import run

aten = torch.ops.aten
B, HQ, HKV, L, D = 2, 4, 2, 5, 8


def _graph(op, extra_args, kwargs, device="meta", gqa=False):
    g = torch.fx.Graph()
    hk = HKV if gqa else HQ
    q, k, v = g.placeholder("q"), g.placeholder("k"), g.placeholder("v")
    q.meta["val"] = torch.empty(B, HQ, L, D, device=device)
    k.meta["val"] = torch.empty(B, hk, L, D, device=device)
    v.meta["val"] = torch.empty(B, hk, L, D, device=device)
    node = g.call_function(op, (q, k, v, *extra_args), kwargs)
    out = g.call_function(operator.getitem, (node, 0))
    out.meta["val"] = torch.empty(B, L, HQ, D, device=device).transpose(1, 2)
    lse = g.call_function(operator.getitem, (node, 1))  # unused extra output: allowed
    lse.meta["val"] = torch.empty(B, HQ, L, device=device)
    g.output((out,))
    return torch.fx.GraphModule(torch.nn.Module(), g)


VARIANTS = {
    "flash": (aten._scaled_dot_product_flash_attention.default, (0.0, True, False), {"scale": 0.2}, True, None),
    "efficient": (aten._scaled_dot_product_efficient_attention.default, (None, False, 0.0, True), {"scale": 0.2}, True, None),
    "cudnn": (aten._scaled_dot_product_cudnn_attention.default, (None, False, 0.0, True, False), {"scale": 0.2}, True, None),
    "flash_cpu": (aten._scaled_dot_product_flash_attention_for_cpu.default, (0.0, True), {"scale": 0.2}, True, None),
    "math": (aten._scaled_dot_product_attention_math.default, (None, 0.0, True), {"scale": 0.2}, True, None),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_recognised(name):
    op, extra, kw, causal, _ = VARIANTS[name]
    gm = _graph(op, extra, kw, gqa=name in ("flash_cpu", "math"))
    res = run(gm, parse_options({"canonicalize": True}), PassContext("g", []))
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert res.stats["sites"] == 1 and torch.ops.llmaccel.attention.default in ops
    m = res.matched[0]
    assert m["scale"] == pytest.approx(0.2) and m["is_causal"] is causal and m["form"] == "sdpa"


def test_variant_with_used_logsumexp_is_skipped():
    gm = _graph(aten._scaled_dot_product_efficient_attention.default, (None, True, 0.0, False), {})
    lse = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem][1]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_node.args = ((out_node.args[0][0], lse),)
    res = run(gm, parse_options({"canonicalize": True}), PassContext("g", []))
    assert res.stats["sites"] == 0 and "logsumexp" in res.skipped[0]["reason"]


def test_math_variant_numerics():
    op, extra, kw, _, _ = VARIANTS["math"]
    gm = _graph(op, extra, {**kw, "enable_gqa": True}, device="cpu", gqa=True)
    gm.recompile()
    q, k, v = torch.randn(B, HQ, L, D), torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    ref = gm(q, k, v)[0]
    run(gm, parse_options({"canonicalize": True}), PassContext("g", []))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    torch.testing.assert_close(gm(q, k, v)[0], ref, rtol=1e-5, atol=1e-5)
