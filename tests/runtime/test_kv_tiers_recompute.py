"""Phase 3 of tiered KV (recompute), model level: with budgets small enough to force all three
phases (device, host, recompute), SWA equals SWA with everything on the device (same selections)
and dense over tiers equals dense, on GPT-2 (fused c_attn, no RoPE), an MHA Llama (RoPE) and OPT
(separate k_proj/v_proj with biases, no RoPE); the
plan keeps beta = 0 for GQA and says why; beta > 0 where recompute frees no memory, or on a form
of attention the pass cannot recompute, fails the compile with the reason."""
from __future__ import annotations

import json

import pytest
import torch

from kv_tiers_helpers import (MHA_FAMILIES, decode_logits as _run, kept_budget as _kept, kv_budget as _budget,
                              mha_model as _model, site_kvs as _kvs)
from model_zoo import build
from llm_compile.runtime.tiers.store import TieredKV

pytestmark = pytest.mark.filterwarnings("error::llm_compile.passes.manager.PassNotAppliedWarning")



@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiers(tmp_path, model, **kw):
    """All three phases for a 20-token prompt and 36 decode steps (56 tokens per layer, max_context):
    p1 = 24, 32 device tokens (less 9 pending kept rows), recent 8, half the older rows to the host;
    the host holds 12 K/V tokens (p2 = 36) and the kept rows of 32 phase-3 tokens. These budgets hold
    56 tokens without phase 3 as well (the plan keeps beta = 0 then: test_kv_tiers_budgets covers
    a planned beta = 1), so ``_forced`` asks for beta = 1."""
    return {"p1": 24, "recent": 8, "alpha": 0.5, "max_context": 56, "cost_cache_dir": str(tmp_path),
            "device_budget": _budget(model, 2, 32), "host_budget": _budget(model, 2, 12) + _kept(model, 2, 32),
            **kw}


def _forced(tmp_path, model, **kw):
    return _tiers(tmp_path, model, beta=1.0, **kw)


def _three_phases(kv: TieredKV) -> None:
    assert isinstance(kv, TieredKV) and kv.length == 56
    assert 0 < kv.device_tokens() <= kv.plan.cap and 0 < kv.host_tokens() <= 12 and kv.recompute_tokens() > 0
    assert kv.host_nbytes() <= kv.plan.host_layer_bytes                 # K/V rows and kept rows
    assert kv.recomputed > 0                               # the selected/dense reads recomputed K/V
    assert kv.plan.beta == 1.0 and "frees" in kv.plan.reasons["beta"]


_SLOW = pytest.mark.slow  # the same path on another family: run with -m slow (suite under ~15 min)


@pytest.mark.parametrize("name", ["gpt2", "llama_mha", pytest.param("opt", marks=_SLOW)])
def test_swa_over_three_phases_equals_swa_on_the_device(name, tmp_path):
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(11))
    ref, ref_cache = _run(_model(name), {"swa": {"sparsity": 0.6}}, ids, 36)
    torch._dynamo.reset()
    model = _model(name)
    got, cache = _run(model, {"swa": {"sparsity": 0.6}, "kv_tiers": _forced(tmp_path, model)}, ids, 36)
    for a, b in zip(_kvs(ref_cache), _kvs(cache), strict=True):
        assert torch.equal(a.state.last_indices, b.state.last_indices)   # same selections
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)          # fp32 recompute: rounding only
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for kv in _kvs(cache):
        _three_phases(kv)
        assert kv.host_fetched > 0


@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama_mha", marks=_SLOW), pytest.param("opt", marks=_SLOW)])
def test_dense_over_three_phases_equals_dense(name, tmp_path):
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(12))
    ref, _ = _run(_model(name), {"kv_store": True}, ids, 36)
    torch._dynamo.reset()
    model = _model(name)
    got, cache = _run(model, {"kv_tiers": _forced(tmp_path, model)}, ids, 36)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for kv in _kvs(cache):
        _three_phases(kv)
        # dense reads recompute every phase-3 token of both sequences at every step after p2
        assert kv.recomputed >= 2 * kv.recompute_tokens()


def test_gqa_plan_keeps_beta_zero_and_says_why(tmp_path):
    """Llama GQA (2 KV heads of 4): the layer input and RoPE rows (64 + 2 x 16 = 96 values) are more
    than K+V (64): the plan keeps beta = 0; past the host budget the step raises with that reason."""
    model = build("llama")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(13))
    tiers = _tiers(tmp_path, model, host_budget=_budget(model, 2, 12))
    _, cache = _run(model, {"kv_tiers": tiers}, ids, 2)
    for kv in _kvs(cache):
        assert kv.plan.beta == 0 and kv.plan.p2 == 36
        assert "64 + 2 x 16 = 96 values per token" in kv.plan.reasons["beta"]
        assert "frees no memory" in kv.plan.reasons["beta"]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="host tier is full.*frees no memory"):
        _run(build("llama"), {"kv_tiers": tiers}, ids, 36)


def test_beta_on_gqa_is_refused_at_compile(tmp_path):
    model = build("llama")
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(14))
    with pytest.raises(Exception, match="beta=0.5 refused.*frees no memory"):
        _run(model, {"kv_tiers": _tiers(tmp_path, model, beta=0.5)}, ids, 1)


def _qwen3_mha():
    """Qwen3 normalises K (RMSNorm) between its projection and RoPE: not a recomputable form."""
    import transformers as tf

    cfg = tf.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, head_dim=16, vocab_size=128, max_position_embeddings=512)
    torch.manual_seed(0)
    return tf.Qwen3ForCausalLM(cfg).eval()


def test_beta_on_an_unsupported_form_is_a_clear_compile_error(tmp_path):
    model = _qwen3_mha()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(15))
    with pytest.raises(Exception, match="beta=1.0 asks for recompute.*supported: K/V from a linear projection"):
        _run(model, {"kv_tiers": _tiers(tmp_path, model, beta=1.0)}, ids, 1)


def test_unsupported_form_plans_beta_zero_and_reports_why(tmp_path):
    model = _qwen3_mha()
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(16))
    _, cache = _run(model, {"kv_tiers": _tiers(tmp_path, model), "debug_dir": str(tmp_path / "dump")}, ids, 1)
    assert all(kv.plan.beta == 0 and "passes no layer input" in kv.plan.reasons["beta"] for kv in _kvs(cache))
    recs = [r for p in (tmp_path / "dump").glob("run_*/graph_*/passes.json") for r in json.loads(p.read_text())
            if r.get("pass") == "local_kv_store"]
    notes = [r["stats"]["recompute"] for r in recs if "recompute" in r.get("stats", {})]
    assert notes and all("no recompute inputs" in n[0] for n in notes)


SPECS = {  # what the pass hands the op per site: [layer input, weights/biases, cos, sin] and the spec
    "gpt2": r"\[view_\d+, (arg\d+_1), (arg\d+_1)\], '\{\"hidden\": 64, \"k\": \[1, 2, 64, 128\], \"rope\": null, "
            r"\"v\": \[1, 2, 128, 192\]\}'\)",                      # c_attn's weight and bias: graph inputs
    "llama_mha": r"\[view_\d+, permute_\d+, permute_\d+, unsqueeze_\d+, unsqueeze_\d+\], '\{\"hidden\": 64, \"k\": "
                 r"\[1, -1, 0, 64\], \"rope\": \[3, 4\], \"v\": \[2, -1, 0, 64\]\}'\)",
    "opt": r"\[view_\d+, permute_\d+, (arg\d+_1), permute_\d+, (arg\d+_1)\], '\{\"hidden\": 64, \"k\": \[1, 2, 0, 64\], "
           r"\"rope\": null, \"v\": \[3, 4, 0, 64\]\}'\)",          # k_proj/v_proj weights (transposed) and biases
}


@pytest.mark.parametrize("name", sorted(MHA_FAMILIES))
def test_pass_hands_the_op_its_recompute_inputs_and_dump_shows_the_plan(name, tmp_path):
    import re

    model = _model(name)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(17))
    _run(model, {"kv_tiers": _forced(tmp_path, model), "debug_dir": str(tmp_path / "dump")}, ids, 1)
    graphs = sorted((tmp_path / "dump").glob("run_*/graph_*"))
    assert len(graphs) == 2                                             # prefill and decode
    for g in graphs:
        code = next(g.glob("*_local_kv_store.py")).read_text()
        calls = [ln for ln in code.splitlines() if "llmaccel.stored_attention.default(" in ln]
        assert len(calls) == 2 and all(re.search(SPECS[name], ln) for ln in calls), calls
        rec = [r for r in json.loads((g / "passes.json").read_text()) if r.get("pass") == "local_kv_store"][0]
        assert rec["stats"]["recompute"] == "recompute inputs passed at all 2 site(s)"
        plan = rec["stats"]["kv_tiers_plan"]
        assert plan["beta"] == 1.0 and plan["p2"] == 36
    if name in ("gpt2", "opt"):
        assert "keeps the layer input (64 values per token) instead of K+V (128 values)" in plan["reasons"]["beta"]
    else:
        assert "(64 + 2 x 16 = 96 values per token) instead of K+V (128 values)" in plan["reasons"]["beta"]


@pytest.mark.slow  # two Inductor compiles of two graphs each: minutes on a shared core
def test_swa_over_three_phases_under_inductor_equals_swa_on_the_device(tmp_path):
    """The op's recompute inputs (layer input, weights, a Tensor[] argument) under Inductor."""
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(18))
    outs, caches = [], []
    for tiers in (False, True):
        torch._dynamo.reset()
        model = _model("gpt2")
        opts = {"swa": {"sparsity": 0.6}, "inner": "inductor",
                **({"kv_tiers": _forced(tmp_path, model)} if tiers else {})}
        model.forward = torch.compile(model.forward, backend="llmaccel", options=opts)
        from transformers import DynamicCache

        cache, logits = DynamicCache(), []
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True).logits
            for _ in range(36):
                out = model(out[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
                logits.append(out)
        outs.append(torch.cat(logits, 1))
        caches.append(cache)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(outs[1].argmax(-1), outs[0].argmax(-1))
    for kv in _kvs(caches[1]):
        _three_phases(kv)


def test_phase_three_with_decode_matmul_equals_swa_on_the_device(monkeypatch, tmp_path):
    """decode_matmul's weight-major decode projections (forced here) are read as projections too."""
    from llm_compile.passes import decode_matmul

    monkeypatch.setattr(decode_matmul, "MIN_WEIGHT", 0)
    monkeypatch.setattr(decode_matmul, "measure", lambda *a: {"row_major_ms": 1.0, "weight_major_ms": 0.5})
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(19))
    opts = {"swa": {"sparsity": 0.6}, "decode_matmul": True, "debug_dir": str(tmp_path / "dump")}
    ref, _ = _run(_model("gpt2"), opts, ids, 36)
    torch._dynamo.reset()
    model = _model("gpt2")
    got, cache = _run(model, {**opts, "kv_tiers": _forced(tmp_path, model)}, ids, 36)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    for kv in _kvs(cache):
        _three_phases(kv)
    codes = [p.read_text() for p in (tmp_path / "dump").glob("run_*/graph_*/*_decode_matmul.py")]
    assert any('"k": [1, 2, 64, 128, 1]' in c for c in
               [p.read_text() for p in (tmp_path / "dump").glob("run_*/graph_*/*_local_kv_store.py")])
    assert codes                                            # decode_matmul did rewrite the decode graph
