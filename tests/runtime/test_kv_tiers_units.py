"""Tiered KV (kv_tiers), unit level: the store's placement (device / host / mmap tiers), the plan
(p1, p2, alpha, beta and why), the cost model measured once per machine and cached on disk, and
the options' checks. Model-level exactness: ``test_kv_tiers.py``."""
from __future__ import annotations

import gc
import json

import pytest
import torch

from llm_compile.config import KVTiersConfig, OptionsError, parse_options
from llm_compile.runtime.tiers.plan import TiersPlanError, make_plan
from llm_compile.runtime.tiers.store import TieredKV


def _plan(tmp_path, **kw):
    cfg = KVTiersConfig(**{"device_budget": 1 << 20, "cost_cache_dir": str(tmp_path), "recent": 4, **kw})
    return make_plan(cfg, batch=2, heads=3, q_heads=6, d=8, dv=8, dtype=torch.float32,
                     device=torch.device("cpu"), sites=1)



# ---- the store itself --------------------------------------------------------------------------

def test_tiered_kv_places_rows_and_reads_them_back(tmp_path):
    plan = _plan(tmp_path, p1=12, alpha=0.5)
    kv = TieredKV(2, 3, 8, 8, torch.float32, torch.device("cpu"), None, plan)
    k, v = torch.randn(2, 3, 40, 8), torch.randn(2, 3, 40, 8)
    kv.append(k[:, :, :10], v[:, :, :10])
    assert kv.host_tokens() == 0                                  # phase 1: n <= p1
    for t in range(10, 40):
        kv.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert kv.host_tokens() == 18 and kv.device_tokens() == 22   # half of the 36 outside recent 4
    assert kv.loc[36:40].eq(0).all()                             # the recent window stays
    fk, fv = kv.full()
    assert torch.equal(fk, k) and torch.equal(fv, v)
    idx = torch.tensor([[[0, 3, 17, 38]], [[1, 2, 30, 39]]])     # [B, 1, P]
    gk, gv = kv.rows(idx)
    ref = torch.gather(k, 2, idx.expand(2, 3, 4)[..., None].expand(2, 3, 4, 8))
    assert torch.equal(gk, ref) and kv.host_fetched > 0 and kv.dev_fetched > 0
    assert torch.equal(gv, torch.gather(v, 2, idx.expand(2, 3, 4)[..., None].expand(2, 3, 4, 8)))


def test_device_rows_never_exceed_the_budget(tmp_path):
    """alpha 0 past p1: the oldest device rows spill to the host instead of overflowing the budget."""
    row = 2 * 3 * 16 * 4
    plan = _plan(tmp_path, device_budget=20 * row, alpha=0.0)
    assert plan.cap == 20 and plan.p1 == 20
    kv = TieredKV(2, 3, 8, 8, torch.float32, torch.device("cpu"), None, plan)
    k = torch.randn(2, 3, 64, 8)
    kv.append(k[:, :, :50], k[:, :, :50])
    for t in range(50, 64):
        kv.append(k[:, :, t:t + 1], k[:, :, t:t + 1])
        assert kv.device_tokens() <= 20
    assert kv.spilled == 44 and kv.dev.capacity <= 20
    assert torch.equal(kv.full()[0], k)


def test_mmap_host_tier_is_a_file_deleted_with_the_cache(tmp_path):
    d = tmp_path / "kv"
    d.mkdir()
    plan = make_plan(KVTiersConfig(device_budget=1 << 20, p1=8, recent=4, alpha=1.0, mmap_dir=str(d),
                                   cost_cache_dir=str(tmp_path)),
                     batch=1, heads=2, q_heads=2, d=4, dv=4, dtype=torch.float32, device=torch.device("cpu"),
                     sites=1)
    assert plan.host == "mmap"
    kv = TieredKV(1, 2, 4, 4, torch.float32, torch.device("cpu"), None, plan, mmap_dir=str(d))
    k = torch.randn(1, 2, 300, 4)
    for t in range(0, 300, 10):
        kv.append(k[:, :, t:t + 10], -k[:, :, t:t + 10])
    files = list(d.iterdir())
    assert len(files) == 1 and kv.host_tokens() == 296 and files[0].stat().st_size >= 296 * 2 * 8 * 4
    assert torch.equal(kv.full()[0], k) and torch.equal(kv.full()[1], -k)
    del kv
    gc.collect()
    assert list(d.iterdir()) == []


# ---- plan and cost model -----------------------------------------------------------------------

def test_plan_gqa_keeps_beta_zero_and_says_why(tmp_path):
    """SmolLM2's shape: 3 KV heads of 9, head dim 64: K+V per token (384) < layer input (576)."""
    plan = make_plan(KVTiersConfig(cost_cache_dir=str(tmp_path)), batch=4, heads=3, q_heads=9, d=64, dv=64,
                     dtype=torch.float32, device=torch.device("cpu"), sites=30, swa={"sparsity": 0.8})
    assert plan.beta == 0 and "frees no memory" in plan.reasons["beta"] and "576" in plan.reasons["beta"]
    assert plan.p1 == plan.cap == (512 << 20) // (30 * 4 * 3 * 128 * 4)
    assert 0 < plan.alpha < 1
    lo, hi = sorted([plan.predicted_all_device_s, plan.predicted_all_host_s])   # on CPU both tiers are RAM
    assert lo * (1 - 1e-9) <= plan.predicted_step_s <= hi * (1 + 1e-9)


def test_plan_mha_says_what_recompute_would_save(tmp_path):
    plan = make_plan(KVTiersConfig(cost_cache_dir=str(tmp_path)), batch=1, heads=12, q_heads=12, d=64, dv=64,
                     dtype=torch.float32, device=torch.device("cpu"), sites=12)
    assert plan.beta == 0 and "would free 768 of 1536" in plan.reasons["beta"]
    off = make_plan(KVTiersConfig(cost_cache_dir=str(tmp_path), recompute="off"), batch=1, heads=12,
                    q_heads=12, d=64, dv=64, dtype=torch.float32, device=torch.device("cpu"), sites=12)
    assert "recompute off" in off.reasons["beta"]


def test_plan_phase_three_beta(tmp_path):
    """With a host budget that fills before max_context, MHA (GPT-2 small: 768 kept < 1536 K+V)
    plans beta = 1; GQA (SmolLM2: 576 + 2 x 64 kept > 384) keeps 0 and refuses an override."""
    kw = dict(dtype=torch.float32, device=torch.device("cpu"))
    cfg = KVTiersConfig(cost_cache_dir=str(tmp_path), host_budget=12 * 1536 * 4 * 500)
    mha = make_plan(cfg, batch=1, heads=12, q_heads=12, d=64, dv=64, sites=12, keep=768, **kw)
    assert mha.beta == 1.0 and "frees 768 values per token" in mha.reasons["beta"]
    # the host's K/V tokens leave room for the kept rows (768 values) of the phase-3 tokens
    assert mha.host_cap * 6144 + (8192 - mha.p1) * 3072 <= 500 * 6144 and mha.p2 == mha.p1 + mha.host_cap < 8192
    assert [mha.rec_share(t) for t in range(3)] == [True] * 3
    half = make_plan(KVTiersConfig(**{**cfg.__dict__, "beta": 0.5}), batch=1, heads=12, q_heads=12, d=64,
                     dv=64, sites=12, keep=768, **kw)
    assert half.beta == 0.5 and [half.rec_share(t) for t in range(4)] == [False, True, False, True]
    gqa = make_plan(cfg, batch=1, heads=3, q_heads=9, d=64, dv=64, sites=30, keep=704, **kw)
    assert gqa.beta == 0 and "576 + 2 x 64 = 704 values per token" in gqa.reasons["beta"]
    with pytest.raises(TiersPlanError, match="beta=0.5 refused.*frees no memory"):
        make_plan(KVTiersConfig(**{**cfg.__dict__, "beta": 0.5}), batch=1, heads=3, q_heads=9, d=64, dv=64,
                  sites=30, keep=704, **kw)


def test_cost_model_is_measured_once_and_cached_on_disk(tmp_path):
    first = _plan(tmp_path)
    files = list(tmp_path.glob("cost-*.json"))
    assert len(files) == 1 and first.cost["measured"]
    data = json.loads(files[0].read_text())
    assert set(data) == {"dev_row_s", "host_row_s", "h2d_bytes_s", "recompute_tok_s"}
    assert all(v > 0 for v in data.values())
    second = _plan(tmp_path)
    assert not second.cost["measured"] and second.cost["host_row_s"] == data["host_row_s"]


def test_plan_overrides_and_their_errors(tmp_path):
    assert _plan(tmp_path, p1=100, alpha=0.25).alpha == 0.25
    with pytest.raises(TiersPlanError, match="raise device_budget"):
        _plan(tmp_path, device_budget=1000)
    with pytest.raises(TiersPlanError, match="exceeds what device_budget holds"):
        _plan(tmp_path, device_budget=2 * 3 * 16 * 4 * 50, p1=60)


@pytest.mark.parametrize("options, match", [
    ({"kv_tiers": {"p1": 100, "p2": 50}}, "p2=50 < kv_tiers.p1=100"),
    ({"kv_tiers": {"p1": 10, "recent": 10}}, "p1=10 <= kv_tiers.recent=10"),
    ({"kv_tiers": {"beta": 0.5}}, "give kv_tiers.host_budget"),
    ({"kv_tiers": {"beta": 0.5, "p2": 40, "recompute": "off"}}, "drop one of them"),
    ({"kv_tiers": {"mmap_dir": "/nonexistent/dir"}}, "not an existing folder"),
    ({"kv_tiers": True, "kv_store": False}, "needs kv_store"),
    ({"kv_tiers": True, "offload": True}, "drop kv_tiers"),
])
def test_inconsistent_options_are_clear_errors(options, match):
    with pytest.raises(OptionsError, match=match):
        parse_options(options)


def test_kv_tiers_turns_the_store_on():
    cfg = parse_options({"kv_tiers": {"device_budget": 1 << 20}})
    assert cfg.kv_store is not None and cfg.kv_tiers.device_budget == 1 << 20
