"""Phase 3 of tiered KV and the budgets: the kept rows (layer inputs kept to recompute K/V) live in
the host tier and count against ``host_budget`` (the pending ones, on the device, against
``device_budget``), in the plan and at run time; and cache edits past p2 (beam-search reorder,
crop) carry the kept rows along, so an edited cache equals the same edit on the device."""
from __future__ import annotations

import pytest
import torch

from kv_tiers_helpers import (decode_logits as _run, kept_budget as _kept, kv_budget as _budget,
                              mha_model as _model, site_kvs as _kvs)
from llm_compile.config import KVTiersConfig
from llm_compile.runtime.tiers.plan import make_plan
from llm_compile.runtime.tiers.store import TieredKV

pytestmark = pytest.mark.filterwarnings("error::llm_compile.passes.manager.PassNotAppliedWarning")



@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _full_host(tmp_path, model, **kw):
    """A 20-token prompt and 36 decode steps (56 tokens, max_context 56), p1 = 24, recent 8, alpha 1:
    every decided position leaves the device. The host budget holds 16 K/V tokens (positions 0-15,
    decided when the length crosses p1: they have no kept row any more) and 32 kept rows (16-47)."""
    return {"p1": 24, "recent": 8, "alpha": 1.0, "max_context": 56, "cost_cache_dir": str(tmp_path),
            "device_budget": _budget(model, 2, 32), "host_budget": _budget(model, 2, 16) + _kept(model, 2, 32),
            **kw}


@pytest.mark.parametrize("name, beta", [("gpt2", None), pytest.param("llama_mha", None, marks=pytest.mark.slow),
                                        ("gpt2", 1.0)])  # slow: the same rule on a rotary model (-m slow)
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


def _three_phase_tiers(tmp_path, model):
    """As test_kv_tiers_recompute's: p1 = 24, recent 8, alpha 0.5, 12 host K/V tokens (p2 = 36) and
    the kept rows of 32 phase-3 tokens, max_context 56, beta 1 (these budgets would hold 56 tokens
    without phase 3)."""
    return {"p1": 24, "recent": 8, "alpha": 0.5, "max_context": 56, "cost_cache_dir": str(tmp_path),
            "device_budget": _budget(model, 2, 32), "host_budget": _budget(model, 2, 12) + _kept(model, 2, 32),
            "beta": 1.0}


def _edited_decode(model, options, ids):
    """Prefill 20 tokens, decode to 44, swap the two sequences (reorder_cache), decode to 50, crop
    12 tokens (back to 38: positions already in phase 3 go), decode to 56; the logits of every step
    and the per-layer stores just before each edit."""
    from llm_compile import LLMAccelCache

    model.forward = torch.compile(model.forward, backend="llmaccel", options={"inner": "eager", **options})
    cache, logits, before = LLMAccelCache(), [], []
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True).logits
        for step in range(48):
            tok = out[:, -1:].argmax(-1)
            if step == 24:
                before.append([(kv.recompute_tokens(), kv.host_tokens()) for kv in _kvs(cache) if isinstance(kv, TieredKV)])
                cache.reorder_cache(torch.tensor([1, 0]))
                tok = tok.flip(0)
            if step == 30:
                before.append([(kv.recompute_tokens(), kv.host_tokens()) for kv in _kvs(cache) if isinstance(kv, TieredKV)])
                cache.crop(-12)
            out = model(tok, past_key_values=cache, use_cache=True).logits
            logits.append(out)
    return torch.cat(logits, 1), cache, before


@pytest.mark.parametrize("name", ["gpt2", pytest.param("llama_mha", marks=pytest.mark.slow)])  # -m slow
def test_reorder_and_crop_past_p2_equal_the_same_edits_on_the_device(name, tmp_path):
    """Failed before: map_batch and crop rebuilt the tiers from full K/V without the kept rows,
    so the rebuilt cache (past p2) placed its phase-3 tokens on the host and raised HostTierFullError."""
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(22))
    ref, ref_cache, _ = _edited_decode(_model(name), {"swa": {"sparsity": 0.6}}, ids)
    torch._dynamo.reset()
    model = _model(name)
    got, cache, before = _edited_decode(model, {"swa": {"sparsity": 0.6},
                                                "kv_tiers": _three_phase_tiers(tmp_path, model)}, ids)
    assert len(before) == 2 and all(rec > 0 and host > 0 for e in before for rec, host in e)   # past p2
    for a, kv in zip(_kvs(ref_cache), _kvs(cache), strict=True):
        assert torch.equal(a.state.last_indices, kv.state.last_indices)
        assert kv.length == 56 and kv.recompute_tokens() > 0 and kv.host_nbytes() <= kv.plan.host_layer_bytes
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def _store_with_phase_three(tmp_path, per_sequence=False):
    """A TieredKV (batch 2, 2 KV heads of 4, layer input of 4 values: K/V = x @ W) filled with 48
    tokens through all three phases; returns it and the full K/V it must hold. ``per_sequence``:
    the budgets of the plan for another batch grow with it (the same tokens fit)."""
    from llm_compile.runtime.tiers.recompute import KVRecompute

    g = torch.Generator().manual_seed(5)
    wk, wv = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    spec = {"hidden": 4, "k": [1, -1, 0, 8], "v": [2, -1, 0, 8], "rope": None}
    row, kept = 2 * 2 * 8 * 4, 2 * 4 * 4

    def plan(batch):
        scale = batch // 2 if per_sequence else 1
        cfg = KVTiersConfig(cost_cache_dir=str(tmp_path), p1=8, recent=4, alpha=0.5, beta=1.0, max_context=48,
                            device_budget=24 * row * scale, host_budget=(8 * row + 40 * kept) * scale)
        return make_plan(cfg, batch=batch, heads=2, q_heads=2, d=4, dv=4, dtype=torch.float32,
                         device=torch.device("cpu"), sites=1, keep=4, hidden=4)

    kv = TieredKV(2, 2, 4, 4, torch.float32, torch.device("cpu"), None, plan(2), plan)
    x = torch.randn(2, 48, 4, generator=g)
    for t in range(48):
        rc = KVRecompute(spec, [x[:, t], wk, wv], 2, 4, 4)
        k, v = ((x[:, t] @ w).view(2, 1, 2, 4).transpose(1, 2) for w in (wk, wv))
        kv.recompute = rc
        kv.append(k, v, rc.kept(2))
    ks, vs = (torch.einsum("btc,cf->btf", x, w).view(2, 48, 2, 4).transpose(1, 2) for w in (wk, wv))
    return kv, ks, vs


def test_store_edits_keep_every_tier_and_the_kept_rows(tmp_path):
    """Unit level: reorder, a larger batch (repeat_interleave) and crop past p2 keep each position
    in its tier, phase-3 tokens recomputed from their (edited) kept rows; a larger batch whose
    placement does not fit its plan raises, naming the budgets."""
    from llm_compile.runtime.tiers.store import HostTierFullError

    kv, ks, vs = _store_with_phase_three(tmp_path)
    assert kv.device_tokens() and kv.host_tokens() and kv.recompute_tokens()
    loc = kv.loc[:48].clone()
    idx = torch.tensor([1, 0])
    swapped = kv.map_batch(lambda t: t.index_select(0, idx.to(t.device)))
    assert torch.equal(swapped.loc[:48], loc) and torch.equal(swapped.full()[0], ks[idx])
    assert torch.equal(swapped.full()[1], vs[idx])
    pos = torch.tensor([[[0, 9, 30, 47]]]).expand(2, 1, 4)                 # every tier
    assert torch.equal(swapped.rows(pos)[0], ks[idx][:, :, [0, 9, 30, 47]])
    big = _store_with_phase_three(tmp_path, per_sequence=True)[0]
    wide = big.map_batch(lambda t: t.repeat_interleave(2, dim=0))
    assert wide.shape[0] == 4 and torch.equal(wide.full()[0], ks.repeat_interleave(2, 0))
    assert wide.recompute_tokens() == big.recompute_tokens() and wide.plan.row_bytes == 2 * big.plan.row_bytes
    with pytest.raises(HostTierFullError, match="edited from batch 2 to 4 does not fit"):
        kv.map_batch(lambda t: t.repeat_interleave(2, dim=0))
    kv.crop(30)
    assert kv.length == 30 and torch.equal(kv.loc[:30], loc[:30])
    assert torch.equal(kv.full()[0], ks[:, :, :30]) and torch.equal(kv.full()[1], vs[:, :, :30])
    assert kv.rec.used == int((loc[:30] == 2).sum()) and kv.host.used == int((loc[:30] == 1).sum())
