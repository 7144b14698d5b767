"""The key sketch of ``recall`` (issue 15, ``swa.scorer="sketch"``): low-bit per-channel codes of the
keys, kept incrementally in the sequence's SWA state, counted in the budget, and the token-level
query scores it gives."""
import math

import pytest
import torch

from helpers import compiled_llama as _model, prompt_ids as _ids
from llm_compile.config import OptionsError, SWAConfig, parse_options
from llm_compile.ops.attention import dense_attention
from llm_compile.runtime import swa
from llm_compile.runtime.swa import native
from llm_compile.runtime.swa.sketch import KeySketch, quantized_weights
from llm_compile.runtime.swa.state import compute_budget

SCALE = 0.3
SKETCH = dict(policy="recall", scorer="sketch")


def _keys(B=2, H=3, n=200, D=8, seed=0):
    return torch.randn(B, H, n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_codes_are_within_half_a_step_of_the_keys(bits):
    k = _keys() * torch.linspace(0.1, 5, 8)            # channels of very different ranges
    s = KeySketch(bits, 32)
    s.update(k)
    assert s.n == 192                                  # complete blocks only: the tail is not sketched
    got = s.dequantized()
    blk = k[:, :, :192].reshape(2, 3, 6, 32, 8)
    step = (blk.amax(3) - blk.amin(3)) / (2 ** bits - 1)
    err = (got.reshape(2, 3, 6, 32, 8) - blk).abs()
    # half a step, plus float16 rounding of the block's minimum and step (relative 2**-11)
    tol = step.unsqueeze(3) * (0.5 + 2 ** bits * 2 ** -10) + blk.abs().amax(3, keepdim=True) * 2 ** -10
    assert (err <= tol).all()


def test_incremental_updates_equal_one_update():
    k = _keys(n=150)
    whole = KeySketch(2, 16)
    whole.update(k)
    inc = KeySketch(2, 16)
    inc.update(k[:, :, :37])
    for t in range(37, 150):
        inc.update(k[:, :, :t], k[:, :, t:t + 1])    # the new row apart, as the decode path passes it
    assert inc.n == whole.n == 144
    assert torch.equal(inc.dequantized(), whole.dequantized())


def test_logits_are_q_dot_the_dequantized_keys_with_int8_weights():
    """logit = scale * (sw * sum_d wq_d code_d + q . mn) with (wq, sw) = quantized_weights(q * step):
    within the weights' rounding (sw / 2 per unit of code) of q . k~, and exactly that formula."""
    k = _keys(n=128) * torch.linspace(0.2, 3, 8)
    s = KeySketch(2, 32)
    s.update(k)
    q = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(1))
    got = s.logits(q, SCALE)
    qg = q.reshape(2, 3, 3, 1, 8)
    step, mn = s._step[:, :, :4].float().unsqueeze(2), s._mn[:, :, :4].float().unsqueeze(2)   # [2, 3, 1, 4, 8]
    wq, sw = quantized_weights(qg * step)                           # [2, 3, 3, 4, 8], [.., 1]
    assert wq.abs().max() == 127 and torch.equal(wq, wq.round())
    codes = s.codes().float().reshape(2, 3, 1, 4, 32, 8)
    isum = (wq.unsqueeze(4) * codes).sum(-1)                         # [2, 3, 3, 4, 32]: integers
    want = (isum * sw + (qg * mn).sum(-1, keepdim=True)).reshape(2, 9, 128) * SCALE
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    exact = torch.einsum("bhgd,bhnd->bhgn", q.reshape(2, 3, 3, 8), s.dequantized()).reshape(2, 9, 128) * SCALE
    bound = (sw / 2 * codes.sum(-1)).reshape(2, 9, 128) * SCALE + 1e-5
    assert ((got - exact).abs() <= bound).all()
    assert (got - exact).abs().max() > 0                             # quantised, not the float sum


def test_quantized_weights_round_half_to_even_and_zero_rows():
    wq, sw = quantized_weights(torch.tensor([[127.0, 0.5, 1.5, -2.5, -127.0], [0.0] * 5]))
    assert wq.tolist() == [[127.0, 0.0, 2.0, -2.0, -127.0], [0.0] * 5] and sw.flatten().tolist() == [1.0, 0.0]


def test_vnni_and_float_tiles_give_the_same_logits():
    """The AVX-512 VNNI sums (where this CPU has them) equal the float tiles' bit for bit."""
    if not native.sketch_vnni():
        pytest.skip("no AVX-512 VNNI/VBMI on this CPU (or no AVX-512 build): only the float tiles run")
    for bits, block, Hq, D in [(2, 64, 9, 64), (1, 128, 4, 32), (4, 32, 8, 64), (8, 16, 2, 16), (2, 128, 6, 128)]:
        k = _keys(B=2, H=2 if Hq % 2 == 0 else 3, n=3 * block + 5, D=D, seed=bits) * 3
        s = KeySketch(bits, block)
        s.update(k)
        q = torch.randn(2, Hq, D, generator=torch.Generator().manual_seed(7))
        vnni = s.logits(q, SCALE)
        try:
            assert not native.sketch_vnni(False)
            floats = s.logits(q, SCALE)
        finally:
            native.sketch_vnni(True)
        assert torch.equal(vnni, floats), (bits, block, Hq, D)


def test_sketch_follows_reorder_and_crop():
    k = _keys(B=3, n=130)
    s = KeySketch(2, 16)
    s.update(k)
    order = torch.tensor([2, 0, 0])
    re = s.map_batch(lambda t: t.index_select(0, order))
    ref = KeySketch(2, 16)
    ref.update(k.index_select(0, order))
    assert torch.equal(re.dequantized(), ref.dequantized())
    cr = s.crop(70)                                    # mid-block: blocks past 64 are dropped
    assert cr.n == 64 and s.n == 128
    k2 = torch.cat([k[:, :, :70], _keys(B=3, n=30, seed=5)], 2)
    cr.update(k2)
    ref = KeySketch(2, 16)
    ref.update(k2)
    assert torch.equal(cr.dequantized(), ref.dequantized())


# ---- budget --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("itemsize", [4, 2])
def test_budget_counts_the_sketch_bytes(sparsity, itemsize):
    D = Dv = 64
    cfg = SWAConfig(sparsity=sparsity, **SKETCH)
    for n in list(range(40, 400, 7)) + [1024, 4096, 8193]:
        b = compute_budget(n, cfg, D, Dv, itemsize)
        if b.dense:
            continue
        assert b.reads <= math.floor(round(n * (1 - sparsity), 9)) + 1e-9
        assert b.sinks + b.recent + b.global_ + b.query == b.total
        if b.query:
            sketched = (n // 64) * 64
            want = sketched * (D * 2 / 8 + 4 * D / 64) / ((D + Dv) * itemsize) + 1.0
            assert b.summary == pytest.approx(want) and b.reads == pytest.approx(b.total + want)


def test_sketch_costs_fewer_rows_than_pages_at_fp32_and_more_at_fp16():
    n = 1024
    pages = compute_budget(n, SWAConfig(sparsity=0.8, policy="recall", scorer="pages"), 64, 64, 4)
    fp32 = compute_budget(n, SWAConfig(sparsity=0.8, **SKETCH), 64, 64, 4)
    fp16 = compute_budget(n, SWAConfig(sparsity=0.8, **SKETCH), 64, 64, 2)
    assert (pages.total, fp32.total, fp16.total) == (140, 204 - 41, 204 - 81)


def test_quest_refuses_the_sketch_and_bad_values_are_refused():
    with pytest.raises(OptionsError, match="quest is Quest's page method"):
        parse_options({"swa": {"policy": "quest", "scorer": "sketch"}})
    for bad in ({"scorer": "exact"}, {"sketch_bits": 9}, {"sketch_block": 1}):
        with pytest.raises(OptionsError, match="out of range"):
            parse_options({"swa": bad})
    with pytest.raises(OptionsError, match="use 1, 2, 4 or 8"):
        parse_options({"swa": {"policy": "recall", "sketch_bits": 3}})
    with pytest.raises(OptionsError, match="multiple of 4"):
        parse_options({"swa": {"policy": "recall", "sketch_bits": 2, "sketch_block": 6}})


# ---- the CPU kernel (runtime/swa/native.py) ---------------------------------------------------------

def test_the_cpu_kernel_builds_here():
    """CI's machine has a C compiler: the kernel must be in use there, not the slow fallback."""
    assert native.library() is not None


@pytest.mark.parametrize("bits,block,Hq,D", [(2, 64, 9, 64), (1, 128, 4, 32), (4, 32, 8, 64),
                                             (8, 16, 2, 16), (2, 16, 3, 8), (4, 6, 6, 24)])
def test_cpu_kernel_equals_the_torch_path(bits, block, Hq, D):
    """Packed codes read by the C kernel (AVX2 path for 16-byte rows, generic otherwise) give the
    torch path's logits, incl. after the sketch grew (capacity > blocks used) and a partial block."""
    k = _keys(B=2, H=2 if Hq % 2 == 0 else 3, n=3 * block + 5, D=D, seed=bits)
    s = KeySketch(bits, block)
    s.update(k[:, :, : block + 1])
    s.update(k)
    q = torch.randn(2, Hq, D, generator=torch.Generator().manual_seed(7))
    got = s.logits(q, SCALE)
    want = s.logits_torch(q, SCALE)
    assert got.shape == want.shape == (2, Hq, 3 * block)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cpu_kernel_refuses_bad_inputs():
    s = KeySketch(2, 64)
    s.update(_keys(n=128, D=64))
    with pytest.raises(ValueError, match="sketch_logits: bad inputs"):
        native.sketch_logits(s._packed, s._step, s._mn, torch.randn(2, 4, 64), 2, 2, 1.0)  # 4 % 3 heads
    with pytest.raises(ValueError, match="sketch_logits: bad inputs"):
        native.sketch_logits(s._packed, s._step.float(), s._mn, torch.randn(2, 3, 64), 2, 2, 1.0)


def test_without_a_compiler_the_torch_path_runs_after_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    native.library.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert native.library() is None
        assert "CPU SWA kernels (key sketch, sparse attend) are unavailable (no C compiler found" in caplog.text
        s = KeySketch(2, 64)
        s.update(_keys(n=128))
        q = torch.randn(2, 9, 8)
        torch.testing.assert_close(s.logits(q, SCALE), s.logits_torch(q, SCALE))
    finally:
        native.library.cache_clear()


# ---- selection -----------------------------------------------------------------------------------

def _run(cfg, B=2, Hq=4, Hkv=2, L=200, steps=3, D=8):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    st = swa.new_state(B, Hkv, "cpu", cfg)
    swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
    for _ in range(steps):
        k = torch.cat([k, torch.randn(B, Hkv, 1, D, generator=g)], 2)
        v = torch.cat([v, torch.randn(B, Hkv, 1, D, generator=g)], 2)
        qd = torch.randn(B, Hq, 1, D, generator=g)
        out = swa.swa_step(st, qd, k, v, SCALE, cfg)
    return st, qd, k, v, out


@pytest.mark.parametrize("selection", ["layer", "kv_head"])
def test_selection_is_total_distinct_tokens_and_output_is_attention_over_them(selection):
    cfg = SWAConfig(sparsity=0.6, selection=selection, sketch_block=16, bucket=8, **SKETCH)
    st, qd, k, v, out = _run(cfg)
    b, idx = st.last_budget, st.last_indices
    n = k.shape[2]
    assert b.query > 0 and b.summary > 0 and not b.dense
    for row in idx.reshape(-1, b.total):
        assert len(set(row.tolist())) == b.total and row.max() < n
    G = idx.shape[1]
    mask = torch.zeros(2, G, n, dtype=torch.bool).scatter_(2, idx, True)
    mask = mask.repeat_interleave(4 // G, 1)[:, :, None, :]
    want = dense_attention(qd, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask, SCALE, False)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_query_picks_are_the_top_tokens_by_the_sketch():
    """With no history and no recent share, the picks are exactly the top tokens of the sketch's
    weights summed over heads (not whole pages)."""
    cfg = SWAConfig(sparsity=0.7, query_fraction=1.0, sketch_block=16, bucket=4, **SKETCH)
    st, qd, k, v, _ = _run(cfg, B=1, steps=1)
    b = st.last_budget
    s = KeySketch(2, 16)
    s.update(k)
    n = k.shape[2]
    w = torch.zeros(n)                                  # the unsketched tail scores 0
    w[: s.n] = torch.softmax(s.logits(qd[:, :, 0], SCALE), -1).sum(1)[0]
    w[n - b.recent:] = -1
    want = set(torch.topk(w, b.query).indices.tolist()) | set(range(n - b.recent, n))
    assert set(st.last_indices[0, 0].tolist()) == want


def test_sketch_brings_back_a_passkey_that_history_dropped_and_pages_miss():
    """A key no prompt query attended, hidden in a page of noisy keys whose bound is as high as
    every other page's: alisa never reads it; pages cannot tell its page apart; the per-token
    sketch finds it."""
    B, Hq, Hkv, L, D = 1, 2, 1, 256, 8
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, Hkv, L, D, generator=g)              # every page spans about +-2 per channel
    v = torch.randn(B, Hkv, L, D, generator=g)
    k[0, 0, 40] = 0.0
    k[0, 0, 40, 0] = 2.5                                    # within the range of other pages' keys...
    k[0, 0, 40, 1:] = -2.5                                  # ...but aligned with the probe as none is
    q = torch.randn(B, Hq, L, D, generator=g) * 0.1
    probe = torch.full((B, Hq, 1, D), -4.0)
    probe[..., 0] = 4.0
    got = {}
    for name, extra in (("alisa", {"policy": "alisa"}), ("pages", {"policy": "recall"}),
                        ("sketch", dict(SKETCH, sketch_block=16))):
        cfg = SWAConfig(sparsity=0.8, page_size=16, bucket=4, **extra)
        st = swa.new_state(B, Hkv, "cpu", cfg)
        swa.swa_step(st, q, k, v, SCALE, cfg, is_causal=True)
        kk = torch.cat([k, torch.zeros(B, Hkv, 1, D)], 2)
        vv = torch.cat([v, torch.zeros(B, Hkv, 1, D)], 2)
        swa.swa_step(st, probe, kk, vv, SCALE, cfg)
        got[name] = 40 in st.last_indices[0, 0].tolist()
    assert got["alisa"] is False and got["sketch"] is True


# ---- models ----------------------------------------------------------------------------------------

SK = {"inner": "eager", "swa": {"sparsity": 0.5, "bucket": 4, "kernel": "torch", "sketch_block": 16,
                                **SKETCH}}


def test_the_model_test_uses_the_sketch():
    b = compute_budget(61, SWAConfig(**SK["swa"]), 16, 16, 4)
    assert b.summary and b.query and b.global_


def test_generate_with_dynamic_cache_and_llmaccel_cache():
    """recall with the sketch over HF's DynamicCache (SWA state on the cache's tensors) and over
    the in-place store of LLMAccelCache: the same tokens."""
    from llm_compile import LLMAccelCache

    kw = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        want = _model({**SK, "kv_store": False}).generate(_ids(), **kw)
        torch._dynamo.reset()
        got = _model(SK).generate(_ids(), past_key_values=LLMAccelCache(), **kw)
    assert torch.equal(got, want)
    assert got.shape[1] == 68


@pytest.mark.slow  # minutes on 2 cores: run with -m slow
def test_beam_search_reorders_the_sketch():
    from llm_compile import LLMAccelCache

    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    ids = _ids()[:1]
    with torch.no_grad():
        want = _model({**SK, "kv_store": False}).generate(ids, past_key_values=LLMAccelCache(), **kw)
        torch._dynamo.reset()
        got = _model(SK).generate(ids, past_key_values=LLMAccelCache(), **kw)
    assert torch.equal(got, want)
