"""``decode_matmul``: CPU decode matmuls rewritten as ``(W @ x^T)^T`` where measured faster."""
from __future__ import annotations

import pytest
import torch

import llm_compile  # noqa: F401  (registers the backend)
from llm_compile.passes import decode_matmul
from tests.checkpoints.tiny_models import tiny_llama
from tests.helpers import pass_record, record_compiles

LINEARS = 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + lm_head


@pytest.fixture
def always_faster(monkeypatch):
    """Every weight counts as big and the weight-major form as faster: the tiny model's linears
    are all candidates, independently of this machine's timings."""
    monkeypatch.setattr(decode_matmul, "MIN_WEIGHT", 0)
    monkeypatch.setattr(decode_matmul, "measure", lambda *a: {"row_major_ms": 1.0, "weight_major_ms": 0.5})


def _generate(fwd_model, ids, steps=6):
    with torch.no_grad():
        return fwd_model.generate(ids, max_new_tokens=steps, do_sample=False)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_decode_graph_rewritten_prefill_left_alone_tokens_equal_eager(always_faster, inner):
    torch._dynamo.reset()
    model = tiny_llama(seed=3)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))  # prefill: 24 rows
    want = _generate(model, ids)
    with torch.no_grad():
        want_logits = model(ids).logits
    compiled = tiny_llama(seed=3)
    compiled.forward = torch.compile(compiled.forward, backend="llmaccel",
                                     options={"decode_matmul": True, "inner": inner})
    with record_compiles() as recs:
        got = _generate(compiled, ids)
        with torch.no_grad():
            got_logits = compiled(ids).logits
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    kinds = []
    for r in recs:
        rec = pass_record(r, "decode_matmul")
        assert {e["m"] for e in rec["matched"]} <= {2}  # batch 2 x 1 token
        assert len(rec["matched"]) + len(rec["skipped"]) == LINEARS
        assert all("24 rows (> 16" in s["reason"] for s in rec["skipped"])
        if not rec["skipped"]:  # a decode graph: every linear rewritten
            assert rec["op_count_delta"]["aten.permute.default"] == LINEARS  # +x^T +out^T -W^T
            kinds.append("decode")
        else:  # generate's prefill: only lm_head (last token) rewritten; the plain forward: none
            kinds.append("prefill" if len(rec["matched"]) == 1 else "full" if not rec["matched"] else "?")
    assert sorted(set(kinds)) == ["decode", "full", "prefill"], kinds


def test_decode_logits_equal_eager_each_step(always_faster):
    """Logits of every decode step (not only the argmax) match eager to float rounding."""
    torch._dynamo.reset()
    model = tiny_llama(seed=4)
    compiled = tiny_llama(seed=4)
    compiled.forward = torch.compile(compiled.forward, backend="llmaccel",
                                     options={"decode_matmul": True, "inner": "eager"})
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(2))
    from transformers import DynamicCache

    with torch.no_grad():
        ca, cb = DynamicCache(), DynamicCache()
        la, lb = model(ids, past_key_values=ca).logits, compiled(ids, past_key_values=cb).logits
        for _ in range(4):
            tok = la[:, -1:].argmax(-1)
            la = model(tok, past_key_values=ca).logits
            lb = compiled(tok, past_key_values=cb).logits
            torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["small_weights", "not_faster"])
def test_small_weights_and_slower_form_left_alone(monkeypatch, case):
    """Weights under MIN_WEIGHT (the tiny model's, with the real threshold), and a weight-major
    form that saves less than MARGIN, are skipped, each with its reason; tokens stay eager's."""
    torch._dynamo.reset()
    if case == "not_faster":
        monkeypatch.setattr(decode_matmul, "MIN_WEIGHT", 0)
        monkeypatch.setattr(decode_matmul, "measure", lambda *a: {"row_major_ms": 1.0, "weight_major_ms": 0.95})
    ids = torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(3))
    want = _generate(tiny_llama(seed=5), ids, steps=3)
    model = tiny_llama(seed=5)
    model.forward = torch.compile(model.forward, backend="llmaccel",
                                  options={"decode_matmul": True, "inner": "eager"})
    with record_compiles() as recs:
        got = _generate(model, ids, steps=3)
    assert torch.equal(got, want)
    records = [pass_record(r, "decode_matmul") for r in recs]
    assert records and not any(rec["matched"] for rec in records)
    reasons = {s["reason"] for rec in records for s in rec["skipped"]}
    expect = "elements (< 65536)" if case == "small_weights" else "not faster on this machine"
    assert reasons and all(expect in r for r in reasons), reasons


def test_measure_times_both_forms_on_real_tensors():
    """``measure`` runs real matmuls (also when called under fake mode) and reports both forms."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    decode_matmul.measure.cache_clear()
    with FakeTensorMode():
        t = decode_matmul.measure(4, 64, 256, True, torch.float32, 1)
    assert set(t) == {"row_major_ms", "weight_major_ms"}
    assert all(0 < v < 1e3 for v in t.values())


def test_addmm_bias_kept():
    """``addmm(bias, x, W^T)`` (a Linear with bias) becomes ``(W @ x^T)^T + bias``, same numbers."""
    import torch.fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from llm_compile.config import parse_options
    from llm_compile.passes.base import PassContext

    lin = torch.nn.Linear(32, 48)
    x = torch.randn(3, 32)

    def f(x, w, b):
        return torch.nn.functional.linear(x, w, b).relu()

    gm = make_fx(f)(x, lin.weight.detach(), lin.bias.detach())
    mode = FakeTensorMode()
    for node, real in zip((n for n in gm.graph.nodes if n.op == "placeholder"), (x, lin.weight, lin.bias)):
        node.meta["val"] = mode.from_tensor(real.detach())
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, mode).propagate(*(n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"))
    want = gm(x, lin.weight.detach(), lin.bias.detach())
    old_min, old_measure = decode_matmul.MIN_WEIGHT, decode_matmul.measure
    decode_matmul.MIN_WEIGHT = 0
    decode_matmul.measure = lambda *a: {"row_major_ms": 1.0, "weight_major_ms": 0.1}
    try:
        res = decode_matmul.run(gm, parse_options({"decode_matmul": True}), PassContext("g", []))
    finally:
        decode_matmul.MIN_WEIGHT, decode_matmul.measure = old_min, old_measure
    gm.graph.eliminate_dead_code()
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert len(res.matched) == 1 and torch.ops.aten.addmm.default not in targets
    assert torch.ops.aten.add.Tensor in targets
    torch.testing.assert_close(gm(x, lin.weight.detach(), lin.bias.detach()), want, rtol=1e-6, atol=1e-6)
