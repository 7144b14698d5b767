"""The C score bookkeeping of a decode step (runtime/swa/swa_scores.c via native.py) equals the
torch path: selection (ties at the threshold to the earliest positions), score add/sub, and whole
decode runs with the ring popping every step."""
import pytest
import torch

from llm_compile.config import SWAConfig
from llm_compile.runtime import swa
from llm_compile.runtime.swa import native
from llm_compile.runtime.swa.state import SWAState, compute_budget, group_sum, quantize_weights, top_positions

SCALE = 0.25


def _with_and_without_kernel(monkeypatch, fn):
    assert native.library() is not None   # the machine has a C compiler (CI does)
    a = fn()
    with monkeypatch.context() as m:
        m.setattr(native, "library", lambda: None)
        b = fn()
    return a, b


def test_ties_go_to_the_earliest_positions():
    s = torch.tensor([[[5, 0, 0, 5, 0, 3, 0]]])
    assert top_positions(s, 3).tolist() == [[[0, 3, 5]]]
    assert top_positions(s, 4).tolist() == [[[0, 1, 3, 5]]]
    assert top_positions(s, 7).tolist() == [[list(range(7))]]
    st = SWAState(1, 1, "cpu")
    st.grow(9)
    st.score[:] = torch.tensor([9, 5, 0, 0, 5, 0, 3, 0, 1])
    b = compute_budget(9, SWAConfig(sparsity=0.6, sink_tokens=1, bucket=8))   # k=2: 1 sink, 2 recent, 1 global
    assert (b.sinks, b.global_, b.recent) == (1, 1, 2)
    assert st.select(b)[0, 0, :4].tolist() == [0, 1, 7, 8]   # 1 and 4 tie at 5: the earlier


@pytest.mark.parametrize("B, G", [(1, 1), (2, 1), (3, 4)])
@pytest.mark.parametrize("values", ["wide", "few", "negative", "equal"])
@pytest.mark.parametrize("sinks", [0, 4])
def test_select_top_equals_torch(monkeypatch, B, G, values, sinks):
    gen = torch.Generator().manual_seed(B * 10 + G)
    n = 700
    st = SWAState(B, G, "cpu")
    st.grow(n)
    if values == "wide":
        st.score[:] = torch.randint(0, 1 << 46, (B, G, n), generator=gen)
    elif values == "few":      # runs of equal scores, many zeros (tokens never kept recently)
        st.score[:] = torch.randint(0, 4, (B, G, n), generator=gen) * (1 << 30)
    elif values == "negative":
        st.score[:] = torch.randint(-(1 << 40), 1 << 40, (B, G, n), generator=gen)
    else:
        st.score[:] = 7
    for sp in (0.5, 0.8, 0.95):
        b = compute_budget(n, SWAConfig(sparsity=sp, sink_tokens=sinks, bucket=16))
        got, ref = _with_and_without_kernel(monkeypatch, lambda: st.select(b))
        assert torch.equal(got, ref), (values, sp)
        g = got[..., b.sinks: b.sinks + b.global_]
        assert bool((g[..., 1:] > g[..., :-1]).all())           # ascending, distinct
        cand = st.score[..., b.sinks: n - b.recent]
        kept = torch.gather(st.score, 2, g)
        dropped = cand.clone().scatter_(2, g - b.sinks, torch.iinfo(torch.int64).min)
        assert bool((kept.amin(-1) >= dropped.amax(-1)).all())  # a top set


def test_select_top_refuses_a_bad_budget():
    st = SWAState(1, 1, "cpu")
    st.grow(10)
    with pytest.raises(ValueError, match="select_top"):
        native.select_top(st.score, 10, 2, 4, 5, 16)   # 2 + 5 + 4 > 10 tokens


@pytest.mark.parametrize("G, grp", [(1, 9), (3, 3)])
def test_score_add_and_sub_equal_torch(G, grp):
    gen = torch.Generator().manual_seed(G)
    B, n, P, T, W = 2, 50, 24, 21, 32
    buf = torch.randint(0, 1 << 40, (B, G, 64), generator=gen)
    w = torch.softmax(torch.randn(B, G * grp, P, generator=gen), -1)
    idx = torch.sort(torch.rand(B, G, n, generator=gen).argsort(-1)[..., :P], -1).values.contiguous()
    ring_i = torch.full((B, G, W), 99, dtype=torch.int32)
    ring_w = torch.full((B, G, W), 99, dtype=torch.int64)
    got = buf.clone()
    assert native.score_add(got, w, idx, T, ring_i, ring_w)
    wq = group_sum(quantize_weights(w[..., :T]), G)   # per head, then summed: exact
    ref = buf.clone().scatter_add_(2, idx[..., :T], wq)
    assert torch.equal(got, ref)
    assert torch.equal(ring_i[..., :T].long(), idx[..., :T]) and torch.equal(ring_w[..., :T], wq)
    assert not ring_i[..., T:].any() and not ring_w[..., T:].any()     # padding slots zeroed
    assert native.score_sub(got, ring_i, ring_w)                         # the row leaves: exact
    assert torch.equal(got, buf)
    assert not native.score_add(got, w.double(), idx, T, ring_i, ring_w)  # not its dtype: torch runs


@pytest.mark.parametrize("off", ["bookkeeping", "all"])
@pytest.mark.parametrize("policy, selection", [("alisa", "layer"), ("alisa", "kv_head"), ("h2o", "layer"),
                                               ("recall", "layer")])
def test_decode_run_equals_torch_path_with_the_ring_popping(monkeypatch, policy, selection, off):
    """40 decode steps with a 5-step score window (a ring row leaves at every step): the same tokens
    and outputs with the C kernels on and off. With only the score bookkeeping off (the C attend
    on, so the weights are the same bits) the fixed-point scores are equal exactly."""
    B, Hq, Hkv, D, L = 2, 6, 2, 16, 200
    cfg = SWAConfig(sparsity=0.8, bucket=16, policy=policy, selection=selection, score_window=5,
                    sketch_block=16)

    def run():
        gen = torch.Generator().manual_seed(11)
        q, k, v = (torch.randn(B, h, L, D, generator=gen) for h in (Hq, Hkv, Hkv))
        st = swa.new_state(B, Hkv, "cpu", cfg)
        swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
        outs, picks = [], []
        for _ in range(40):
            k = torch.cat([k, torch.randn(B, Hkv, 1, D, generator=gen)], 2)
            v = torch.cat([v, torch.randn(B, Hkv, 1, D, generator=gen)], 2)
            outs.append(swa.swa_step(st, torch.randn(B, Hq, 1, D, generator=gen), k, v, SCALE, cfg))
            picks.append(st.last_indices.clone())
        return outs, picks, st.score.clone(), len(st.rows)

    if off == "all":
        (o1, p1, s1, r1), (o2, p2, s2, r2) = _with_and_without_kernel(monkeypatch, run)
    else:
        o1, p1, s1, r1 = run()
        with monkeypatch.context() as m:
            m.setattr(native, "select_top", lambda *a: None)
            m.setattr(native, "score_add", lambda *a: False)
            m.setattr(native, "score_sub", lambda *a: False)
            o2, p2, s2, r2 = run()
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert r1 == r2 == (6 if policy != "h2o" else 0)   # the window, plus this step's row
    if off == "bookkeeping":
        assert torch.equal(s1, s2)
    else:   # the torch attend rounds differently: scores within float32 rounding of the weights
        torch.testing.assert_close(s1.double(), s2.double(), rtol=1e-5, atol=1e3)
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
