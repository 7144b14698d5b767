"""SWA budgets, selection and exact windowed score sums (llm_compile.runtime.swa.state)."""
import pytest
import torch

from llm_compile.config import SWAConfig
from llm_compile.runtime.swa.state import (SWAState, compute_budget, describe_policy,
                                           quantize_weights)


def test_budget_alisa_split():
    b = compute_budget(100, SWAConfig(sparsity=0.8, bucket=16))
    assert (b.k, b.total, b.sinks, b.recent, b.global_) == (10, 20, 0, 10, 10)
    assert b.padded == 32 and not b.dense and b.window == 10
    b = compute_budget(100, SWAConfig(sparsity=0.8, sink_tokens=4, recent_fraction=0.25, bucket=8))
    assert (b.sinks, b.recent, b.global_, b.padded) == (4, 5, 11, 24)


def test_budget_dense_cases_and_rounding():
    assert compute_budget(5, SWAConfig(sparsity=0.0)).dense  # k = 3 (half up), 2k >= n
    assert compute_budget(7, SWAConfig(sparsity=0.0)).total == 7
    assert compute_budget(10, SWAConfig(sparsity=0.1)).dense  # k = round(4.5) = 5
    b = compute_budget(25, SWAConfig(sparsity=0.8))  # k = round(2.5) = 3 (half up, not banker's)
    assert b.k == 3 and b.total == 6
    b = compute_budget(3, SWAConfig(sparsity=0.9))  # k = 0: still the newest token
    assert (b.total, b.recent, b.global_) == (1, 1, 0)


def test_budget_streaming_and_h2o():
    b = compute_budget(21, SWAConfig(sparsity=0.5, policy="streaming", sink_tokens=2))
    assert (b.k, b.sinks, b.recent, b.global_, b.window) == (5, 2, 8, 0, None)
    b = compute_budget(21, SWAConfig(sparsity=0.5, policy="h2o"))
    assert (b.recent, b.global_, b.window) == (5, 5, None)
    assert compute_budget(21, SWAConfig(sparsity=0.5, score_window=3)).window == 3
    assert "h2o" in describe_policy(SWAConfig(policy="h2o"))


def test_select_hand_example():
    """Scores set by hand: the top-2 older tokens are 3 and 6; recent are 9, 10."""
    cfg = SWAConfig(sparsity=0.6, bucket=8)
    b = compute_budget(11, cfg)  # k = round(11 * 0.4 / 2) = 2
    assert (b.total, b.recent, b.global_, b.padded) == (4, 2, 2, 8)
    st = SWAState(1, 1, "cpu")
    rows = torch.zeros(1, 1, 1, 11)
    rows[0, 0, 0, [3, 6, 1, 9, 10]] = torch.tensor([0.4, 0.3, 0.1, 0.9, 0.9])
    st.seed(rows=rows)
    idx = st.select(b)
    assert idx.shape == (1, 1, 8)
    assert idx[0, 0, :4].tolist() == [3, 6, 9, 10]
    assert idx[0, 0, 4:].tolist() == [0] * 4  # padding slots
    b2 = compute_budget(11, SWAConfig(sparsity=0.6, sink_tokens=1, bucket=8))
    assert st.select(b2)[0, 0, :4].tolist() == [0, 3, 9, 10]


def test_windowed_sum_exact_add_trim():
    """Running sums equal a brute-force sum of the last W rows, exactly (fixed point)."""
    g = torch.Generator().manual_seed(0)
    B, G, L = 2, 3, 12
    st = SWAState(B, G, "cpu")
    prompt = torch.rand(B, G, 4, L, generator=g)
    st.seed(rows=prompt)
    history = [torch.nn.functional.pad(prompt[:, :, i], (0, 20)) for i in range(4)]
    n = L
    for step, window in enumerate([4, 4, 5, 3, 3, 2, 2, 1]):
        st.trim(window)
        n += 1
        st.grow(n)
        idx = torch.stack([torch.randperm(n, generator=g)[:5] for _ in range(B * G)]).view(B, G, 5)
        w = torch.rand(B, G, 5, generator=g)
        dense = torch.zeros(B, G, L + 20).scatter_(2, idx, w)
        expect = sum(quantize_weights(r) for r in history[-window:])[:, :, :n]
        assert torch.equal(st.score, expect), step
        st.add(idx, w)
        history.append(dense)
    assert st.prompt_rows is None and st.prompt_in == 0  # prompt rows left the window, freed


def test_grow_keeps_scores():
    st = SWAState(1, 1, "cpu")
    st.seed(rows=torch.ones(1, 1, 2, 3))
    st.grow(200)
    assert st.score.shape == (1, 1, 200)
    assert st.score[0, 0, :3].tolist() == [int(2 * 2 ** 36)] * 3
    assert int(st.score[0, 0, 3:].abs().sum()) == 0


@pytest.mark.parametrize("n", [70, 100, 129])
def test_bucket_padding_shape(n):
    cfg = SWAConfig(sparsity=0.5, bucket=32)
    b = compute_budget(n, cfg)
    assert b.padded % 32 == 0 and b.padded >= b.total > b.padded - 32


def test_row_ring_matches_a_plain_queue_and_reuses_its_buffers():
    """The score-history ring returns exactly what went in, oldest first, across growth in rows and
    width and wrap-around; once grown it allocates nothing per step (no heap fragmentation)."""
    from collections import deque

    from llm_compile.runtime.swa.ring import RowRing

    g = torch.Generator().manual_seed(0)
    ring, ref = RowRing(2, 3, torch.device("cpu")), deque()
    ptrs = set()
    for step in range(200):
        T = 5 + step // 20 if step < 150 else 12  # rows widen as the context grows
        idx = torch.randint(0, 50, (2, 3, T), generator=g)
        wq = torch.randint(1, 1000, (2, 3, T), generator=g)
        ring.push(idx, wq)
        ref.append((idx, wq))
        if len(ref) > 30:                        # window of ~30 steps: pop 1 or 2 rows
            m = min(len(ref), 1 + step % 2)
            got_i, got_w = ring.pop(m)
            want = torch.zeros(2, 3, 50, dtype=torch.int64)
            for _ in range(m):
                i, w = ref.popleft()
                want.scatter_add_(2, i, w)
            have = torch.zeros(2, 3, 50, dtype=torch.int64).scatter_add_(2, got_i, got_w)
            assert torch.equal(have, want)
        assert len(ring) == len(ref)
        if step >= 150:
            ptrs.add(ring._idx.data_ptr())
    assert len(ptrs) == 1  # steady state: same storage every step
    ring.clear()
    assert len(ring) == 0
