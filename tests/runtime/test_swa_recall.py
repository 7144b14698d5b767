"""Query-aware SWA policies (issue 15): "quest", "recall", "oracle", the page summaries they keep
in the sequence's state, the budget that counts those summaries, and SnapKV seeding."""
import math

import pytest
import torch

from helpers import compiled_llama as _model, prompt_ids as _ids
from llm_compile.config import SWAConfig
from llm_compile.ops.attention import dense_attention
from llm_compile.runtime import swa
from llm_compile.runtime.swa.pages import PageSummary
from llm_compile.runtime.swa.policies import SnapKVSeed
from llm_compile.runtime.swa.state import compute_budget

SCALE = 0.3


def _qkv(B, Hq, Hkv, L, D=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g),
            torch.randn(B, Hkv, L, D, generator=g), g)


def _run(cfg, B=2, Hq=4, Hkv=2, L=90, steps=6, D=8, seed=1):
    """Prefill L tokens and decode ``steps`` random tokens; returns the state, last q, k, v."""
    q, k, v, g = _qkv(B, Hq, Hkv, L, D, seed)
    st = swa.new_state(B, Hkv, "cpu", cfg)
    swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
    qd = None
    for _ in range(steps):
        k = torch.cat([k, torch.randn(B, Hkv, 1, D, generator=g)], 2)
        v = torch.cat([v, torch.randn(B, Hkv, 1, D, generator=g)], 2)
        qd = torch.randn(B, Hq, 1, D, generator=g)
        out = swa.swa_step(st, qd, k, v, SCALE, cfg)
    return st, qd, k, v, out


def _brute_pages(k, P):
    """Elementwise min/max per page [B, H, pages, D] of the keys k [B, H, n, D]."""
    n = k.shape[2]
    mins = torch.stack([k[:, :, i:i + P].amin(2) for i in range(0, n, P)], 2)
    maxs = torch.stack([k[:, :, i:i + P].amax(2) for i in range(0, n, P)], 2)
    return mins, maxs


# ---- budget -----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["quest", "recall"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("dims", [(64, 64), (128, 64)])
def test_budget_reads_at_most_one_minus_sparsity_including_summaries(policy, sparsity, dims):
    D, Dv = dims
    for n in list(range(40, 400, 7)) + [1024, 4096, 8193]:
        cfg = SWAConfig(sparsity=sparsity, policy=policy, page_size=16, scorer="pages")
        b = compute_budget(n, cfg, D, Dv)
        if b.dense:
            continue
        assert b.sinks + b.recent + b.global_ + b.query == b.total
        summaries = b.pages * 2 * D / (D + Dv)
        assert b.reads == pytest.approx(b.total + summaries)
        assert b.reads <= n * (1 - sparsity) + 1e-9, b.describe()
        if b.pages:
            assert b.pages == math.ceil(n / 16)
            assert b.query > 0 and "page summaries" in b.describe()
    b = compute_budget(1024, SWAConfig(sparsity=0.8, policy="recall", scorer="pages"))
    assert (b.total, b.pages, b.reads) == (204 - 64, 64, 204.0)
    assert b.read_fraction <= 0.2


def test_budget_oracle_reads_every_key():
    b = compute_budget(1000, SWAConfig(sparsity=0.8, policy="oracle"), 64, 64)
    assert b.query == b.total == 200 and b.recent == 0
    assert b.reads == pytest.approx((1000 + 200) / 2)  # every key, the selected values
    assert "reads every key" in swa.state.describe_policy(SWAConfig(sparsity=0.8, policy="oracle"))


def test_tiny_budget_reads_no_summaries():
    b = compute_budget(60, SWAConfig(sparsity=0.9, policy="recall", page_size=16, scorer="pages"))
    assert not b.dense and b.pages == 0 and b.query == 0 and b.reads == b.total


# ---- selection ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["recall", "quest", "oracle"])
def test_sparsity_zero_is_dense(policy):
    cfg = SWAConfig(sparsity=0.0, policy=policy)
    q, k, v, _ = _qkv(2, 4, 2, 30)
    st = swa.new_state(2, 2, "cpu", cfg)
    assert torch.equal(swa.swa_step(st, q[:, :, -1:], k, v, SCALE, cfg),
                       dense_attention(q[:, :, -1:], k, v, None, SCALE, False))


@pytest.mark.parametrize("policy", ["recall", "quest", "oracle"])
@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_selection_has_exactly_total_distinct_tokens_and_output_matches(policy, selection):
    cfg = SWAConfig(sparsity=0.7, policy=policy, selection=selection, page_size=8, bucket=8, scorer="pages")
    st, qd, k, v, out = _run(cfg, L=200, steps=3)
    b, idx = st.last_budget, st.last_indices
    n = k.shape[2]
    assert b.query > 0 and not b.dense
    for row in idx.reshape(-1, b.total):
        assert len(set(row.tolist())) == b.total and row.max() < n
        assert set(range(n - b.recent, n)) <= set(row.tolist())
    # output = dense attention over exactly the selected tokens
    G = idx.shape[1]
    mask = torch.zeros(2, G, n, dtype=torch.bool).scatter_(2, idx, True)
    mask = mask.repeat_interleave(4 // G, 1)[:, :, None, :]
    want = dense_attention(qd, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask, SCALE, False)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_page_bound_is_an_upper_bound_and_quest_takes_the_top_pages():
    P = 4
    cfg = SWAConfig(sparsity=0.6, policy="quest", page_size=P, bucket=4)
    st, qd, k, v, _ = _run(cfg, L=97, steps=3)
    b, idx = st.last_budget, st.last_indices
    n = k.shape[2]
    kmin, kmax = _brute_pages(k, P)
    torch.testing.assert_close(st.summary.kmin, kmin, rtol=0, atol=0)
    torch.testing.assert_close(st.summary.kmax, kmax, rtol=0, atol=0)
    q = qd[:, :, 0]
    ub = st.summary.bounds(q, SCALE)                                       # [B, Hq, pages]
    exact = (q[:, :, None] @ k.repeat_interleave(2, 1).transpose(-1, -2))[:, :, 0] * SCALE
    tok_ub = ub.repeat_interleave(P, -1)[..., :n]
    assert (exact <= tok_ub + 1e-5).all()
    score = torch.softmax(ub, -1).sum(1)                                 # one set per layer
    recent_page = (n - 1) // P
    assert b.recent == n - recent_page * P
    full = b.query // P
    for bi in range(2):
        order = [p for p in score[bi].argsort(descending=True).tolist() if p != recent_page]
        want = set(range(recent_page * P, n))
        for p in order[:full]:
            want |= set(range(p * P, p * P + P))
        got = set(idx[bi, 0].tolist())
        assert want <= got and len(got - want) == b.query - full * P
        assert all(t // P == order[full] for t in got - want)  # the rest from the next page


def test_oracle_is_the_exact_top_k():
    cfg = SWAConfig(sparsity=0.8, policy="oracle", bucket=4)
    st, qd, k, v, _ = _run(cfg, L=120, steps=2)
    b = st.last_budget
    w = torch.softmax((qd @ k.repeat_interleave(2, 1).transpose(-1, -2)) * SCALE, -1)[:, :, 0].sum(1)
    want = torch.topk(w, b.total, -1).indices.sort(-1).values
    assert torch.equal(st.last_indices[:, 0], want)


def test_recall_brings_back_a_token_that_history_dropped():
    """The structural gap of ALISA: a token no query attended is never picked again; recall picks
    it up as soon as a query matches it."""
    B, Hq, Hkv, L, D = 1, 2, 1, 256, 8
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, Hkv, L, D, generator=g) * 0.1
    v = torch.randn(B, Hkv, L, D, generator=g)
    key = torch.zeros(D)
    key[0] = 8.0
    k[0, 0, 40] = key                                 # a "passkey" in the middle of the prompt
    q = torch.randn(B, Hq, L, D, generator=g) * 0.1
    q[..., 0] = -1.0                                  # no prompt query looks at it
    probe = torch.zeros(B, Hq, 1, D)
    probe[..., 0] = 4.0
    got = {}
    for policy in ("alisa", "recall"):
        cfg = SWAConfig(sparsity=0.8, policy=policy, page_size=16, bucket=4)
        st = swa.new_state(B, Hkv, "cpu", cfg)
        swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
        kk = torch.cat([k, torch.zeros(B, Hkv, 1, D)], 2)
        vv = torch.cat([v, torch.zeros(B, Hkv, 1, D)], 2)
        swa.swa_step(st, probe, kk, vv, SCALE, cfg)
        got[policy] = 40 in st.last_indices[0, 0].tolist()
    assert got == {"alisa": False, "recall": True}


# ---- page summaries are per-sequence state: map_batch, crop ------------------------------------

def test_summaries_follow_reorder_and_crop():
    P = 8
    cfg = SWAConfig(sparsity=0.7, policy="recall", page_size=P, bucket=4, scorer="pages")
    st, qd, k, v, _ = _run(cfg, B=3, L=200, steps=5)
    assert st.last_budget.pages and st.summary.n == k.shape[2]
    order = torch.tensor([2, 0, 0])
    re = st.map_batch(lambda t: t.index_select(0, order))
    kr = k.index_select(0, order)
    kmin, kmax = _brute_pages(kr, P)
    assert torch.equal(re.summary.kmin, kmin) and torch.equal(re.summary.kmax, kmax)
    assert torch.equal(st.summary.kmin, _brute_pages(k, P)[0])  # the original is unchanged
    cut = 197                                                 # mid-page: the page is recomputed
    cr = st.crop(cut)
    kc = torch.cat([k[:, :, :cut], torch.full_like(k[:, :, :1], 50.0)], 2)
    cr.summary.update(kc)
    kmin, kmax = _brute_pages(kc, P)
    assert torch.equal(cr.summary.kmin, kmin) and torch.equal(cr.summary.kmax, kmax)


def test_summaries_update_incrementally_with_a_separate_new_row():
    s = PageSummary(5)
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 3, 7, 4, generator=g)
    s.update(k)
    for _ in range(12):
        new = torch.randn(2, 3, 1, 4, generator=g)
        s.update(k, new)
        k = torch.cat([k, new], 2)
        kmin, kmax = _brute_pages(k, 5)
        assert torch.equal(s.kmin, kmin) and torch.equal(s.kmax, kmax)


# ---- seeding ------------------------------------------------------------------------------------

def test_snapkv_seed_pools_the_last_32_rows():
    cfg = SWAConfig(sparsity=0.8, policy="alisa", seed="snapkv", score_window=64)
    q, k, v, _ = _qkv(1, 2, 1, 60)
    st = swa.new_state(1, 1, "cpu", cfg)
    swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
    assert st.prompt_rows.shape[2] == 32
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * SCALE
    logits = logits.masked_fill(torch.ones(60, 60).triu(1).bool(), float("-inf"))
    rows = torch.softmax(logits, -1).sum(1, keepdim=True)[:, :, 28:]     # [1, 1, 32, 60]
    pooled = torch.nn.functional.max_pool1d(rows.reshape(-1, 1, 60), 7, 1, 3).reshape(rows.shape)
    pooled = pooled * rows.sum(-1, keepdim=True) / pooled.sum(-1, keepdim=True)
    torch.testing.assert_close(st.score.double() / 2 ** 36, pooled.double().sum(2), rtol=1e-5, atol=1e-6)
    assert SnapKVSeed().first_row(None, 60, 60, cfg) == 28


def test_seed_changes_the_selection():
    picks = {}
    for seed in ("window", "snapkv"):
        cfg = SWAConfig(sparsity=0.8, policy="alisa", seed=seed, bucket=4)
        st, *_ = _run(cfg, L=200, steps=1, seed=5)
        picks[seed] = st.last_indices
    assert not torch.equal(picks["window"], picks["snapkv"])


# ---- through the compiled model: generate() with HF caches, beam search --------------------------

RECALL = {"inner": "eager", "swa": {"sparsity": 0.5, "policy": "recall", "page_size": 8, "bucket": 4,
                                    "kernel": "torch", "scorer": "pages"}}


def test_the_model_tests_use_pages():
    for n in (61, 67):
        b = compute_budget(n, SWAConfig(**{k: v for k, v in RECALL["swa"].items()}))
        assert b.pages and b.query and b.global_


@pytest.mark.slow  # the default scorer's model test (tests/runtime/test_swa_sketch.py) stays in the suite
@pytest.mark.parametrize("policy", ["recall", "quest", "oracle"])
def test_generate_with_dynamic_cache_and_llmaccel_cache(policy):
    """The in-place store (default with swa) and SWA over HF's DynamicCache pick the same tokens;
    LLMAccelCache gives the same tokens as a plain DynamicCache."""
    from llm_compile import LLMAccelCache

    opts = {**RECALL, "swa": {**RECALL["swa"], "policy": policy}}
    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = _model({**opts, "kv_store": False}).generate(_ids(), **kw)
        torch._dynamo.reset()
        got = _model(opts).generate(_ids(), **kw)
        torch._dynamo.reset()
        got2 = _model(opts).generate(_ids(), past_key_values=LLMAccelCache(), **kw)
    assert torch.equal(got, want) and torch.equal(got2, want)
    assert got.shape[1] == 68


@pytest.mark.slow  # minutes on 2 cores: run with -m slow (CI keeps the suite under ~15 min)
def test_beam_search_reorders_the_page_summaries():
    """Beam search reorders the SWA state (scores and page summaries) with the KV: recall over the
    in-place store gives the tokens recall over the model's own reordered KV gives."""
    from llm_compile import LLMAccelCache

    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    ids = _ids()[:1]
    with torch.no_grad():
        want = _model({**RECALL, "kv_store": False}).generate(ids, past_key_values=LLMAccelCache(), **kw)
        torch._dynamo.reset()
        got = _model(RECALL).generate(ids, past_key_values=LLMAccelCache(), **kw)
    assert torch.equal(got, want)


@pytest.mark.slow  # minutes on 2 cores: run with -m slow (CI keeps the suite under ~15 min)
def test_static_cache_equals_dynamic_cache():
    """Recall over HF's StaticCache (state on the cache layer) picks the tokens it picks over a
    DynamicCache."""
    kw = dict(max_new_tokens=6, do_sample=False)
    ids = _ids()[:1]
    with torch.no_grad():
        want = _model({**RECALL, "kv_store": False}).generate(ids, **kw)
        torch._dynamo.reset()
        got = _model(RECALL).generate(ids, cache_implementation="static", **kw)
    assert torch.equal(got, want)
