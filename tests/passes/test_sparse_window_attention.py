"""Pass sparse_window_attention: structural rewrite on hand-built graphs, and end to end."""
import importlib.util

import pytest
import torch
import torch.fx

import llm_compile.ops.attention  # noqa: F401
from llm_compile.config import LLMAccelConfig, SWAConfig
from llm_compile.ops.swa import swa_config_json
from llm_compile.passes import sparse_window_attention as swa_pass
from llm_compile.runtime import swa
from llm_compile.runtime.swa.policies import config_from_json

ATT = torch.ops.llmaccel.attention.default
SWA = torch.ops.llmaccel.swa_attention.default


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _two_site_graph():
    def f(q, k, v, pk, pv, mask):
        a = ATT(q, k, v, None, None, None, 0.25, True, 0)
        b = ATT(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], pk, pv, mask, 0.25, False, 1)
        return a.sum() + b
    return torch.fx.symbolic_trace(f)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 6, 8, generator=g)
    k, v = torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    pk, pv = torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    return q, k, v, pk, pv, torch.ones(1, 1, 1, 31, dtype=torch.bool)


def test_every_site_rewritten_with_its_config_as_an_argument():
    gm = _two_site_graph()
    cfg = SWAConfig(sparsity=0.8, sink_tokens=4)
    res = swa_pass.run(gm, LLMAccelConfig(swa=cfg), None)
    assert res.changed and _count(gm, ATT) == 0 and _count(gm, SWA) == 2
    assert [m["site"] for m in res.matched] == [0, 1]
    assert [m["cached"] for m in res.matched] == [False, True]
    assert "4 sinks" in res.matched[0]["budget"] and res.stats["config"]["sparsity"] == 0.8
    nodes = [n for n in gm.graph.nodes if n.target is SWA]
    assert nodes[0].args[6:] == (0.25, True, 0, swa_config_json(cfg))   # no handle into process state
    assert config_from_json(nodes[0].args[9]) == cfg
    assert "llmaccel.swa_attention" in gm.code


def test_sparsity_zero_graph_equals_original_exactly():
    ins = _inputs()
    ref = _two_site_graph()(*ins)
    gm = _two_site_graph()
    swa_pass.run(gm, SWAConfig(sparsity=0.0), None)
    assert _count(gm, SWA) == 2 and torch.equal(gm(*ins), ref)


def test_rewritten_graph_runs_swa_numerics():
    """Sparse decode through the graph equals swa_step on an explicit state."""
    cfg = SWAConfig(sparsity=0.8, bucket=8)
    q, k, v, pk, pv, _ = _inputs(1)

    def f(q, k, v, pk, pv):
        return ATT(q, k, v, pk, pv, None, 0.25, False, 7)
    gm = torch.fx.symbolic_trace(f)
    swa_pass.run(gm, cfg, None)
    _, pk_s, pv_s = torch.ops.llmaccel.swa_attention(q[:, :, :2].repeat(1, 1, 15, 1), pk, pv, None, None,
                                                     None, 0.25, True, 7, swa_config_json(cfg))
    out = gm(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], pk_s, pv_s)   # the prefill's cache carries the state
    st = swa.new_state(1, 2, "cpu", cfg)
    swa.swa_step(st, q[:, :, :2].repeat(1, 1, 15, 1), pk, pv, 0.25, cfg, is_causal=True)
    ref = swa.swa_step(st, q[:, :, -1:], torch.cat([pk, k[:, :, -1:]], 2),
                       torch.cat([pv, v[:, :, -1:]], 2), 0.25, cfg)
    assert torch.equal(out, ref)
    state = pk_s.llmaccel_state.state
    assert state.steps == 1 and state.last_budget.total == 6


def test_keyword_form_and_no_sites():
    g = torch.fx.Graph()
    ph = [g.placeholder(n) for n in ("q", "k", "v")]
    node = g.call_function(ATT, tuple(ph), dict(k_cache=None, v_cache=None, attn_mask=None,
                                                 scale=0.5, is_causal=True, site=3, k_all=ph[1]))
    g.output(node)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    res = swa_pass.run(gm, SWAConfig(), None)
    new = next(n for n in gm.graph.nodes if n.target is SWA)
    assert res.matched[0]["site"] == 3 and new.args[3:9] == (None, None, None, 0.5, True, 3)
    assert new.kwargs == {}          # the op concatenates the cache itself (it returns it, with state)
    empty = torch.fx.symbolic_trace(lambda x: x + 1)
    res = swa_pass.run(empty, SWAConfig(), None)
    assert not res.changed and res.matched == []
    assert not swa_pass.run(empty, LLMAccelConfig(), None).changed  # swa off


needs_backend = pytest.mark.skipif(
    importlib.util.find_spec("llm_compile.passes.canonicalize_attention") is None,
    reason="canonicalize_attention pass not available yet")


@needs_backend
@pytest.mark.parametrize("sparsity", [0.0, 0.8])
def test_end_to_end_llama_generate(monkeypatch, sparsity):
    transformers = pytest.importorskip("transformers")
    from llm_compile.backend import llmaccel

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 40))
    gen = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)
    with torch.no_grad():
        ref = model.generate(ids, **gen)
    results, calls = [], []
    real_run = swa_pass.run

    def spy(gm, config, ctx):
        r = real_run(gm, config, ctx)
        results.append((r, _count(gm, ATT), _count(gm, SWA)))
        return r
    monkeypatch.setattr(swa_pass, "run", spy)

    def counting(gm, example_inputs):
        calls.append(gm)
        return llmaccel(gm, example_inputs, options={"swa": {"sparsity": sparsity}, "inner": "eager"})

    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=counting)
    with torch.no_grad():
        res = model.generate(ids, **gen, return_dict_in_generate=True)
    out = res.sequences
    torch._dynamo.reset()
    assert out.shape == (2, 104)
    assert 1 <= len(calls) <= 4, f"{len(calls)} graphs compiled for 64 decode steps"
    assert results and all(left == 0 and new == 2 for _, left, new in results)
    assert all(sorted(m["site"] for m in r.matched) == [0, 1] for r, _, _ in results)
    if sparsity == 0.0:
        assert torch.equal(out, ref)
    else:
        st = res.past_key_values.layers[0].keys.llmaccel_kv.state   # owned by generate()'s cache
        assert st.n == 103 and st.steps == 63 and st.batch == 2
        assert st.last_budget.total == 20 and not st.last_budget.dense  # k = round(103 * 0.1)
