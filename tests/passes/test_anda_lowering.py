"""Anda lowering pass: structural and numerical tests on a quantized HF Llama and hand-written graphs."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # read when triton is first imported

import json  # noqa: E402
from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from anda_graph_helpers import ANDA, _lower, aten_graph, count, run_graph  # noqa: E402
from llm_compile.passes import anda_lowering  # noqa: E402
from llm_compile.quantize import QuantLinear, quantize_weights  # noqa: E402


def _llama(bits=4, group=64, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    return quantize_weights(model, bits=bits, group_size=group)


@pytest.fixture(scope="module")
def llama_graph():
    model = _llama()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))

    def logits(ids):
        return model(ids, use_cache=False).logits

    with torch.no_grad():
        eager = logits(ids)
    gm, ctx = aten_graph(logits, ids)
    return model, gm, ctx, eager


def test_llama_structure(llama_graph):
    model, gm, ctx, _ = llama_graph
    n_quant = len(model.llmaccel_quantized)
    assert n_quant == 14 and count(gm, torch.ops.aten.mm.default) >= n_quant
    bits = {"qkv": 3, "o": 5, "gate_up": 7, "down": 9}
    new, ctx2, res = _lower(gm, ctx, mantissa_bits=bits, kernel="reference")
    assert res.changed and count(new, ANDA) == n_quant and not res.skipped
    assert Counter(m["kind"] for m in res.matched) == {"qkv": 6, "o": 2, "gate_up": 4, "down": 2}
    for node in new.graph.nodes:
        if node.target == ANDA:
            kind = anda_lowering.module_kind(ctx.placeholder_sources[node.args[1].name])
            assert node.args[3] is None and node.args[5:] == (bits[kind], 4, 64, "reference")
    # the dequantization chains are gone: no bit ops left, only the lm_head (fp) mm remains
    assert count(new, torch.ops.aten.bitwise_and.Scalar) == 0
    assert count(new, torch.ops.aten.mm.default) == 1


def test_llama_numerics_reference_m16_close_to_eager(llama_graph):
    _, gm, ctx, eager = llama_graph
    new, _, _ = _lower(gm, ctx, mantissa_bits=16, kernel="reference")
    out = run_graph(new, ctx)
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)
    low, _, _ = _lower(gm, ctx, mantissa_bits=2, kernel="reference")
    assert not torch.allclose(run_graph(low, ctx), eager, rtol=2e-3, atol=2e-3)


def test_llama_triton_matches_reference(llama_graph):
    _, gm, ctx, _ = llama_graph
    tri, ctx_t, res = _lower(gm, ctx, mantissa_bits=7, kernel="triton")
    ref, _, _ = _lower(gm, ctx, mantissa_bits=7, kernel="reference")
    torch.testing.assert_close(run_graph(tri, ctx), run_graph(ref, ctx), rtol=1e-4, atol=1e-4)
    assert res.stats["kernel"] == "triton"
    assert any(name.startswith("anda_gemm_m7_w4_g64") for name in ctx_t.artifacts)
    assert any(name.startswith("anda_gemv_m7_w4_g64") for name in ctx_t.artifacts)


class _Two(nn.Module):
    def __init__(self, name, bias=False, bits=8):
        super().__init__()
        lin = nn.Linear(128, 64, bias=bias)
        self.add_module(name, QuantLinear.from_linear(lin, bits=bits, group_size=64))
        self.fp = nn.Linear(64, 32)
        self.name = name

    def forward(self, x):
        return self.fp(getattr(self, self.name)(x))


def test_addmm_bias_int8_and_fp_matmul_untouched():
    m = _Two("down_proj", bias=True, bits=8)
    x = torch.randn(4, 128)
    gm, ctx = aten_graph(m, x)
    assert count(gm, torch.ops.aten.addmm.default) == 2
    new, _, res = _lower(gm, ctx, mantissa_bits=16, kernel="reference")
    assert count(new, ANDA) == 1 and count(new, torch.ops.aten.addmm.default) == 1
    (site,) = res.matched
    assert site["form"] == "addmm" and site["kind"] == "down" and site["weight_bits"] == 8
    torch.testing.assert_close(run_graph(new, ctx), m(x), rtol=2e-3, atol=2e-3)


def test_unknown_kind_is_skipped_with_reason():
    m = _Two("mystery")
    gm, ctx = aten_graph(m, torch.randn(2, 128))
    new, _, res = _lower(gm, ctx, mantissa_bits=7)
    assert not res.changed and count(new, ANDA) == 0
    (skip,) = res.skipped
    assert "unknown module kind" in skip["reason"] and "mystery" in skip["reason"]


class _OddInt(nn.Module):
    """Integer weights used in a way that is not QuantLinear's dequantization (must not be lowered)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.randint(-127, 128, (64, 128), dtype=torch.int8))
        self.register_buffer("scales", torch.rand(64, 2) + 0.5)

    def forward(self, x):
        w = (self.qweight.float().reshape(64, 2, 64) * self.scales.unsqueeze(-1)).reshape(64, 128)
        return x @ w.flip(0).t() + x @ (w + 1).t()


def test_foreign_integer_weights_are_skipped():
    gm, ctx = aten_graph(_OddInt(), torch.randn(2, 128))
    ctx.placeholder_sources = {k: v.replace("qweight", "q_proj_buffers_qweight") for k, v in
                               ctx.placeholder_sources.items()}
    new, _, res = _lower(gm, ctx, mantissa_bits=7)
    assert count(new, ANDA) == 0 and len(res.skipped) == 2
    reasons = sorted(s["reason"] for s in res.skipped)
    assert "non-elementwise ops" in reasons[0] and ("rev" in reasons[0] or "flip" in reasons[0])
    assert "not QuantLinear's symmetric INT8 dequantization (group 64)" in reasons[1]


def test_bmm_form():
    ql = QuantLinear.from_linear(nn.Linear(128, 32), bits=4, group_size=128)

    def f(x):
        w = ql.dequantized_weight(x.dtype)
        return torch.bmm(x, w.t().unsqueeze(0).expand(x.shape[0], -1, -1))

    x = torch.randn(2, 3, 128)
    gm, ctx = aten_graph(f, x)
    ctx.placeholder_sources = {k: "L_self_modules_up_proj_buffers_qweight_" if "qweight" in v else v
                               for k, v in ctx.placeholder_sources.items()}
    new, _, res = _lower(gm, ctx, mantissa_bits=16, kernel="reference")
    assert [m["form"] for m in res.matched] == ["bmm"] and count(new, torch.ops.aten.bmm.default) == 0
    torch.testing.assert_close(run_graph(new, ctx), f(x), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("source,kind", [
    ("L_self_modules_model_modules_layers_modules_0_modules_self_attn_modules_q_proj_buffers_qweight_", "qkv"),
    ("l_self_modules_model_modules_layers_modules_11_modules_self_attn_modules_o_proj_buffers_qweight_", "o"),
    ("L_self_modules_model_modules_layers_modules_3_modules_mlp_modules_gate_up_proj_buffers_qweight_",
     "gate_up"),
    ("L_self_modules_transformer_modules_h_modules_0_modules_mlp_modules_c_proj_buffers_qweight_", "down"),
    ("L_self_modules_transformer_modules_h_modules_0_modules_attn_modules_c_proj_buffers_qweight_", "o"),
    ("L_self_modules_lm_head_buffers_qweight_", None),
])
def test_module_kind(source, kind):
    assert anda_lowering.module_kind(source) == kind


def test_end_to_end_backend(tmp_path):
    backend = pytest.importorskip("llm_compile.backend")
    assert backend
    model = _llama(layers=1)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
    torch._dynamo.reset()
    fwd = torch.compile(model.forward, backend="llmaccel",
                        options={"anda": {"mantissa_bits": 16, "kernel": "triton"}, "inner": "eager",
                                 "debug_dir": str(tmp_path)})
    with torch.no_grad():
        out = fwd(ids, use_cache=False).logits
    torch.testing.assert_close(out, eager, rtol=2e-3, atol=2e-3)
    records = [json.loads(p.read_text()) for p in tmp_path.rglob("passes.json")]
    anda = [r for recs in records for r in recs if r["pass"] == "anda_lowering"]
    assert sum(len(r["matched"]) for r in anda) == len(model.llmaccel_quantized) == 7
    assert any(tmp_path.rglob("anda_gemm_m16_*.py"))
