"""SWA attention steps (llm_compile.runtime.swa, llmaccel::swa_attention) against references."""
import math

import pytest
import torch

from llm_compile.config import SWAConfig
from llm_compile.ops.attention import dense_attention
from llm_compile.ops.swa import swa_config_json
from llm_compile.runtime import swa
from llm_compile.runtime.swa import native, step as swa_step_module
from llm_compile.runtime.swa.op import SequenceStateError
from llm_compile.runtime.swa.state import compute_budget, quantize_weights

torch.manual_seed(0)
SCALE = 0.25


def _qkv(B, Hq, Hkv, L, D=8, gen=None):
    g = gen or torch.Generator().manual_seed(1)
    return (torch.randn(B, Hq, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g),
            torch.randn(B, Hkv, L, D, generator=g))


def _steps(state, cfg, q, k, v, steps, gen):
    """Yield (out, q, k_full, v_full) after each of ``steps`` decode steps on random tokens."""
    B, Hq, _, D = q.shape
    for _ in range(steps):
        k = torch.cat([k, torch.randn(B, k.shape[1], 1, D, generator=gen)], 2)
        v = torch.cat([v, torch.randn(B, k.shape[1], 1, D, generator=gen)], 2)
        qd = torch.randn(B, Hq, 1, D, generator=gen)
        yield swa.swa_step(state, qd, k, v, SCALE, cfg), qd, k, v


def _decode(state, cfg, q, k, v, steps, gen):
    """Run ``steps`` decode steps; returns the outputs and the final k_full."""
    outs = list(_steps(state, cfg, q, k, v, steps, gen))
    return [o[0] for o in outs], outs[-1][2]


def _dense_rows(q, k, scale, causal):
    """Naive weights [B, Hq, Lq, n] in float64."""
    B, Hq, Lq, D = q.shape
    kk = k.double().repeat_interleave(Hq // k.shape[1], 1)
    logits = q.double() @ kk.transpose(-1, -2) * scale
    if causal:
        logits = logits.masked_fill(torch.ones(Lq, k.shape[2]).triu(1).bool(), -math.inf)
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_reference_simulation(selection):
    """Brute-force ALISA: keep every step's weight row; scores = sum of the last W rows; check
    scores, the selected set (sinks, recent, valid top-k) and the output, for 12 steps."""
    B, Hq, Hkv, L = 2, 4, 2, 30
    cfg = SWAConfig(sparsity=0.7, bucket=8, sink_tokens=1, selection=selection)
    G = Hkv if selection == "kv_head" else 1
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(B, Hq, Hkv, L, gen=gen)
    st = swa.new_state(B, Hkv, "cpu", cfg)
    swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
    prompt = _dense_rows(q, k, SCALE, True).float()  # [B, Hq, L, L]
    history = [prompt[:, :, r].reshape(B, G, Hq // G, L).sum(2) for r in range(L)]
    for out, qd, kf, vf in _steps(st, cfg, q, k, v, 12, gen):
        n = kf.shape[2]
        b = compute_budget(n, cfg)
        window = math.floor(n * 0.3 / 2 + 0.5)  # W = k (ALISA), computed independently
        rows = [torch.nn.functional.pad(r, (0, n - r.shape[-1])) for r in history[-window:]]
        score = sum(quantize_weights(r) for r in rows)
        idx = st.last_indices  # [B, G, total]
        assert idx.shape == (B, G, b.total)
        assert idx[..., : b.sinks].eq(torch.arange(b.sinks)).all()
        assert idx[..., b.total - b.recent:].eq(torch.arange(n - b.recent, n)).all()
        glob = idx[..., b.sinks: b.sinks + b.global_]
        cand = torch.zeros(B, G, n, dtype=torch.bool)
        cand[..., b.sinks: n - b.recent] = True
        cand.scatter_(2, glob, False)
        lo = score.gather(2, glob).min(-1).values
        hi = score.masked_fill(~cand, -1).max(-1).values
        assert (lo - hi >= -2 ** 20).all()  # selected >= every unselected candidate (1e-5 slack)
        # output and weights: dense attention restricted to the kept tokens
        ii = idx.repeat_interleave(Hq // G, 1)
        kk = kf.repeat_interleave(Hq // Hkv, 1).gather(2, ii[..., None].expand(-1, -1, -1, 8))
        vv = vf.repeat_interleave(Hq // Hkv, 1).gather(2, ii[..., None].expand(-1, -1, -1, 8))
        w = torch.softmax((qd @ kk.transpose(-1, -2)) * SCALE, -1)
        torch.testing.assert_close(out, w @ vv, atol=1e-5, rtol=1e-5)
        row = torch.zeros(B, Hq, n).scatter_(2, ii, w[:, :, 0])
        history.append(row.reshape(B, G, Hq // G, n).sum(2))
        expect_after = score + quantize_weights(history[-1])
        assert (st.score - expect_after).abs().max() <= 2 ** 20


def test_hand_example_selected_tokens():
    """Keys 2 and 5 match every query strongly: they are the global tokens kept."""
    D, L = 4, 10
    cfg = SWAConfig(sparsity=0.6, bucket=4)  # n = 11: k = 2 -> 2 recent + 2 global
    k = torch.zeros(1, 1, L, D)
    k[0, 0, [2, 5], 0] = 10.0
    q = torch.zeros(1, 1, L, D)
    q[..., 0] = 1.0
    v = torch.randn(1, 1, L, D)
    st = swa.new_state(1, 1, "cpu", cfg)
    swa.swa_step(st, q, k, v, 1.0, cfg, is_causal=True)
    kf, vf = torch.cat([k, torch.zeros(1, 1, 1, D)], 2), torch.cat([v, torch.ones(1, 1, 1, D)], 2)
    out = swa.swa_step(st, q[:, :, :1], kf, vf, 1.0, cfg)
    assert st.last_indices.tolist() == [[[2, 5, 9, 10]]]
    ref = dense_attention(q[:, :, :1], kf[:, :, [2, 5, 9, 10]], vf[:, :, [2, 5, 9, 10]], None, 1.0, False)
    torch.testing.assert_close(out, ref)


def test_per_head_vs_per_layer_selection():
    """KV head 0 attends to token 2, head 1 to token 5 (weaker): per-head selection keeps one
    each, per-layer selection keeps token 2 (largest sum over heads) for both heads."""
    D, L = 4, 10
    k = torch.zeros(1, 2, L, D)
    k[0, 0, 2, 0], k[0, 1, 5, 0] = 12.0, 8.0
    q = torch.zeros(1, 2, L, D)
    q[..., 0] = 1.0
    v = torch.randn(1, 2, L + 1, D)
    kf = torch.cat([k, torch.zeros(1, 2, 1, D)], 2)
    sel = {}
    for selection in ("kv_head", "layer"):
        cfg = SWAConfig(sparsity=0.8, bucket=4, selection=selection)  # n=11: k=1: 1 recent + 1 global
        st = swa.new_state(1, 2, "cpu", cfg)
        swa.swa_step(st, q, k, v[:, :, :L], 1.0, cfg, is_causal=True)
        swa.swa_step(st, q[:, :, :1], kf, v, 1.0, cfg)
        sel[selection] = st.last_indices.tolist()
    assert sel["kv_head"] == [[[2, 10], [5, 10]]]
    assert sel["layer"] == [[[2, 10]]]


def test_policies_token_sets():
    B, Hq, Hkv, L = 1, 2, 1, 20
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(B, Hq, Hkv, L, gen=gen)
    cfg = SWAConfig(sparsity=0.5, policy="streaming", sink_tokens=2, bucket=4)
    st = swa.new_state(B, Hkv, "cpu", cfg)
    swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
    _decode(st, cfg, q, k, v, 3, gen)  # n = 23: k = 6 -> 2 sinks + 10 recent
    assert st.last_indices[0, 0].tolist() == [0, 1] + list(range(13, 23))
    assert st.window_len() == 0 and int(st.score.abs().sum()) == 0  # streaming keeps no scores
    # h2o: scores = all prompt rows + all decode rows, never windowed
    cfg = SWAConfig(sparsity=0.5, policy="h2o", bucket=4)
    st = swa.new_state(B, Hkv, "cpu", cfg)
    swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
    total = _dense_rows(q, k, SCALE, True).sum((1, 2))  # [B, L]
    torch.testing.assert_close(st.score[:, 0].double() / 2 ** 36, total, atol=1e-5, rtol=1e-5)
    _, kf = _decode(st, cfg, q, k, v, 4, gen)
    assert st.window_len() == 0 and st.prompt_rows is None  # no history kept
    n = kf.shape[2]
    b = compute_budget(n, cfg)
    assert st.last_indices[0, 0, -b.recent:].tolist() == list(range(n - b.recent, n))


def test_sparsity_zero_is_dense_exactly():
    cfg = SWAConfig(sparsity=0.0)
    h = swa_config_json(cfg)
    q, k, v = _qkv(2, 4, 2, 16)
    op, ref = torch.ops.llmaccel.swa_attention, torch.ops.llmaccel.attention
    assert torch.equal(op(q, k, v, None, None, None, SCALE, True, 0, h)[0], ref(q, k, v, None, None, None, SCALE, True, 0))
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        qd, kn, vn = _qkv(2, 4, 2, 1, gen=gen)
        mask = torch.rand(2, 1, 1, k.shape[2] + 1, generator=gen) > 0.2
        a = op(qd, kn, vn, k, v, mask, SCALE, False, 0, h)[0]
        assert torch.equal(a, ref(qd, kn, vn, k, v, mask, SCALE, False, 0))
        k, v = torch.cat([k, kn], 2), torch.cat([v, vn], 2)


def test_chunked_decode_is_dense_and_mask_respected():
    cfg = SWAConfig(sparsity=0.8, bucket=4)
    q, k, v = _qkv(1, 2, 2, 40)
    st = swa.new_state(1, 2, "cpu", cfg)
    swa.swa_step(st, q[:, :, :30], k[:, :, :30], v[:, :, :30], SCALE, cfg, is_causal=True)
    mask = torch.ones(1, 1, 3, 33, dtype=torch.bool).tril(30)
    out = swa.swa_step(st, q[:, :, 30:33], k[:, :, :33], v[:, :, :33], SCALE, cfg, attn_mask=mask)
    assert torch.equal(out, dense_attention(q[:, :, 30:33], k[:, :, :33], v[:, :, :33], mask, SCALE, False))
    assert st.n == 33
    # a masked-out token gets no weight even if selected as recent
    mask1 = torch.ones(1, 1, 1, 34, dtype=torch.bool)
    mask1[..., 32] = False
    before = st.score[0, 0, 32].item()
    swa.swa_step(st, q[:, :, 33:34], k[:, :, :34], v[:, :, :34], SCALE, cfg, attn_mask=mask1)
    assert 32 in st.last_indices[0, 0].tolist() and st.score[0, 0, 32].item() == before


def test_prefill_resets_state():
    cfg = SWAConfig(sparsity=0.7, bucket=8)
    gen = torch.Generator().manual_seed(7)
    q, k, v = _qkv(1, 2, 1, 24, gen=gen)
    st = swa.new_state(1, 1, "cpu", cfg)
    swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
    _decode(st, cfg, q, k, v, 5, gen)
    q2, k2, v2 = _qkv(1, 2, 1, 17, gen=gen)
    swa.swa_step(st, q2, k2, v2, SCALE, cfg, is_causal=True)
    fresh = swa.new_state(1, 1, "cpu", cfg)
    swa.swa_step(fresh, q2, k2, v2, SCALE, cfg, is_causal=True)
    assert st.n == 17 and st.steps == 0 and len(st.rows) == 0
    assert torch.equal(st.score, fresh.score) and st.prompt_in == fresh.prompt_in


def test_batch_rows_independent():
    cfg = SWAConfig(sparsity=0.7, bucket=8, selection="kv_head")
    gen = torch.Generator().manual_seed(11)
    q, k, v = _qkv(2, 4, 2, 26, gen=gen)
    steps = [(torch.randn(2, 4, 1, 8, generator=gen), torch.randn(2, 2, 1, 8, generator=gen),
              torch.randn(2, 2, 1, 8, generator=gen)) for _ in range(6)]

    def run(rows):
        st = swa.new_state(len(rows), 2, "cpu", cfg)
        swa.swa_step(st, q[rows], k[rows], v[rows], SCALE, cfg, is_causal=True)
        kk, vv, outs = k[rows], v[rows], []
        for qd, kn, vn in steps:
            kk, vv = torch.cat([kk, kn[rows]], 2), torch.cat([vv, vn[rows]], 2)
            outs.append(swa.swa_step(st, qd[rows], kk, vv, SCALE, cfg))
        return torch.cat(outs, 2), st.last_indices

    both, idx = run([0, 1])
    for r in (0, 1):
        one, idx1 = run([r])
        torch.testing.assert_close(both[r:r + 1], one, atol=1e-6, rtol=1e-6)
        assert torch.equal(idx[r:r + 1], idx1)


def test_state_travels_with_the_returned_cache_through_op():
    """The op's state hangs on the cache tensors it returns: two sequences of the same site keep
    separate scores, and a cache without state (or an earlier step's) is refused."""
    h = swa_config_json(SWAConfig(sparsity=0.7, bucket=8))
    op = torch.ops.llmaccel.swa_attention
    gen = torch.Generator().manual_seed(13)
    qa, ka, va = _qkv(1, 2, 1, 20, gen=gen)
    qb, kb, vb = _qkv(1, 2, 1, 25, gen=gen)
    dq, dk, dv = _qkv(1, 2, 1, 1, gen=gen)
    _, ca, cva = op(qa, ka, va, None, None, None, SCALE, True, 3, h)
    alone = op(dq, dk, dv, ca, cva, None, SCALE, False, 3, h)[0]
    _, ca, cva = op(qa, ka, va, None, None, None, SCALE, True, 3, h)
    _, cb, cvb = op(qb, kb, vb, None, None, None, SCALE, True, 3, h)  # same site, other sequence
    out, ca2, _ = op(dq, dk, dv, ca, cva, None, SCALE, False, 3, h)
    assert torch.equal(out, alone)
    assert ca2.llmaccel_state.state.n == 21 and cb.llmaccel_state.state.n == 25
    with pytest.raises(SequenceStateError, match="covers 21"):   # an earlier step's cache
        op(dq, dk, dv, ca, cva, None, SCALE, False, 3, h)
    with pytest.raises(SequenceStateError, match="carries no SWA state"):
        op(dq, dk, dv, ka.clone(), va.clone(), None, SCALE, False, 3, h)


def test_bucketed_kernel_shapes_constant(monkeypatch):
    """The torch path's shapes are bucketed (no recompiles where it is compiled); the C kernel, which
    takes the step where it applies, is off here (it attends over exactly ``total`` slots)."""
    monkeypatch.setattr(native, "library", lambda: None)
    cfg = SWAConfig(sparsity=0.8, bucket=16)
    shapes = []
    real = swa_step_module.attend_split_torch

    def spy(q, kf, vf, idx, b, *rest):
        shapes.append(tuple(idx.shape))
        return real(q, kf, vf, idx, b, *rest)

    monkeypatch.setattr(swa_step_module, "attend_split_torch", spy)
    gen = torch.Generator().manual_seed(17)
    q, k, v = _qkv(1, 2, 1, 40, gen=gen)
    st = swa.new_state(1, 1, "cpu", cfg)
    swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
    _decode(st, cfg, q, k, v, 64, gen)  # n 41..104: 2k = 8..20 -> padded 16 or 32
    assert len(shapes) == 64 and sorted(set(shapes)) == [(1, 1, 16), (1, 1, 32)]


@pytest.mark.parametrize("selection", ["layer", "kv_head"])
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("split_new", [False, True])
def test_split_path_equals_gather_path(selection, sinks, masked, split_new):
    """The CPU path that reads sinks and the recent window in place (gathering only the global
    rows) gives the padded gather path's output and weights."""
    cfg = SWAConfig(sparsity=0.8, bucket=16, sink_tokens=sinks, selection=selection)
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D, n = 2, 6, 2, 8, 90
    q = torch.randn(B, Hq, D, generator=gen)
    k, v = torch.randn(B, Hkv, n, D, generator=gen), torch.randn(B, Hkv, n, D, generator=gen)
    st = swa.new_state(B, Hkv, "cpu", cfg)
    st.grow(n)
    st.score[:] = torch.randint(0, 1 << 20, st.score.shape, generator=gen)
    b = swa.compute_budget(n, cfg)
    idx = st.select(b)
    mask = None
    if masked:  # a left-padded row: its first 4 tokens are masked out
        mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
        mask[1, ..., :4] = False
    ref_o, ref_w = swa.gather_attend_torch(q, k, v, idx, swa_step_module._slot_bias(mask, idx, b.total, Hq, n), SCALE)
    kn = vn = None
    kc, vc = k, v
    if split_new:
        kc, vc, kn, vn = k[:, :, :-1], v[:, :, :-1], k[:, :, -1:], v[:, :, -1:]
    out, w = swa_step_module.attend_split_torch(q, kc, vc, idx, b, mask, SCALE, kn, vn)
    torch.testing.assert_close(out, ref_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, ref_w[..., : b.total], rtol=1e-5, atol=1e-7)
    if not split_new:   # the C kernel (rows read in place) gives the same
        out, w = swa_step_module.attend_native(q, k, v, idx, b.total, mask, SCALE)
        torch.testing.assert_close(out, ref_o, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w, ref_w[..., : b.total], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("policy", ["alisa", "recall"])
def test_cpu_decode_runs_the_c_kernel_and_equals_the_torch_path(monkeypatch, policy):
    """On a float32 CPU cache the sparse step attends with the C kernel (sparse_attend); with the
    kernel off (no compiler) the torch path keeps the same tokens and gives the same outputs."""
    calls = []
    real = native.sparse_attend
    def spy(*a):
        res = real(*a)
        calls.append(res is not None)
        return res

    monkeypatch.setattr(native, "sparse_attend", spy)
    B, Hq, Hkv, D, L = 2, 6, 2, 16, 300
    cfg = SWAConfig(sparsity=0.8, bucket=16, policy=policy, sketch_block=16)
    outs, picks = {}, {}
    for path in ("native", "torch"):
        if path == "torch":
            monkeypatch.setattr(native, "library", lambda: None)
        gen = torch.Generator().manual_seed(3)
        q, k, v = _qkv(B, Hq, Hkv, L, D=D, gen=gen)
        st = swa.new_state(B, Hkv, "cpu", cfg)
        swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
        outs[path], picks[path] = [], []
        for _ in range(6):
            k = torch.cat([k, torch.randn(B, Hkv, 1, D, generator=gen)], 2)
            v = torch.cat([v, torch.randn(B, Hkv, 1, D, generator=gen)], 2)
            qd = torch.randn(B, Hq, 1, D, generator=gen)
            outs[path].append(swa.swa_step(st, qd, k, v, SCALE, cfg))
            picks[path].append(st.last_indices.clone())
    assert calls == [True] * 6 + [False] * 6      # the kernel ran, then (off) did not
    for a, b in zip(picks["native"], picks["torch"]):
        assert torch.equal(a, b)
    for a, b in zip(outs["native"], outs["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout, bag", [("buffer", True), ("contiguous", True), ("seq_major", False),
                                         ("float64", False)])
@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_split_path_value_rows_read_in_place(monkeypatch, layout, bag, selection):
    """The CPU path's output is one weighted embedding_bag over the kept value rows where the cache
    is float32 rows of a contiguous buffer (the store's [B, H, capacity, D] buffer sliced to n, or a
    contiguous cache), and the gather path's output everywhere else (a sequence-major cache, other
    dtypes); both equal the padded gather path."""
    calls = []
    real_bag = torch.nn.functional.embedding_bag
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", lambda *a, **kw: calls.append(1) or real_bag(*a, **kw))
    cfg = SWAConfig(sparsity=0.8, bucket=16, sink_tokens=2, selection=selection)
    gen = torch.Generator().manual_seed(9)
    B, Hq, Hkv, D, n, cap = 2, 6, 2, 8, 90, 128
    dtype = torch.float64 if layout == "float64" else torch.float32
    q = torch.randn(B, Hq, D, generator=gen, dtype=dtype)
    if layout == "buffer":
        kb, vb = torch.randn(B, Hkv, cap, D, generator=gen), torch.randn(B, Hkv, cap, D, generator=gen)
        k, v = kb[:, :, :n], vb[:, :, :n]
    elif layout == "seq_major":
        k = torch.randn(B, n, Hkv, D, generator=gen).transpose(1, 2)
        v = torch.randn(B, n, Hkv, D, generator=gen).transpose(1, 2)
    else:
        k, v = (torch.randn(B, Hkv, n, D, generator=gen, dtype=dtype) for _ in range(2))
    st = swa.new_state(B, Hkv, "cpu", cfg)
    st.grow(n)
    st.score[:] = torch.randint(0, 1 << 20, st.score.shape, generator=gen)
    b = swa.compute_budget(n, cfg)
    idx = st.select(b)
    bias = swa_step_module._slot_bias(None, idx, b.total, Hq, n)
    ref_o, ref_w = swa.gather_attend_torch(q, k, v, idx, bias, SCALE)
    out, w = swa_step_module.attend_split_torch(q, k, v, idx, b, None, SCALE)
    assert len(calls) == (1 if bag else 0)
    torch.testing.assert_close(out, ref_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, ref_w[..., : b.total].to(w.dtype), rtol=1e-5, atol=1e-7)
