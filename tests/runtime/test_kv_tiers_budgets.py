"""Phase 3 of tiered KV and the budgets: the kept rows (layer inputs kept to recompute K/V) live in
the host tier and count against ``host_budget`` (the pending ones, on the device, against
``device_budget``), in the plan and at run time; and cache edits past p2 (beam-search reorder,
crop) carry the kept rows along, so an edited cache equals the same edit on the device."""
from __future__ import annotations

import pytest
import torch

from kv_tiers_helpers import decode_logits as _run, kept_budget as _kept, kv_budget as _budget, site_kvs as _kvs
from model_zoo import build
from llm_compile.config import KVTiersConfig
from llm_compile.runtime.tiers.plan import make_plan

pytestmark = pytest.mark.filterwarnings("error::llm_compile.passes.manager.PassNotAppliedWarning")

FAMILIES = {"gpt2": {}, "llama_mha": {"kv_heads": 4}}


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(name: str):
    return build(name.split("_")[0], **FAMILIES.get(name, {}))


def _full_host(tmp_path, model, **kw):
    """A 20-token prompt and 36 decode steps (56 tokens, max_context 56), p1 = 24, recent 8, alpha 1:
    every decided position leaves the device. The host budget holds 16 K/V tokens (positions 0-15,
    decided when the length crosses p1: they have no kept row any more) and 32 kept rows (16-47)."""
    return {"p1": 24, "recent": 8, "alpha": 1.0, "max_context": 56, "cost_cache_dir": str(tmp_path),
            "device_budget": _budget(model, 2, 32), "host_budget": _budget(model, 2, 16) + _kept(model, 2, 32),
            **kw}


@pytest.mark.parametrize("name, beta", [("gpt2", None), ("llama_mha", None), ("gpt2", 1.0)])
def test_kept_rows_count_against_the_host_budget(name, beta, tmp_path):
    """Failed before: with beta = 1 the host tier filled its budget with K/V rows (host_cap =
    host_budget / row bytes) and the kept rows of phase 3 came on top (GPT-2: 40 token-rows' bytes
    of 32); planned, the old plan took p2 = p1 + 32 = max_context for "the host holds it all",
    set beta = 0, and the run raised HostTierFullError at 41 tokens."""
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(21))
    ref, ref_cache = _run(_model(name), {"swa": {"sparsity": 0.6}}, ids, 36)
    torch._dynamo.reset()
    model = _model(name)
    tiers = _full_host(tmp_path, model, **({"beta": beta} if beta else {}))
    got, cache = _run(model, {"swa": {"sparsity": 0.6}, "kv_tiers": tiers}, ids, 36)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    layers = model.config.num_hidden_layers
    for a, kv in zip(_kvs(ref_cache), _kvs(cache), strict=True):
        assert torch.equal(a.state.last_indices, kv.state.last_indices)
        assert kv.length == 56 and kv.device_tokens() > 0 and kv.host_tokens() > 0 and kv.recompute_tokens() > 0
        assert kv.recomputed > 0
        host = kv.host.nbytes() + kv.rec.nbytes()                 # K/V rows + kept rows, one layer
        assert 0 < kv.rec.nbytes() and host <= tiers["host_budget"] // layers
        assert kv.host.nbytes(allocated=True) + kv.rec.nbytes(allocated=True) <= tiers["host_budget"] // layers
        assert kv.host_nbytes() == host
        dev = kv.dev.nbytes(allocated=True) + kv.pending_nbytes()  # device rows + pending kept rows
        assert dev <= tiers["device_budget"] // layers


def test_plan_counts_kept_rows_in_host_and_device_bytes(tmp_path):
    """GPT-2 small's shape (12 layers, 12 heads of 64, 768 kept values per token against 1536):
    the K/V tokens the host takes leave room for the kept rows up to max_context, and the
    predicted host bytes count both. Failed before: host_cap was host_budget / K+V row bytes."""
    N, R, sites = 4096, 64, 12
    row, kept = 1536 * 4, 768 * 4
    host_budget = sites * 3000 * row
    cfg = KVTiersConfig(cost_cache_dir=str(tmp_path), host_budget=host_budget, device_budget=sites * 600 * row,
                        max_context=N, recent=R)
    plan = make_plan(cfg, batch=1, heads=12, q_heads=12, d=64, dv=64, dtype=torch.float32,
                     device=torch.device("cpu"), sites=sites, keep=768)
    assert plan.beta == 1.0 and plan.kept_row_bytes == kept
    kept_rows = min(N - R - plan.host_cap, N - plan.p1)          # phase-3 tokens at max_context, at most
    assert plan.host_cap * row + kept_rows * kept <= host_budget // sites
    assert plan.host_cap * row + kept_rows * kept > host_budget // sites - row   # the largest such host_cap
    assert plan.p2 == plan.p1 + plan.host_cap
    assert plan.predicted_host_bytes == sites * (plan.host_cap * row + kept_rows * kept) <= host_budget
    assert plan.cap * row + (R + 1) * kept <= cfg.device_budget // sites      # pending kept rows on the device
    assert "kept rows" in plan.reasons["p2"] and "pending kept rows" in plan.reasons["p1"]
    off = make_plan(KVTiersConfig(**{**cfg.__dict__, "recompute": "off"}), batch=1, heads=12, q_heads=12, d=64,
                    dv=64, dtype=torch.float32, device=torch.device("cpu"), sites=sites, keep=768)
    assert off.beta == 0 and off.kept_row_bytes == 0 and off.host_cap == 3000 and off.cap == 600

