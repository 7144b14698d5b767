"""Warm compile (issue 17, item 3): graphs that ``swa``/``kv_store`` rewrote before Inductor are
served by Inductor's FX graph cache in a later compile (another process in practice), with the
same tokens; ``offload`` graphs, which carry a handle into this process's worker pool, never are."""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters

import model_zoo
from llm_compile.backend import _fx_cache_patch
from llm_compile.config import parse_options

fresh_cache = getattr(torch._inductor.utils, "fresh_cache", None) or torch._inductor.utils.fresh_inductor_cache


def _generate(options) -> torch.Tensor:
    model = model_zoo.build("llama", layers=1)
    model.forward = torch.compile(model.forward, backend="llmaccel", options=options)
    ids = torch.randint(0, model_zoo.VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)


def test_swa_graphs_hit_inductors_fx_graph_cache_on_a_second_compile():
    """Regression: these graphs were compiled with ``fx_graph_cache`` forced off, so every process
    recompiled them from scratch (warm compile 4.3x stock Inductor's, RESULTS.md)."""
    options = {"swa": {"sparsity": 0.8, "bucket": 4, "kernel": "torch"}}
    with fresh_cache():
        counters.clear()
        first = _generate(options)
        assert counters["inductor"]["fxgraph_cache_miss"] >= 2 and counters["inductor"]["fxgraph_cache_hit"] == 0
        torch._dynamo.reset()
        counters.clear()
        second = _generate(options)
        hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    assert hits >= 2 and misses == 0
    assert torch.equal(first, second)


def test_offload_graphs_are_never_cached():
    assert _fx_cache_patch(parse_options({"offload": {"workers": 1}})) == {"fx_graph_cache": False}
    assert _fx_cache_patch(parse_options({"swa": {"sparsity": 0.8}})) == {}
