"""The C pick of a query-aware step (``native.query_select``, runtime/swa/swa_scores.c): softmax of
the scorer's logits per head, sum per group, the query's top tokens, then the history's top tokens
among the rest, in position order, ties at either threshold to the earliest positions. Checked
against a torch reference with the same tie rule, and through ``query.select`` and decode runs
against the torch path."""
import pytest
import torch

from llm_compile.config import SWAConfig
from llm_compile.runtime import swa
from llm_compile.runtime.swa import native, query
from llm_compile.runtime.swa.scorers import scorer_of
from llm_compile.runtime.swa.state import compute_budget, group_sum, top_positions


def _reference(logits, unit, hist, n, sinks, recent, nq, nglob, padded, G):
    """torch: the same pick with state.top_positions' tie rule (earliest positions)."""
    B, Hq, units = logits.shape
    u = group_sum(torch.softmax(logits, dim=-1), G)                       # [B, G, units]
    tok = u.repeat_interleave(unit, dim=-1)[..., :n]
    tok = torch.nn.functional.pad(tok, (0, n - tok.shape[-1]))             # no unit: 0
    lo, hi = sinks, n - recent
    out = torch.zeros(B, G, padded, dtype=torch.int64)
    for b in range(B):
        for g in range(G):
            keep = torch.zeros(n, dtype=torch.bool)
            keep[:sinks] = True
            keep[hi:] = True
            cand = tok[b, g, lo:hi]
            if nq:
                keep[lo + top_positions(cand, nq)] = True
            if nglob:
                free = (~keep[lo:hi]).nonzero().flatten()
                h = hist[b, g, lo:hi][free]
                keep[lo + free[top_positions(h, nglob)]] = True
            pos = keep.nonzero().flatten()
            out[b, g, : pos.numel()] = pos
    return out


@pytest.mark.parametrize("B, Hq, G", [(1, 9, 1), (2, 9, 3), (3, 4, 2)])
@pytest.mark.parametrize("unit", [1, 16])
@pytest.mark.parametrize("sinks", [0, 4])
def test_query_select_equals_the_torch_reference(B, Hq, G, unit, sinks):
    assert native.library() is not None          # the machine has a C compiler (CI does)
    gen = torch.Generator().manual_seed(B * 100 + Hq + unit + sinks)
    n = 1000
    units = n // 64 * 64 if unit == 1 else -(-n // unit)   # sketch: complete blocks; pages: all
    logits = torch.randn(B, Hq, units, generator=gen) * 3
    hist = torch.randint(0, 1 << 40, (B, G, n + 7), generator=gen)[..., :n + 7]
    for nq, nglob, recent in ((300, 150, 100), (0, 200, 50), (500, 0, 64), (n - 64 - sinks, 0, 64)):
        padded = -(-(sinks + nq + nglob + recent) // 32) * 32
        got = native.query_select(logits, unit, hist if nglob else None, n, sinks, recent, nq, nglob, padded, G)
        want = _reference(logits, unit, hist, n, sinks, recent, nq, nglob, padded, G)
        assert torch.equal(got, want), (nq, nglob, recent)
        valid = got[..., : sinks + nq + nglob + recent]
        assert bool((valid[..., 1:] > valid[..., :-1]).all())            # ascending, distinct


def test_ties_go_to_the_earliest_positions():
    logits = torch.zeros(1, 2, 64)          # every token the same weight
    hist = torch.zeros(1, 1, 80, dtype=torch.int64)
    hist[0, 0, 50] = 9                      # the only history score above the rest
    got = native.query_select(logits, 1, hist, 80, 2, 8, 5, 3, 32, 1)
    # sinks 0-1, the query's 5 earliest candidates 2-6, history: 50 then the earliest free (7, 8),
    # recent 72-79
    assert got[0, 0, :18].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 50, *range(72, 80)]
    assert got[0, 0, 18:].eq(0).all()


def test_a_unit_past_the_logits_scores_zero():
    logits = torch.full((1, 1, 2), -5.0)    # pages of 4 tokens: tokens 0-7 scored, 8-19 not
    got = native.query_select(logits, 4, None, 20, 0, 4, 10, 0, 16, 1)
    assert got[0, 0, :14].tolist() == [*range(10), *range(16, 20)]   # 0-7 (> 0), then 8, 9 (ties)


def test_query_select_refuses_a_bad_budget():
    logits = torch.zeros(1, 3, 64)
    with pytest.raises(ValueError, match="query_select"):
        native.query_select(logits, 1, None, 64, 2, 8, 60, 0, 128, 1)   # 2 + 60 + 8 > 64 tokens
    with pytest.raises(ValueError, match="query_select"):
        native.query_select(logits, 1, None, 64, 0, 8, 10, 0, 8, 1)     # padded below the total
    with pytest.raises(ValueError, match="query_select"):
        native.query_select(logits, 1, None, 64, 0, 8, 10, 0, 32, 2)    # 3 heads in 2 groups


def test_query_select_steps_aside_without_the_library(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    assert native.query_select(torch.zeros(1, 1, 64), 1, None, 64, 0, 8, 10, 0, 32, 1) is None


def _state(policy, scorer, selection, seed=3):
    gen = torch.Generator().manual_seed(seed)
    B, Hkv, Hq, D, n = 2, 3, 9, 64, 1500
    cfg = SWAConfig(sparsity=0.8, policy=policy, scorer=scorer, selection=selection)
    k = torch.randn(B, Hkv, n, D, generator=gen)
    q = torch.randn(B, Hq, D, generator=gen)
    st = swa.new_state(B, Hkv, "cpu", cfg)
    st.grow(n)
    st.score[:] = torch.randint(0, 1 << 40, st.score.shape, generator=gen)
    b = compute_budget(n, cfg, D, D, 4)
    assert b.query > 0
    return cfg, st, b, q, k, D ** -0.5


@pytest.mark.parametrize("policy, scorer", [("recall", "sketch"), ("recall", "pages"), ("quest", "pages")])
@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_select_picks_what_the_torch_path_picks(monkeypatch, policy, scorer, selection):
    """query.select through the C pick and through torch (the GPU's path: top_positions, ties to
    the earliest positions too; a page's tokens tie): the same kept tokens."""
    cfg, st, b, q, k, scale = _state(policy, scorer, selection)
    got = query.select(st, b, q, k, None, scale, cfg)
    assert st.last_indices.shape[-1] == b.total
    monkeypatch.setattr(native, "library", lambda: None)
    want = query.select(st, b, q, k, None, scale, cfg)
    assert torch.equal(got[..., : b.total], want[..., : b.total])


@pytest.mark.parametrize("policy", ["recall", "quest"])
@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_page_picks_take_the_earliest_tokens_of_the_threshold_page(policy, selection):
    """Pages: the tokens of a page tie, so the threshold page is taken from its first token on
    (torch's topk takes any of them): query.select equals the reference with that rule."""
    cfg, st, b, q, k, scale = _state(policy, "pages", selection)
    got = query.select(st, b, q, k, None, scale, cfg)
    scorer = scorer_of(cfg)
    logits = scorer.logits(st.summary, q, k, None, scale, b.n, False)
    want = _reference(logits, scorer.unit(st.summary), st.score, b.n, b.sinks, b.recent, b.query,
                      b.global_, b.padded, st.groups)
    assert torch.equal(got, want)
